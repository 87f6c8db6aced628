from calendarx import business_days_between, iso_week, iso_weeks_in_year


def test_iso_week_mid_year():
    assert iso_week(2024, 7, 4) == (2024, 27)
    assert iso_week(2023, 6, 15) == (2023, 24)
    assert iso_week(2024, 1, 1) == (2024, 1)


def test_iso_weeks_in_year():
    assert iso_weeks_in_year(2015) == 53
    assert iso_weeks_in_year(2026) == 53
    assert iso_weeks_in_year(2023) == 52
    assert iso_weeks_in_year(2021) == 52


def test_business_days_full_weeks():
    assert business_days_between((2024, 7, 8), (2024, 7, 15)) == 5
    assert business_days_between((2024, 7, 8), (2024, 7, 22)) == 10


def test_business_days_partial_week():
    assert business_days_between((2024, 7, 8), (2024, 7, 12)) == 4
    assert business_days_between((2024, 7, 7), (2024, 7, 13)) == 5
    assert business_days_between((2024, 7, 8), (2024, 7, 8)) == 0


def test_business_days_reversed():
    assert business_days_between((2024, 7, 15), (2024, 7, 8)) == -5
