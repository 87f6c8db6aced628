import pytest

from intervals import Interval


def test_repr_shows_closedness():
    assert repr(Interval(1, 3)) == "[1, 3)"
    assert repr(Interval(1, 3, "both")) == "[1, 3]"
    assert repr(Interval(1, 3, "right")) == "(1, 3]"
    assert repr(Interval(1.5, 2, "neither")) == "(1.5, 2)"


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Interval(3, 1)
    with pytest.raises(ValueError):
        Interval(1, 3, "open")


def test_point_membership():
    assert 1 in Interval(1, 3)
    assert 2.999 in Interval(1, 3)
    assert 3 not in Interval(1, 3)
    assert 3 in Interval(1, 3, "right")
    assert 1 not in Interval(1, 3, "right")
    assert 1 not in Interval(1, 3, "neither")


def test_empty_and_length():
    assert Interval(2, 2).is_empty()
    assert not Interval(2, 2, "both").is_empty()
    assert Interval(2, 7).length == 5
    assert Interval(0.5, 1, "neither").length == 0.5


def test_intersection():
    assert Interval(0, 5).intersection(Interval(3, 8)) == Interval(3, 5)
    assert Interval(0, 2).intersection(Interval(3, 4)) is None
    assert Interval(0, 2).intersection(Interval(2, 4)) is None
    assert Interval(0, 2, "both").intersection(Interval(2, 4)) == Interval(2, 2, "both")
    assert Interval(1, 9, "neither").intersection(Interval(3, 4, "both")) == Interval(3, 4, "both")


def test_overlaps():
    assert Interval(0, 5).overlaps(Interval(4, 6))
    assert not Interval(0, 5).overlaps(Interval(5, 6))
    assert Interval(0, 5, "both").overlaps(Interval(5, 6))
    assert not Interval(0, 5, "both").overlaps(Interval(5, 6, "neither"))


def test_contains_interval():
    outer = Interval(0, 10)
    assert outer.contains_interval(Interval(2, 5))
    assert outer.contains_interval(Interval(2, 5, "both"))
    assert not outer.contains_interval(Interval(5, 12))
    assert outer.contains_interval(Interval(20, 20))


def test_hull():
    assert Interval(0, 2).hull(Interval(5, 7, "both")) == Interval(0, 7, "both")
    assert Interval(3, 4, "neither").hull(Interval(1, 2)) == Interval(1, 4, "left")
