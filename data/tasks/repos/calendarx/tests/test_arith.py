import pytest

from calendarx import add_business_days, add_days, days_between, from_ordinal, to_ordinal, weekday


def test_to_ordinal():
    assert to_ordinal(1, 1, 1) == 1
    assert to_ordinal(2024, 1, 1) == 738886


def test_from_ordinal_roundtrip():
    assert from_ordinal(1) == (1, 1, 1)
    for date in [(2024, 1, 1), (2023, 6, 15), (1987, 10, 19), (2024, 2, 14)]:
        assert from_ordinal(to_ordinal(*date)) == date
    with pytest.raises(ValueError):
        from_ordinal(0)


def test_add_days():
    assert add_days((2024, 3, 10), 5) == (2024, 3, 15)
    assert add_days((2023, 12, 30), 5) == (2024, 1, 4)
    assert add_days((2024, 3, 5), -10) == (2024, 2, 24)
    assert add_days((2023, 2, 20), 0) == (2023, 2, 20)


def test_days_between():
    assert days_between((2024, 1, 1), (2024, 3, 1)) == 60
    assert days_between((2024, 3, 1), (2024, 1, 1)) == -60
    assert days_between((2023, 1, 1), (2024, 1, 1)) == 365


def test_weekday():
    assert weekday(1, 1, 1) == 0
    assert weekday(2024, 7, 4) == 3
    assert weekday(1999, 12, 31) == 4
    assert weekday(2023, 6, 15) == 3


def test_add_business_days():
    assert add_business_days((2024, 7, 8), 3) == (2024, 7, 11)
    assert add_business_days((2024, 7, 8), 0) == (2024, 7, 8)
    with pytest.raises(ValueError):
        add_business_days((2024, 7, 8), -1)
