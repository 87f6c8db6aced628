"""Ordinal conversion, adding days and weekdays."""

from .core import day_of_year, days_in_month, validate


def _days_before_year(year):
    """Number of days in all years before ``year`` (year 1 starts at 0)."""
    y = year - 1
    return y * 365 + y // 4 - y // 100 + y // 400


def to_ordinal(year, month, day):
    """Return the ordinal of a date; 0001-01-01 is 1."""
    return _days_before_year(year) + day_of_year(year, month, day)


def from_ordinal(n):
    """Return the ``(year, month, day)`` tuple for ordinal ``n`` (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"ordinal must be >= 1, got {n}")
    year = n * 400 // 146097 + 1
    while _days_before_year(year) >= n:
        year -= 1
    while _days_before_year(year + 1) < n:
        year += 1
    remaining = n - _days_before_year(year)
    month = 1
    while remaining > days_in_month(year, month):
        remaining -= days_in_month(year, month)
        month += 1
    return (year, month, remaining)


def add_days(date, n):
    """Return the date ``n`` days after ``date`` (``n`` may be negative)."""
    return from_ordinal(to_ordinal(*date) + n)


def days_between(start, end):
    """Return the number of days from ``start`` to ``end`` (negative if end is earlier)."""
    return to_ordinal(*end) - to_ordinal(*start)


def weekday(year, month, day):
    """Return the day of the week, Monday=0 ... Sunday=6."""
    return (to_ordinal(year, month, day) + 6) % 7


def add_business_days(date, n):
    """Return the date ``n`` business days (Mon-Fri) after ``date``.

    ``n`` must be non-negative.  If ``date`` falls on a weekend, counting
    starts from it as usual, so the result is always a business day when
    ``n > 0``.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    validate(*date)
    current = date
    while n > 0:
        current = add_days(current, 1)
        if weekday(*current) < 5:
            n -= 1
    return current
