"""Shift parameters of the API: 'next' or an ISO shift start resolved to a shift id the panel can forecast, and
the local window of a shift.

A forecast for shift t uses the panel's history before t only, so any shift from the second of the panel to the
first one after its data can be asked for. Windows are memoised: a calendar's shifts never change, and the
calendar's polars conversions cost milliseconds per call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from features.calendar import ShiftCalendar
from features.panel import CountPanel
from serving.errors import FieldError


@dataclass(frozen=True)
class ResolvedShift:
    shift_id: int
    requested: str
    after_data: bool


@dataclass(frozen=True)
class ShiftTimes:
    start: datetime  # local, with its UTC offset
    end: datetime
    hours: float


@lru_cache(maxsize=16384)
def shift_times(calendar: ShiftCalendar, shift_id: int) -> ShiftTimes:
    """A shift's window in local time."""
    row = calendar.bounds([shift_id]).row(0, named=True)
    return ShiftTimes(row["start_local"], row["end_local"], float(row["hours"]))


def shift_start_local(panel: CountPanel, shift_id: int) -> datetime:
    return shift_times(panel.calendar, int(shift_id)).start


@lru_cache(maxsize=16384)
def _shift_of(calendar: ShiftCalendar, moment_utc: datetime) -> int:
    return calendar.shift_of(moment_utc)


_CURRENT: dict[ShiftCalendar, tuple[datetime, datetime, int]] = {}  # calendar -> the shift 'now' was last in


def current_shift(calendar: ShiftCalendar, now: datetime) -> int:
    """The shift containing ``now`` (start <= now < end), reusing the last answer while now stays inside it."""
    last = _CURRENT.get(calendar)
    if last is not None and last[0] <= now < last[1]:
        return last[2]
    shift_id = calendar.shift_of(now)
    window = shift_times(calendar, shift_id)
    _CURRENT[calendar] = (window.start, window.end, shift_id)
    return shift_id


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="minutes")


def resolve_shift(panel: CountPanel, requested: str, now: datetime) -> ResolvedShift:
    """'next' or the ISO start of a shift -> shift id within [first_shift + 1, end_shift]."""
    cal = panel.calendar
    lo, hi = panel.first_shift + 1, panel.end_shift
    text = requested.strip()
    if text.lower() == "next":
        upcoming = current_shift(cal, now) + 1  # as ShiftCalendar.next_shift
        if upcoming > hi:  # the panel stops before now: the next shift the data allows
            return ResolvedShift(hi, requested, True)
        if upcoming < lo:
            raise FieldError("shift", f"the next shift after now ({_iso(now)}) is before the panel's data, which starts "
                                      f"{_iso(shift_start_local(panel, panel.first_shift))}")
        return ResolvedShift(upcoming, requested, False)
    # an unencoded '+' in a query string arrives as a space: 2020-02-10T14:00:00 05:00
    text = re.sub(r"(T[\d:.]+) (\d{2}(:?\d{2})?)$", r"\1+\2", text)
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=ZoneInfo(cal.timezone))
        moment_utc = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise FieldError("shift", f"{requested!r} is neither 'next' nor an ISO 8601 shift start such as "
                                  f"{_iso(shift_start_local(panel, hi))}") from None
    first, last = shift_start_local(panel, lo), shift_start_local(panel, hi)
    if not first <= moment_utc <= last:
        raise FieldError("shift", f"{requested} is outside the shifts this panel can forecast: from {_iso(first)} to "
                                  f"{_iso(last)} (the first shift after the data)")
    shift_id = _shift_of(cal, moment_utc)
    start = shift_start_local(panel, shift_id)
    if start != moment_utc:
        raise FieldError("shift", f"{requested} is not the start of a shift; shifts start at {', '.join(cal.labels)} "
                                  f"{cal.timezone} time, and the shift containing it starts at {_iso(start)}")
    return ResolvedShift(shift_id, requested, False)
