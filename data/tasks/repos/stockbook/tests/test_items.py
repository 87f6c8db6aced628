import pytest

from stockbook.items import Item, normalize_sku


def test_normalize_sku_uppercases():
    assert normalize_sku("abc-123") == "ABC-123"
    assert normalize_sku("Wd-004411") == "WD-004411"


@pytest.mark.parametrize("raw", ["ABC123", "A-123", "ABCDE-123", "ABC-12", "ABC-1234567", ""])
def test_normalize_sku_rejects_malformed(raw):
    with pytest.raises(ValueError):
        normalize_sku(raw)


def test_item_normalizes_its_sku():
    item = Item("bolt-250", "Bolt M6", reorder_level=20)
    assert item.sku == "BOLT-250"
    assert item.reorder_level == 20


def test_item_rejects_negative_reorder_level():
    with pytest.raises(ValueError):
        Item("NUT-100", "Nut", reorder_level=-1)
