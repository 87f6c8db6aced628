"""Construction, validation and basic shape helpers."""

from fractions import Fraction
from numbers import Number


class MatrixError(ValueError):
    """Raised for malformed matrices or incompatible shapes."""


def validate(m):
    """Check that ``m`` is a non-empty rectangular matrix of numbers.

    Returns a fresh copy of the matrix (a list of new row lists) so callers
    can modify the result without touching the argument.
    """
    if not isinstance(m, (list, tuple)) or not m:
        raise MatrixError("matrix must be a non-empty list of rows")
    rows = [list(row) for row in m]
    ncols = len(rows[0])
    if ncols == 0:
        raise MatrixError("matrix rows must not be empty")
    for i in range(1, len(rows)):
        if len(rows[i]) != ncols:
            raise MatrixError(f"row {i} has {len(rows[i])} entries, expected {ncols}")
    for row in rows:
        for x in row:
            if isinstance(x, bool) or not isinstance(x, Number):
                raise MatrixError(f"matrix entries must be numbers, got {x!r}")
    return rows


def shape(m):
    """Return ``(rows, cols)`` of a valid matrix."""
    rows = validate(m)
    return len(rows), len(rows[0])


def zeros(nrows, ncols):
    """Return an ``nrows`` x ``ncols`` matrix of zeros."""
    if nrows < 1 or ncols < 1:
        raise MatrixError("dimensions must be positive")
    return [[0] * ncols for _ in range(nrows)]


def identity(n):
    """Return the ``n`` x ``n`` identity matrix."""
    m = zeros(n, n)
    for i in range(n):
        m[i][i] = 1
    return m


def transpose(m):
    """Return the transpose of ``m``."""
    rows = validate(m)
    return [[rows[i][j] for i in range(len(rows))] for j in range(len(rows[0]))]


def to_fractions(m):
    """Return a copy of ``m`` with every entry converted to ``Fraction``."""
    return [[Fraction(x) for x in row] for row in validate(m)]


def require_square(m):
    """Validate ``m`` and make sure it is square; return its size."""
    nrows, ncols = shape(m)
    if nrows != ncols:
        raise MatrixError(f"expected a square matrix, got {nrows}x{ncols}")
    return nrows
