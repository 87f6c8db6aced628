"""ISO 8601 week numbers and business-day counting."""

from .arith import days_between, weekday, add_days
from .core import day_of_year, is_leap


def iso_weeks_in_year(year):
    """Return the number of ISO weeks (52 or 53) in ``year``.

    A year has 53 weeks when it starts on a Thursday, or when it is a leap
    year starting on a Wednesday.
    """
    jan1 = weekday(year, 1, 1)
    if jan1 == 3 or (jan1 == 2 and is_leap(year)):
        return 53
    return 52


def iso_week(year, month, day):
    """Return ``(iso_year, week)`` for a date, following ISO 8601.

    Days in early January may belong to the last week of the previous ISO
    year, and days in late December to week 1 of the next one.
    """
    iso_day = weekday(year, month, day) + 1
    week = (day_of_year(year, month, day) - iso_day + 10) // 7
    if week < 1:
        return (year - 1, iso_weeks_in_year(year - 1))
    if week > iso_weeks_in_year(year):
        return (year + 1, 1)
    return (year, week)


def business_days_between(start, end):
    """Count Monday-Friday days in the half-open range ``[start, end)``.

    Returns a negative count if ``end`` is before ``start``.
    """
    total = days_between(start, end)
    if total < 0:
        return -business_days_between(end, start)
    full_weeks, rest = divmod(total, 7)
    count = full_weeks * 5
    current = add_days(start, full_weeks * 7)
    for _ in range(rest):
        if weekday(*current) < 5:
            count += 1
        current = add_days(current, 1)
    return count
