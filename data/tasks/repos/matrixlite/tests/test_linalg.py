from fractions import Fraction

import pytest

from matrixlite import MatrixError, determinant, identity, inverse, multiply, solve


def test_determinant():
    assert determinant([[5]]) == 5
    assert determinant([[2, 1], [1, 3]]) == 5
    assert determinant([[2, 0, 1], [1, 3, 2], [1, 1, 2]]) == 6


def test_determinant_singular():
    assert determinant([[1, 2], [2, 4]]) == 0


def test_inverse_exact():
    inv = inverse([[4, 7], [2, 6]])
    assert inv == [[Fraction(3, 5), Fraction(-7, 10)], [Fraction(-1, 5), Fraction(2, 5)]]
    assert multiply([[4, 7], [2, 6]], inv) == identity(2)


def test_inverse_singular():
    with pytest.raises(MatrixError):
        inverse([[1, 2], [2, 4]])
    with pytest.raises(MatrixError):
        inverse([[1, 2, 3], [4, 5, 6]])


def test_solve():
    assert solve([[2, 1], [1, 3]], [3, 5]) == [Fraction(4, 5), Fraction(7, 5)]
    assert solve([[1, 0, 0], [0, 2, 0], [0, 0, 4]], [1, 1, 1]) == [1, Fraction(1, 2), Fraction(1, 4)]


def test_solve_bad_rhs():
    with pytest.raises(MatrixError):
        solve([[1, 2], [3, 4]], [1, 2, 3])
