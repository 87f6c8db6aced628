"""The stock ledger: receiving, shipping and reserving stock."""

from .items import Item, normalize_sku
from .valuation import FifoQueue


class InsufficientStock(Exception):
    """Raised when a shipment or reservation exceeds the stock available."""


class Ledger:
    """Tracks on-hand stock, reservations and movement history per SKU."""

    def __init__(self):
        self._items = {}
        self._lots = {}
        self._reservations = {}
        self._next_reservation = 1
        self.history = []

    def add_item(self, item):
        """Register an :class:`Item`; its SKU must be new."""
        if not isinstance(item, Item):
            raise TypeError("expected an Item")
        if item.sku in self._items:
            raise ValueError(f"duplicate SKU {item.sku}")
        self._items[item.sku] = item
        self._lots[item.sku] = FifoQueue()

    def item(self, sku):
        return self._items[self._key(sku)]

    def items(self):
        """All registered items, sorted by SKU."""
        return [self._items[sku] for sku in sorted(self._items)]

    def _key(self, sku):
        sku = normalize_sku(sku)
        if sku not in self._items:
            raise KeyError(f"unknown SKU {sku}")
        return sku

    @staticmethod
    def _check_quantity(quantity):
        if not isinstance(quantity, int) or quantity <= 0:
            raise ValueError("quantity must be a positive integer")

    def on_hand(self, sku):
        """Units physically in stock."""
        return self._lots[self._key(sku)].quantity

    def reserved(self, sku):
        """Units held by open reservations."""
        sku = self._key(sku)
        return sum(qty for s, qty in self._reservations.values() if s == sku)

    def available(self, sku):
        """Units that can still be shipped or reserved."""
        return self.on_hand(sku) - self.reserved(sku)

    def value(self, sku):
        """FIFO cost of the units on hand."""
        return self._lots[self._key(sku)].value

    def receive(self, sku, quantity, unit_cost):
        """Add a lot of ``quantity`` units bought at ``unit_cost`` each."""
        sku = self._key(sku)
        self._check_quantity(quantity)
        self._lots[sku].add(quantity, unit_cost)
        self.history.append(("receive", sku, quantity))

    def reserve(self, sku, quantity):
        """Hold ``quantity`` units for a later shipment; return the reservation id."""
        sku = self._key(sku)
        self._check_quantity(quantity)
        if quantity > self.available(sku):
            raise InsufficientStock(f"only {self.available(sku)} of {sku} available")
        rid = self._next_reservation
        self._next_reservation += 1
        self._reservations[rid] = (sku, quantity)
        return rid

    def release(self, reservation):
        """Cancel an open reservation, making its units available again."""
        if reservation not in self._reservations:
            raise KeyError(f"unknown reservation {reservation}")
        del self._reservations[reservation]

    def ship(self, sku, quantity, reservation=None):
        """Ship units and return their FIFO cost.

        Without ``reservation`` only available (unreserved) units may be
        shipped.  With one, the units come out of that reservation, which is
        reduced accordingly and closed once fully shipped.
        """
        sku = self._key(sku)
        self._check_quantity(quantity)
        if reservation is not None:
            res_sku, held = self._reservations.get(reservation, (None, 0))
            if res_sku != sku:
                raise KeyError(f"no reservation {reservation} for {sku}")
            if quantity > held:
                raise InsufficientStock(f"reservation {reservation} holds only {held}")
            if quantity == held:
                del self._reservations[reservation]
            else:
                self._reservations[reservation] = (sku, held - quantity)
        elif quantity > self.available(sku):
            raise InsufficientStock(f"only {self.available(sku)} of {sku} available")
        cost = self._lots[sku].remove(quantity)
        self.history.append(("ship", sku, quantity))
        return cost
