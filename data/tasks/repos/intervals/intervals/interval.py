"""The :class:`Interval` type."""

_KINDS = {"both": (True, True), "left": (True, False),
          "right": (False, True), "neither": (False, False)}
_NAMES = {flags: name for name, flags in _KINDS.items()}


def make_interval(start, end, left_closed, right_closed):
    """Build an interval from explicit endpoint flags, or return None if it is empty."""
    if start > end or (start == end and not (left_closed and right_closed)):
        return None
    return Interval(start, end, _NAMES[left_closed, right_closed])


class Interval:
    """A numeric interval between ``start`` and ``end``.

    ``closed`` says which endpoints belong to the interval, as in pandas:
    ``"left"`` (the default) is ``[start, end)``, ``"right"`` is ``(start, end]``,
    ``"both"`` is ``[start, end]`` and ``"neither"`` is ``(start, end)``.
    """

    __slots__ = ("start", "end", "closed")

    def __init__(self, start, end, closed="left"):
        if closed not in _KINDS:
            raise ValueError(f"closed must be one of {sorted(_KINDS)}, not {closed!r}")
        if end < start:
            raise ValueError(f"end {end!r} is smaller than start {start!r}")
        self.start = start
        self.end = end
        self.closed = closed

    @property
    def left_closed(self):
        return _KINDS[self.closed][0]

    @property
    def right_closed(self):
        return _KINDS[self.closed][1]

    @property
    def length(self):
        return self.end - self.start

    def __repr__(self):
        left = "[" if self.left_closed else "("
        right = "]" if self.right_closed else ")"
        return f"{left}{self.start}, {self.end}{right}"

    def __eq__(self, other):
        if not isinstance(other, Interval):
            return NotImplemented
        return (self.start, self.end, self.closed) == (other.start, other.end, other.closed)

    def is_empty(self):
        """True if no number lies in the interval, e.g. ``[3, 3)``."""
        return self.start == self.end and self.closed != "both"

    def __contains__(self, x):
        """``x in interval``: whether the number ``x`` lies in the interval."""
        above = self.start < x or (self.left_closed and x == self.start)
        below = x < self.end or (self.right_closed and x == self.end)
        return above and below

    def intersection(self, other):
        """The common part of two intervals, or None if they share no point."""
        if self.start > other.start:
            lo, lo_closed = self.start, self.left_closed
        elif other.start > self.start:
            lo, lo_closed = other.start, other.left_closed
        else:
            lo, lo_closed = self.start, self.left_closed and other.left_closed
        if self.end < other.end:
            hi, hi_closed = self.end, self.right_closed
        elif other.end < self.end:
            hi, hi_closed = other.end, other.right_closed
        else:
            hi, hi_closed = self.end, self.right_closed and other.right_closed
        return make_interval(lo, hi, lo_closed, hi_closed)

    def overlaps(self, other):
        """True if the two intervals share at least one point."""
        return self.intersection(other) is not None

    def contains_interval(self, other):
        """True if every point of ``other`` also lies in this interval."""
        return other.is_empty() or self.intersection(other) == other

    def hull(self, other):
        """The smallest interval covering both intervals."""
        if self.start != other.start:
            first = self if self.start < other.start else other
            lo, lo_closed = first.start, first.left_closed
        else:
            lo, lo_closed = self.start, self.left_closed or other.left_closed
        if self.end != other.end:
            last = self if self.end > other.end else other
            hi, hi_closed = last.end, last.right_closed
        else:
            hi, hi_closed = self.end, self.right_closed or other.right_closed
        return Interval(lo, hi, _NAMES[lo_closed, hi_closed])
