"""Operations on lists of intervals."""

from .interval import make_interval


def _joinable(a, b):
    """True if ``a`` and ``b`` (with ``a.start <= b.start``) overlap or touch."""
    if b.start < a.end:
        return True
    return b.start == a.end and (a.right_closed or b.left_closed)


def merge(intervals):
    """Merge overlapping and adjacent intervals.

    Returns a new list of disjoint intervals sorted by start; empty intervals
    are dropped. ``[0, 1)`` and ``[1, 2)`` merge into ``[0, 2)``, but ``[0, 1)``
    and ``(1, 2)`` stay apart because the point 1 is in neither.
    """
    items = sorted(
        (iv for iv in intervals if not iv.is_empty()),
        key=lambda iv: (iv.start, not iv.left_closed),
    )
    merged = []
    for iv in items:
        if merged and _joinable(merged[-1], iv):
            merged[-1] = merged[-1].hull(iv)
        else:
            merged.append(iv)
    return merged


def intersect(a, b):
    """Points lying in both interval lists, as a merged list."""
    a, b = merge(a), merge(b)
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        piece = a[i].intersection(b[j])
        if piece is not None:
            out.append(piece)
        if a[i].end < b[j].end:
            i += 1
        else:
            j += 1
    return out


def _subtract(piece, cut):
    if not piece.overlaps(cut):
        return [piece]
    left = make_interval(piece.start, cut.start, piece.left_closed, not cut.left_closed)
    right = make_interval(cut.end, piece.end, not cut.right_closed, piece.right_closed)
    return [iv for iv in (left, right) if iv is not None]


def difference(a, b):
    """Points lying in the interval list ``a`` but not in ``b``, as a merged list."""
    cuts = merge(b)
    result = []
    for iv in merge(a):
        pieces = [iv]
        for cut in cuts:
            pieces = [rest for p in pieces for rest in _subtract(p, cut)]
        result.extend(pieces)
    return result
