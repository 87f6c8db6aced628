import pytest

from stockbook import InsufficientStock, Item, Ledger


@pytest.fixture
def ledger():
    ledger = Ledger()
    ledger.add_item(Item("WID-100", "Widget", reorder_level=5))
    return ledger


def test_receive_updates_on_hand_and_value(ledger):
    ledger.receive("WID-100", 10, 2.0)
    ledger.receive("wid-100", 5, 2.0)
    assert ledger.on_hand("WID-100") == 15
    assert ledger.value("WID-100") == 30.0
    assert ledger.history == [("receive", "WID-100", 10), ("receive", "WID-100", 5)]


def test_unknown_and_duplicate_skus(ledger):
    with pytest.raises(KeyError):
        ledger.on_hand("GAD-999")
    with pytest.raises(ValueError):
        ledger.add_item(Item("wid-100", "Another widget"))


def test_invalid_quantities_rejected(ledger):
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            ledger.receive("WID-100", bad, 1.0)


def test_ship_returns_fifo_cost(ledger):
    ledger.receive("WID-100", 10, 2.5)
    assert ledger.ship("WID-100", 4) == 10.0
    assert ledger.on_hand("WID-100") == 6
    assert ledger.value("WID-100") == 15.0
    assert ledger.history[-1] == ("ship", "WID-100", 4)


def test_ship_more_than_on_hand(ledger):
    ledger.receive("WID-100", 3, 1.0)
    with pytest.raises(InsufficientStock):
        ledger.ship("WID-100", 5)
    assert ledger.on_hand("WID-100") == 3


def test_reserve_reduces_available(ledger):
    ledger.receive("WID-100", 10, 1.0)
    ledger.reserve("WID-100", 4)
    assert ledger.reserved("WID-100") == 4
    assert ledger.available("WID-100") == 6
    assert ledger.on_hand("WID-100") == 10
    with pytest.raises(InsufficientStock):
        ledger.reserve("WID-100", 7)


def test_release_restores_availability(ledger):
    ledger.receive("WID-100", 10, 1.0)
    rid = ledger.reserve("WID-100", 7)
    ledger.release(rid)
    assert ledger.available("WID-100") == 10
    with pytest.raises(KeyError):
        ledger.release(rid)


def test_partial_shipment_against_reservation(ledger):
    ledger.receive("WID-100", 10, 1.0)
    rid = ledger.reserve("WID-100", 6)
    assert ledger.ship("WID-100", 4, reservation=rid) == 4.0
    assert ledger.reserved("WID-100") == 2
    assert ledger.on_hand("WID-100") == 6
    assert ledger.available("WID-100") == 4


def test_reservation_limits_shipment(ledger):
    ledger.receive("WID-100", 10, 1.0)
    rid = ledger.reserve("WID-100", 2)
    with pytest.raises(InsufficientStock):
        ledger.ship("WID-100", 3, reservation=rid)
    with pytest.raises(KeyError):
        ledger.ship("WID-100", 1, reservation=rid + 1)
