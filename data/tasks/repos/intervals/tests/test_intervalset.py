from intervals import Interval, IntervalSet


def test_construction_merges():
    s = IntervalSet.from_pairs([(0, 2), (6, 8), (1, 4)])
    assert list(s) == [Interval(0, 4), Interval(6, 8)]
    assert len(s) == 2
    assert s.measure() == 6


def test_membership():
    s = IntervalSet.from_pairs([(0, 2), (5, 7)])
    assert 1 in s
    assert 6.5 in s
    assert 3 not in s
    assert 7 not in s
    assert -1 not in s


def test_union_intersection_difference():
    a = IntervalSet.from_pairs([(0, 3)])
    b = IntervalSet.from_pairs([(2, 6)])
    assert a.union(b) == IntervalSet.from_pairs([(0, 6)])
    assert a.intersection(b) == IntervalSet.from_pairs([(2, 3)])
    assert a.difference(b) == IntervalSet.from_pairs([(0, 2)])


def test_add_and_remove_return_new_sets():
    s = IntervalSet.from_pairs([(0, 10)])
    assert s.remove(Interval(2, 4)) == IntervalSet.from_pairs([(0, 2), (4, 10)])
    assert s.add(Interval(12, 15)).measure() == 13
    assert s.measure() == 10


def test_span_and_gaps():
    s = IntervalSet.from_pairs([(0, 1), (6, 9), (3, 4)])
    assert s.span() == Interval(0, 9)
    assert s.gaps() == [Interval(1, 3), Interval(4, 6)]


def test_empty_set():
    s = IntervalSet()
    assert len(s) == 0
    assert s.span() is None
    assert s.measure() == 0
    assert s.gaps() == []
