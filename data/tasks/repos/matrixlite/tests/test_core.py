import pytest

from matrixlite import MatrixError, identity, shape, transpose, validate, zeros


def test_validate_returns_copy():
    m = [[1, 2], [3, 4]]
    v = validate(m)
    assert v == m
    v[0][0] = 99
    assert m[0][0] == 1


def test_validate_rejects_bad_input():
    with pytest.raises(MatrixError):
        validate([])
    with pytest.raises(MatrixError):
        validate([[]])
    with pytest.raises(MatrixError):
        validate([[1, 2], [3], [4, 5]])
    with pytest.raises(MatrixError):
        validate([[1, "x"]])
    with pytest.raises(MatrixError):
        validate([[True, 0]])


def test_shape():
    assert shape([[1, 2, 3], [4, 5, 6]]) == (2, 3)
    assert shape([[7]]) == (1, 1)


def test_zeros_and_identity():
    assert zeros(2, 3) == [[0, 0, 0], [0, 0, 0]]
    assert identity(3) == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(MatrixError):
        zeros(0, 2)


def test_transpose_square():
    assert transpose([[1, 2], [3, 4]]) == [[1, 3], [2, 4]]
    assert transpose(transpose([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
