"""Reports over a :class:`~stockbook.ledger.Ledger`."""

from typing import NamedTuple


class LowStockLine(NamedTuple):
    sku: str
    name: str
    available: int
    reorder_level: int

    @property
    def shortfall(self):
        """Units needed to get back above the reorder level."""
        return self.reorder_level - self.available + 1


def low_stock(ledger):
    """Items whose available quantity is at or below their reorder level,
    sorted by SKU."""
    lines = []
    for item in ledger.items():
        available = ledger.available(item.sku)
        if available <= item.reorder_level:
            lines.append(LowStockLine(item.sku, item.name, available, item.reorder_level))
    return lines


def valuation_report(ledger):
    """Return ``(rows, total)`` where rows are ``(sku, on_hand, value)``."""
    rows = [(item.sku, ledger.on_hand(item.sku), ledger.value(item.sku)) for item in ledger.items()]
    total = round(sum(value for _, _, value in rows), 2)
    return rows, total
