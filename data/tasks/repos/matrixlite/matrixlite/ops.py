"""Element-wise and product operations."""

from .core import MatrixError, identity, require_square, shape, validate


def _check_same_shape(a, b):
    if shape(a) != shape(b):
        raise MatrixError(f"shape mismatch: {shape(a)} vs {shape(b)}")


def add(a, b):
    """Return ``a + b`` element-wise."""
    _check_same_shape(a, b)
    return [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def subtract(a, b):
    """Return ``a - b`` element-wise."""
    _check_same_shape(a, b)
    return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def scale(m, k):
    """Multiply every entry of ``m`` by the scalar ``k``."""
    return [[k * x for x in row] for row in validate(m)]


def multiply(a, b):
    """Return the matrix product ``a @ b``."""
    a = validate(a)
    b = validate(b)
    n, inner = len(a), len(a[0])
    if inner != len(b):
        raise MatrixError(f"cannot multiply {n}x{inner} by {len(b)}x{len(b[0])}")
    p = len(b[0])
    return [
        [sum(a[i][k] * b[k][j] for k in range(inner)) for j in range(p)]
        for i in range(n)
    ]


def matvec(a, v):
    """Return the product of matrix ``a`` with the vector (list) ``v``."""
    a = validate(a)
    if len(v) != len(a[0]):
        raise MatrixError(f"vector of length {len(v)} does not match {len(a[0])} columns")
    return [sum(x * y for x, y in zip(row, v)) for row in a]


def power(m, n):
    """Return ``m`` raised to the non-negative integer power ``n``.

    ``power(m, 0)`` is the identity matrix of the same size.
    """
    size = require_square(m)
    if n < 0:
        raise MatrixError("negative powers are not supported; use inverse()")
    result = identity(size)
    base = validate(m)
    while n:
        if n & 1:
            result = multiply(result, base)
        base = multiply(base, base)
        n >>= 1
    return result
