"""matrixlite: small dense matrices represented as lists of lists.

Matrices are plain Python ``list`` objects whose items are rows (lists of
numbers).  Linear-algebra routines work with exact ``fractions.Fraction``
arithmetic so that results such as inverses are exact.
"""

from .core import MatrixError, identity, shape, transpose, validate, zeros
from .ops import add, matvec, multiply, power, scale, subtract
from .linalg import determinant, inverse, solve

__all__ = [
    "MatrixError",
    "add",
    "determinant",
    "identity",
    "inverse",
    "matvec",
    "multiply",
    "power",
    "scale",
    "shape",
    "solve",
    "subtract",
    "transpose",
    "validate",
    "zeros",
]
