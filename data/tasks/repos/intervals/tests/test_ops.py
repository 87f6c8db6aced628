from intervals import Interval, difference, intersect, merge


def test_merge_overlapping_unsorted():
    merged = merge([Interval(5, 8), Interval(0, 3), Interval(2, 4)])
    assert merged == [Interval(0, 4), Interval(5, 8)]


def test_merge_closed_intervals_sharing_a_point():
    assert merge([Interval(1, 2, "both"), Interval(0, 1, "both")]) == [Interval(0, 2, "both")]


def test_merge_drops_empty_and_nested():
    assert merge([Interval(3, 3), Interval(1, 6), Interval(2, 4)]) == [Interval(1, 6)]
    assert merge([]) == []


def test_intersect_lists():
    assert intersect([Interval(0, 5)], [Interval(3, 8)]) == [Interval(3, 5)]
    assert intersect([Interval(0, 2)], [Interval(5, 6)]) == []


def test_difference_cuts_a_hole():
    assert difference([Interval(0, 10)], [Interval(3, 5)]) == [Interval(0, 3), Interval(5, 10)]


def test_difference_edges():
    assert difference([Interval(0, 2)], [Interval(5, 6)]) == [Interval(0, 2)]
    assert difference([Interval(0, 4)], [Interval(-1, 9)]) == []
    assert difference([Interval(0, 4)], [Interval(2, 9)]) == [Interval(0, 2)]
