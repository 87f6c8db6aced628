"""A set of numbers stored as disjoint intervals."""

import bisect

from .interval import Interval, make_interval
from .ops import difference, intersect, merge


class IntervalSet:
    """An immutable-style set of numbers kept as sorted, disjoint intervals.

    Overlapping and adjacent intervals are merged on construction, so two sets
    holding the same points compare equal.
    """

    def __init__(self, intervals=()):
        self._items = merge(intervals)
        self._starts = [iv.start for iv in self._items]

    @classmethod
    def from_pairs(cls, pairs, closed="left"):
        """Build a set from ``(start, end)`` tuples that all share ``closed``."""
        return cls(Interval(start, end, closed) for start, end in pairs)

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __eq__(self, other):
        if not isinstance(other, IntervalSet):
            return NotImplemented
        return self._items == other._items

    def __contains__(self, x):
        i = bisect.bisect_right(self._starts, x) - 1
        return i >= 0 and x in self._items[i]

    def add(self, interval):
        """Return a new set that also covers ``interval``."""
        return IntervalSet(self._items + [interval])

    def remove(self, interval):
        """Return a new set without the points of ``interval``."""
        return IntervalSet(difference(self._items, [interval]))

    def union(self, other):
        return IntervalSet(self._items + list(other))

    def intersection(self, other):
        return IntervalSet(intersect(self._items, list(other)))

    def difference(self, other):
        return IntervalSet(difference(self._items, list(other)))

    def measure(self):
        """Total length of the set."""
        return sum(iv.length for iv in self._items)

    def span(self):
        """The smallest interval covering the whole set, or None if it is empty."""
        if not self._items:
            return None
        return self._items[0].hull(self._items[-1])

    def gaps(self):
        """The intervals between consecutive members, in order."""
        out = []
        for a, b in zip(self._items, self._items[1:]):
            gap = make_interval(a.end, b.start, not a.right_closed, not b.left_closed)
            if gap is not None:
                out.append(gap)
        return out
