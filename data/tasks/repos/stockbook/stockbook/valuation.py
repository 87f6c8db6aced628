"""FIFO (first in, first out) costing of stock lots."""

from collections import deque
from dataclasses import dataclass


@dataclass
class Lot:
    """A quantity of stock received together at one unit cost."""

    quantity: int
    unit_cost: float


class FifoQueue:
    """Stock lots of one item, consumed oldest first."""

    def __init__(self):
        self._lots = deque()

    def add(self, quantity, unit_cost):
        """Append a newly received lot."""
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        if unit_cost < 0:
            raise ValueError("unit_cost must be non-negative")
        self._lots.append(Lot(quantity, unit_cost))

    def remove(self, quantity):
        """Consume ``quantity`` units, oldest lots first; return their cost."""
        if quantity > self.quantity:
            raise ValueError(f"cannot remove {quantity}, only {self.quantity} in stock")
        remaining = quantity
        cost = 0.0
        while remaining > 0:
            lot = self._lots[0]
            take = min(lot.quantity, remaining)
            cost += take * lot.unit_cost
            lot.quantity -= take
            remaining -= take
            if lot.quantity == 0:
                self._lots.popleft()
        return round(cost, 2)

    @property
    def quantity(self):
        """Total units held in all lots."""
        return sum(lot.quantity for lot in self._lots)

    @property
    def value(self):
        """Total cost of the units still held."""
        return round(sum(lot.quantity * lot.unit_cost for lot in self._lots), 2)

    def lots(self):
        """A snapshot of the remaining lots, oldest first."""
        return [Lot(lot.quantity, lot.unit_cost) for lot in self._lots]
