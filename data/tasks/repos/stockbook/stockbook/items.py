"""Item catalogue records and SKU handling."""

import re
from dataclasses import dataclass

SKU_PATTERN = re.compile(r"^[A-Z]{2,4}-\d{3,6}$")


def normalize_sku(raw):
    """Return the canonical form of a SKU such as ``"ABC-1234"``.

    Surrounding whitespace is removed and letters are upper-cased.  A
    ``ValueError`` is raised if the result is not 2-4 letters, a dash and
    3-6 digits.
    """
    sku = raw.strip().upper()
    if not SKU_PATTERN.match(sku):
        raise ValueError(f"invalid SKU: {raw!r}")
    return sku


@dataclass
class Item:
    """A stocked item.  ``reorder_level`` is the available quantity at or
    below which the item shows up in the low-stock report."""

    sku: str
    name: str
    reorder_level: int = 0

    def __post_init__(self):
        self.sku = normalize_sku(self.sku)
        if self.reorder_level < 0:
            raise ValueError("reorder_level must be non-negative")
