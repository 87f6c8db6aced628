from stockbook import Item, Ledger, low_stock, valuation_report


def make_ledger():
    ledger = Ledger()
    ledger.add_item(Item("WID-100", "Widget", reorder_level=5))
    ledger.add_item(Item("BLT-200", "Bolt", reorder_level=50))
    ledger.add_item(Item("NUT-300", "Nut", reorder_level=1))
    ledger.receive("WID-100", 2, 4.0)
    ledger.receive("BLT-200", 80, 0.25)
    return ledger


def test_low_stock_lists_items_below_reorder_level():
    lines = low_stock(make_ledger())
    assert [line.sku for line in lines] == ["NUT-300", "WID-100"]
    assert lines[1].available == 2
    assert lines[1].name == "Widget"


def test_low_stock_shortfall():
    lines = low_stock(make_ledger())
    assert lines[0].shortfall == 2
    assert lines[1].shortfall == 4


def test_valuation_report():
    rows, total = valuation_report(make_ledger())
    assert rows == [("BLT-200", 80, 20.0), ("NUT-300", 0, 0), ("WID-100", 2, 8.0)]
    assert total == 28.0
