"""Patrol shifts: local-time windows numbered consecutively, correct across daylight-saving changes.

A shift id is ``local_day * shifts_per_day + shift_of_day`` where ``local_day`` counts local calendar days
from 1970-01-01. Shift boundaries are local wall-clock times, so a shift spanning a DST change lasts 7 or 9
hours; a boundary that falls in the spring-forward gap starts when the clock reaches the next valid time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

EPOCH = date(1970, 1, 1)


def localize(naive: pl.Expr, tz: str) -> pl.Expr:
    """Local wall-clock time -> UTC. Ambiguous (fall-back) times take the first occurrence; times that do
    not exist (spring-forward gap) move forward by an hour, as a clock would read them."""
    first = naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    shifted = (naive + pl.duration(hours=1)).dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    return pl.coalesce(first, shifted).dt.convert_time_zone("UTC")


def parse_starts(starts: list[str] | tuple[str, ...]) -> tuple[int, ...]:
    """'06:00' -> minutes after midnight; sorted, unique, at least one."""
    minutes = []
    for text in starts:
        try:
            hh, mm = str(text).split(":")
            value = int(hh) * 60 + int(mm)
        except ValueError:
            raise ValueError(f"shift start {text!r} is not HH:MM") from None
        if not 0 <= value < 24 * 60:
            raise ValueError(f"shift start {text!r} is outside 00:00-23:59")
        minutes.append(value)
    if not minutes or len(set(minutes)) != len(minutes):
        raise ValueError(f"shift starts must be distinct and non-empty, got {starts!r}")
    return tuple(sorted(minutes))


@dataclass(frozen=True)
class ShiftCalendar:
    timezone: str
    starts: tuple[int, ...] = (6 * 60, 14 * 60, 22 * 60)  # minutes after local midnight

    @classmethod
    def from_strings(cls, tz: str, starts: list[str] | tuple[str, ...]) -> ShiftCalendar:
        return cls(tz, parse_starts(starts))

    @property
    def per_day(self) -> int:
        return len(self.starts)

    @property
    def labels(self) -> list[str]:
        return [f"{m // 60:02d}:{m % 60:02d}" for m in self.starts]

    # --- timestamps -> shifts --------------------------------------------------------------------
    def shift_ids(self, occurred_at: pl.Series) -> np.ndarray:
        """Shift id of each UTC timestamp (vectorised). Assigned by instant: start(s) <= t < start(s+1)."""
        local = occurred_at.dt.convert_time_zone(self.timezone)
        frame = pl.DataFrame({"t": occurred_at}).with_columns(
            local.dt.date().cast(pl.Int32).alias("day"),
            (local.dt.hour().cast(pl.Int32) * 60 + local.dt.minute().cast(pl.Int32)).alias("minute"),
        )
        day = frame["day"].to_numpy()
        minute = frame["minute"].to_numpy()
        idx = np.searchsorted(np.asarray(self.starts), minute, side="right") - 1
        before_first = idx < 0
        day = np.where(before_first, day - 1, day)
        idx = np.where(before_first, self.per_day - 1, idx)
        guess = day.astype(np.int64) * self.per_day + idx
        # correct the wall-clock guess by comparing instants with the true boundaries (DST edge cases)
        uniq = pl.Series(guess).unique().sort().to_numpy()
        inverse = np.searchsorted(uniq, guess)
        starts = self.starts_utc(np.concatenate([uniq, uniq + 1]))
        lo, hi = starts[: uniq.size][inverse], starts[uniq.size :][inverse]
        t = frame["t"].to_numpy()
        return (guess - (t < lo) + (t >= hi)).astype(np.int64)

    def shift_of(self, moment: datetime) -> int:
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        series = pl.Series([moment.astimezone(UTC)]).cast(pl.Datetime("us", "UTC"))
        return int(self.shift_ids(series)[0])

    def next_shift(self, now: datetime | None = None) -> int:
        """The first shift starting after ``now``: the one a planner prepares for."""
        return self.shift_of(now or datetime.now(UTC)) + 1

    # --- shifts -> times -------------------------------------------------------------------------
    def starts_utc(self, shift_ids: np.ndarray | list[int]) -> np.ndarray:
        """Start instant of each shift as numpy datetime64[us] (UTC)."""
        ids = np.asarray(shift_ids, dtype=np.int64)
        day, idx = np.divmod(ids, self.per_day)
        minutes = np.asarray(self.starts, dtype=np.int64)[idx]
        naive = (day * 86_400_000_000 + minutes * 60_000_000).astype("datetime64[us]")
        frame = pl.DataFrame({"naive": naive}).select(localize(pl.col("naive"), self.timezone))
        return frame.to_series().dt.replace_time_zone(None).to_numpy()

    def bounds(self, shift_ids: np.ndarray | list[int]) -> pl.DataFrame:
        """shift_id, start and end (UTC and local), duration in hours."""
        ids = np.asarray(shift_ids, dtype=np.int64)
        start = pl.Series("start_utc", self.starts_utc(ids)).dt.replace_time_zone("UTC")
        end = pl.Series("end_utc", self.starts_utc(ids + 1)).dt.replace_time_zone("UTC")
        return pl.DataFrame({"shift_id": ids, "start_utc": start, "end_utc": end}).with_columns(
            pl.col("start_utc").dt.convert_time_zone(self.timezone).alias("start_local"),
            pl.col("end_utc").dt.convert_time_zone(self.timezone).alias("end_local"),
            ((pl.col("end_utc") - pl.col("start_utc")).dt.total_seconds() / 3600).alias("hours"),
        )

    def shift_range(self, start: datetime, end: datetime) -> np.ndarray:
        """All shifts whose start lies in [start, end)."""
        first = self.shift_of(start)
        if self.starts_utc([first])[0] < np.datetime64(start.astimezone(UTC).replace(tzinfo=None), "us"):
            first += 1
        last = self.shift_of(end - timedelta(microseconds=1))
        return np.arange(first, last + 1, dtype=np.int64)

    def local_day(self, d: date) -> int:
        return (d - EPOCH).days

    def local_date(self, shift_id: int) -> date:
        """The local calendar day a shift starts on."""
        return EPOCH + timedelta(days=int(shift_id) // self.per_day)

    def features(self, shift_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Calendar features of the shift being forecast (known in advance, so no leakage)."""
        ids = np.asarray(shift_ids, dtype=np.int64)
        day, idx = np.divmod(ids, self.per_day)
        dates = (day.astype("datetime64[D]"))
        weekday = ((day + 3) % 7).astype(np.float32)  # 1970-01-01 was a Thursday; Monday = 0
        doy = (dates - dates.astype("datetime64[Y]")).astype(np.int64).astype(np.float32)
        month = (dates.astype("datetime64[M]").astype(np.int64) % 12 + 1).astype(np.float32)
        hours = self.bounds(ids)["hours"].to_numpy().astype(np.float32)
        angle = 2 * np.pi * doy / 365.25
        return {
            "cal_shift_of_day": idx.astype(np.float32),
            "cal_day_of_week": weekday,
            "cal_is_weekend": (weekday >= 5).astype(np.float32),
            "cal_month": month,
            "cal_doy_sin": np.sin(angle).astype(np.float32),
            "cal_doy_cos": np.cos(angle).astype(np.float32),
            "cal_shift_hours": hours,
        }
