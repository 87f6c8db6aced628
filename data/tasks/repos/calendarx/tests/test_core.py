import pytest

from calendarx import day_of_year, days_in_month, days_in_year, is_leap, validate


def test_is_leap_common_cases():
    assert is_leap(2024)
    assert is_leap(1996)
    assert not is_leap(2023)
    assert not is_leap(1900)
    assert not is_leap(2100)


def test_days_in_year():
    assert days_in_year(2024) == 366
    assert days_in_year(2023) == 365


def test_days_in_month():
    assert days_in_month(2023, 1) == 31
    assert days_in_month(2023, 2) == 28
    assert days_in_month(2024, 2) == 29
    assert days_in_month(2023, 4) == 30
    with pytest.raises(ValueError):
        days_in_month(2023, 13)


def test_validate():
    assert validate(2024, 2, 29) == (2024, 2, 29)
    with pytest.raises(ValueError):
        validate(2023, 2, 29)
    with pytest.raises(ValueError):
        validate(2023, 4, 31)
    with pytest.raises(ValueError):
        validate(0, 1, 1)


def test_day_of_year():
    assert day_of_year(2023, 1, 1) == 1
    assert day_of_year(2023, 3, 1) == 60
    assert day_of_year(2024, 3, 1) == 61
    assert day_of_year(2023, 12, 31) == 365
