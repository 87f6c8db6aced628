"""Numeric intervals with open, closed and half-open endpoints, and sets of them."""

from .interval import Interval
from .ops import difference, intersect, merge
from .intervalset import IntervalSet

__all__ = ["Interval", "IntervalSet", "difference", "intersect", "merge"]
