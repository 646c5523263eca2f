"""Shift calendar: numbering, boundaries and daylight-saving transitions."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.calendar import ShiftCalendar, parse_starts

CHICAGO = ZoneInfo("America/Chicago")


def utc_series(moments):
    return pl.Series([m.astimezone(UTC) for m in moments]).cast(pl.Datetime("us", "UTC"))


def test_parse_starts_validates():
    assert parse_starts(["22:00", "06:00", "14:00"]) == (360, 840, 1320)
    with pytest.raises(ValueError, match="HH:MM"):
        parse_starts(["6am"])
    with pytest.raises(ValueError, match="distinct"):
        parse_starts(["06:00", "06:00"])


def test_default_shift_assignment_local_wall_clock():
    cal = ShiftCalendar("America/Chicago")
    moments = [
        datetime(2018, 6, 1, 5, 59, tzinfo=CHICAGO),  # previous day's night shift
        datetime(2018, 6, 1, 6, 0, tzinfo=CHICAGO),  # day shift starts
        datetime(2018, 6, 1, 13, 59, tzinfo=CHICAGO),
        datetime(2018, 6, 1, 14, 0, tzinfo=CHICAGO),
        datetime(2018, 6, 1, 23, 30, tzinfo=CHICAGO),
    ]
    ids = cal.shift_ids(utc_series(moments))
    day = (datetime(2018, 6, 1).date() - datetime(1970, 1, 1).date()).days
    assert ids.tolist() == [3 * (day - 1) + 2, 3 * day, 3 * day, 3 * day + 1, 3 * day + 2]


def test_spring_forward_night_shift_is_seven_hours():
    cal = ShiftCalendar("America/Chicago")
    # night shift 22:00 on 10 March 2018 to 06:00 on 11 March (clocks jump 02:00 -> 03:00)
    night = cal.shift_of(datetime(2018, 3, 10, 23, 0, tzinfo=CHICAGO))
    bounds = cal.bounds([night]).row(0, named=True)
    assert bounds["hours"] == 7.0
    assert bounds["start_local"].hour == 22 and bounds["end_local"].hour == 6
    # an incident at 03:30 CDT belongs to that night shift
    assert cal.shift_of(datetime(2018, 3, 11, 3, 30, tzinfo=CHICAGO)) == night


def test_fall_back_night_shift_is_nine_hours_and_both_1_30s_land_in_it():
    cal = ShiftCalendar("America/Chicago")
    night = cal.shift_of(datetime(2018, 11, 3, 23, 0, tzinfo=CHICAGO))
    assert cal.bounds([night])["hours"][0] == 9.0
    first = datetime(2018, 11, 4, 6, 30, tzinfo=UTC)  # 01:30 CDT
    second = datetime(2018, 11, 4, 7, 30, tzinfo=UTC)  # 01:30 CST
    assert cal.shift_of(first) == cal.shift_of(second) == night


def test_shift_starting_inside_the_gap_starts_when_clock_resumes():
    cal = ShiftCalendar.from_strings("America/Chicago", ["02:00", "10:00", "18:00"])
    day = (datetime(2018, 3, 11).date() - datetime(1970, 1, 1).date()).days
    start = cal.bounds([3 * day])["start_local"][0]
    assert (start.hour, start.minute) == (3, 0)
    # the clock skips 02:00-03:00, so the shift before still lasts 8 real hours and this one 7
    assert cal.bounds([3 * day - 1])["hours"][0] == 8.0
    assert cal.bounds([3 * day])["hours"][0] == 7.0


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 12, 31)),
    st.sampled_from(["America/Chicago", "America/Toronto", "Europe/London", "Australia/Sydney"]),
    st.sampled_from([["06:00", "14:00", "22:00"], ["07:00", "15:00", "23:00"], ["00:00", "12:00"], ["01:30", "09:30", "17:30"]]),
)
def test_every_instant_lies_inside_its_shift(naive, zone, starts):
    cal = ShiftCalendar.from_strings(zone, starts)
    moment = naive.replace(tzinfo=UTC)
    sid = cal.shift_of(moment)
    b = cal.bounds([sid]).row(0, named=True)
    assert b["start_utc"] <= moment < b["end_utc"]
    assert 0 < b["hours"] <= 24


def test_bounds_are_contiguous_over_a_year_with_two_dst_changes():
    cal = ShiftCalendar("America/Toronto")
    ids = cal.shift_range(datetime(2021, 1, 1, tzinfo=ZoneInfo("America/Toronto")),
                          datetime(2022, 1, 1, tzinfo=ZoneInfo("America/Toronto")))
    assert ids.size == 365 * 3 and np.all(np.diff(ids) == 1)
    b = cal.bounds(ids)
    assert (b["end_utc"].head(-1) == b["start_utc"].tail(-1)).all()
    hours = b["hours"].to_numpy()
    assert sorted(set(hours.tolist())) == [7.0, 8.0, 9.0]
    assert hours.sum() == 365 * 24
    assert (hours == 7).sum() == 1 and (hours == 9).sum() == 1


def test_next_shift_is_the_one_after_now():
    cal = ShiftCalendar("America/Chicago")
    now = datetime(2018, 6, 1, 13, 0, tzinfo=CHICAGO)
    nxt = cal.next_shift(now)
    assert cal.bounds([nxt])["start_local"][0].hour == 14


def test_calendar_features_known_day():
    cal = ShiftCalendar("America/Chicago")
    sid = cal.shift_of(datetime(2018, 7, 7, 15, 0, tzinfo=CHICAGO))  # a Saturday afternoon
    f = cal.features(np.array([sid]))
    assert f["cal_day_of_week"][0] == 5 and f["cal_is_weekend"][0] == 1
    assert f["cal_month"][0] == 7 and f["cal_shift_of_day"][0] == 1 and f["cal_shift_hours"][0] == 8
