"""Leap years, month lengths and day-of-year."""

_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_leap(year):
    """Return True if ``year`` is a leap year in the Gregorian calendar."""
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in_year(year):
    """Return 366 for leap years and 365 otherwise."""
    return 366 if is_leap(year) else 365


def days_in_month(year, month):
    """Return the number of days in ``month`` (1-12) of ``year``."""
    if not 1 <= month <= 12:
        raise ValueError(f"month must be in 1..12, got {month}")
    if month == 2 and is_leap(year):
        return 29
    return _MONTH_DAYS[month - 1]


def validate(year, month, day):
    """Raise ``ValueError`` unless ``(year, month, day)`` is a real date.

    Returns the date as a tuple for convenience.
    """
    if year < 1:
        raise ValueError(f"year must be >= 1, got {year}")
    if not 1 <= day <= days_in_month(year, month):
        raise ValueError(f"day {day} is out of range for {year}-{month:02d}")
    return (year, month, day)


def day_of_year(year, month, day):
    """Return the 1-based day number within the year (1 Jan is 1)."""
    validate(year, month, day)
    return sum(days_in_month(year, m) for m in range(1, month)) + day
