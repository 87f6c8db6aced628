import pytest

from stockbook.valuation import FifoQueue


def test_quantity_and_value():
    q = FifoQueue()
    q.add(4, 1.25)
    q.add(6, 1.25)
    assert q.quantity == 10
    assert q.value == 12.5
    assert q.remove(5) == 6.25
    assert q.quantity == 5


def test_remove_everything_empties_queue():
    q = FifoQueue()
    q.add(2, 3.0)
    q.add(3, 4.0)
    assert q.remove(5) == 18.0
    assert q.quantity == 0
    assert q.value == 0
    assert q.lots() == []


def test_add_validates_arguments():
    q = FifoQueue()
    with pytest.raises(ValueError):
        q.add(0, 1.0)
    with pytest.raises(ValueError):
        q.add(3, -0.5)


def test_remove_more_than_held():
    q = FifoQueue()
    q.add(3, 1.0)
    with pytest.raises(ValueError):
        q.remove(4)
    assert q.quantity == 3
