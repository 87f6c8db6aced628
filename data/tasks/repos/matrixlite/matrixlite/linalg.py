"""Determinants, inverses and linear systems using exact fractions."""

from fractions import Fraction

from .core import MatrixError, require_square, to_fractions


def _find_pivot(m, col, start):
    """Return the index of the first row >= ``start`` with a non-zero entry in ``col``."""
    for r in range(start, len(m)):
        if m[r][col] != 0:
            return r
    return None


def determinant(m):
    """Return the determinant of a square matrix as a ``Fraction``."""
    n = require_square(m)
    a = to_fractions(m)
    det = Fraction(1)
    for col in range(n):
        pivot = _find_pivot(a, col, col)
        if pivot is None:
            return Fraction(0)
        if pivot != col:
            a[col], a[pivot] = a[pivot], a[col]
            det = -det
        det *= a[col][col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            if factor:
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return det


def _gauss_jordan(aug, n):
    """Reduce the left ``n`` columns of the augmented matrix to the identity."""
    for col in range(n):
        pivot = _find_pivot(aug, col, col)
        if pivot is None:
            raise MatrixError("matrix is singular")
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [x / p for x in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                factor = aug[r][col]
                aug[r] = [x - factor * y for x, y in zip(aug[r], aug[col])]
    return aug


def inverse(m):
    """Return the inverse of a square matrix, with ``Fraction`` entries.

    Raises ``MatrixError`` if the matrix is singular.
    """
    n = require_square(m)
    a = to_fractions(m)
    aug = [row + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    _gauss_jordan(aug, n)
    return [row[n:] for row in aug]


def solve(a, b):
    """Solve ``a x = b`` for ``x`` where ``b`` is a list of numbers.

    Returns ``x`` as a list of ``Fraction``.  Raises ``MatrixError`` when
    ``a`` is singular or ``b`` has the wrong length.
    """
    n = require_square(a)
    if len(b) != n:
        raise MatrixError(f"right-hand side has length {len(b)}, expected {n}")
    aug = [row + [Fraction(v)] for row, v in zip(to_fractions(a), b)]
    _gauss_jordan(aug, n)
    return [row[n] for row in aug]
