"""stockbook: a small inventory ledger with reservations and FIFO costing."""

from .items import Item, normalize_sku
from .ledger import InsufficientStock, Ledger
from .reports import LowStockLine, low_stock, valuation_report
from .valuation import FifoQueue, Lot

__all__ = ["FifoQueue", "InsufficientStock", "Item", "Ledger", "Lot",
           "LowStockLine", "low_stock", "normalize_sku", "valuation_report"]
