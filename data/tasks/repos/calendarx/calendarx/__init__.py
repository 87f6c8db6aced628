"""calendarx: proleptic Gregorian calendar arithmetic without ``datetime``.

Dates are plain ``(year, month, day)`` tuples.  Weekdays are numbered
Monday=0 ... Sunday=6, and ordinals count days with 0001-01-01 as day 1.
"""

from .core import day_of_year, days_in_month, days_in_year, is_leap, validate
from .arith import add_business_days, add_days, days_between, from_ordinal, to_ordinal, weekday
from .weeks import business_days_between, iso_week, iso_weeks_in_year

__all__ = [
    "add_business_days",
    "add_days",
    "business_days_between",
    "day_of_year",
    "days_between",
    "days_in_month",
    "days_in_year",
    "from_ordinal",
    "is_leap",
    "iso_week",
    "iso_weeks_in_year",
    "to_ordinal",
    "validate",
    "weekday",
]
