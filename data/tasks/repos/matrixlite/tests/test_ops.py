import pytest

from matrixlite import MatrixError, add, identity, matvec, multiply, power, scale, subtract


def test_add_and_subtract():
    a = [[1, 2], [3, 4]]
    b = [[10, 20], [30, 40]]
    assert add(a, b) == [[11, 22], [33, 44]]
    assert subtract(b, a) == [[9, 18], [27, 36]]
    with pytest.raises(MatrixError):
        add(a, [[1, 2, 3]])


def test_scale():
    assert scale([[1, -2], [0, 3]], 3) == [[3, -6], [0, 9]]


def test_multiply_square():
    a = [[1, 2], [3, 4]]
    b = [[5, 6], [7, 8]]
    assert multiply(a, b) == [[19, 22], [43, 50]]
    assert multiply(a, identity(2)) == a


def test_multiply_shape_mismatch():
    with pytest.raises(MatrixError):
        multiply([[1, 2], [3, 4]], [[1, 2], [3, 4], [5, 6]])


def test_matvec():
    assert matvec([[1, 2, 3], [4, 5, 6]], [1, 0, -1]) == [-2, -2]
    with pytest.raises(MatrixError):
        matvec([[1, 2]], [1, 2, 3])


def test_power():
    m = [[1, 1], [1, 0]]
    assert power(m, 1) == m
    assert power(m, 5) == [[8, 5], [5, 3]]
    with pytest.raises(MatrixError):
        power(m, -1)
