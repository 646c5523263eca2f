"""The patrol log: which cells were patrolled in a shift, and for how many minutes (the "dose").

Planners report it through ``POST /v1/patrols``; the feedback-loop diagnostics read it back with
:func:`patrol_log` to relate recorded crime to patrol presence (patrols find crime where they look).

A row holds the city, the shift (id and UTC start), the cell, the minutes, the reporting key's id and when it was
stored: no unit, officer or note, no free text. The table is append-only (see :mod:`serving.db`): reporting the
same cell and shift again adds a row, and every reader sums the doses. A report and its audit entry are written
in one transaction: no patrol row without its audit trail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import h3
import numpy as np
import polars as pl
from fastapi.exceptions import RequestValidationError
from sqlalchemy import func, insert, select

from features.panel import CountPanel
from serving.chain import chain_insert
from serving.db import Database, IdempotencyRow, OverrideRow, PatrolRow, as_utc
from serving.errors import FieldError
from serving.keys import Principal
from serving.schemas import OverrideRequest, PatrolRequest

MAX_PROBLEMS = 50  # per response: enough to fix a batch, small enough to read
SCHEMA = {"shift_id": pl.Int64, "h3": pl.String, "dose_minutes": pl.Float64}
OVERRIDE_SCHEMA = {"shift_id": pl.Int64, "h3": pl.String, "reason": pl.String, "code": pl.String}


@dataclass(frozen=True)
class PatrolBatch:
    """A checked report: canonical cell ids and doses for one shift of one city."""

    city: str
    shift_id: int
    start_utc: datetime
    start_local: datetime
    end_local: datetime
    hours: float
    timezone: str
    h3_ids: list[str]
    doses: np.ndarray

    @property
    def total_minutes(self) -> float:
        return float(self.doses.sum())


# --- checking a report --------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="minutes" if moment.second == moment.microsecond == 0 else "auto")


def utc_instant(field: str, moment: datetime, tz: str, location: str = "body") -> datetime:
    """``moment`` in UTC (naive: in the city's time zone); a 422 on ``field`` when it cannot be."""
    local = moment if moment.tzinfo is not None else moment.replace(tzinfo=ZoneInfo(tz))
    try:
        return local.astimezone(UTC)
    except (OverflowError, ValueError):
        raise FieldError(field, f"{moment.isoformat()} cannot be converted to UTC", location=location) from None


def patrol_shift(panel: CountPanel, requested: datetime, now: datetime) -> int:
    """The shift starting at ``requested`` (naive: city local time), from the panel's first shift to the next
    shift after now; a 422 on ``shift`` otherwise."""
    cal = panel.calendar
    moment = requested if requested.tzinfo is not None else requested.replace(tzinfo=ZoneInfo(cal.timezone))
    moment_utc = utc_instant("shift", requested, cal.timezone)
    lo, hi = panel.first_shift, cal.next_shift(now)
    bounds = cal.bounds([lo, hi])["start_local"]
    first, last = bounds[0], bounds[1]
    if moment_utc < first:
        raise FieldError("shift", f"{_iso(moment)} is before the panel's first shift ({_iso(first)}): patrols are "
                                  f"recorded from there on", location="body")
    if moment_utc > last:
        raise FieldError("shift", f"{_iso(moment)} is after the next shift ({_iso(last)}): patrols are recorded for "
                                  f"past shifts and the next one only", location="body")
    shift_id = cal.shift_of(moment_utc)
    start = cal.bounds([shift_id])["start_local"][0]
    if start != moment_utc:
        raise FieldError("shift", f"{_iso(moment)} is not the start of a shift; shifts start at "
                                  f"{', '.join(cal.labels)} {cal.timezone} time, and the shift containing it starts "
                                  f"at {_iso(start)}", location="body")
    return shift_id


def _cell_problem(city: str, panel: CountPanel, given: str) -> str:
    """Why a cell id was refused (only called for the refused ones)."""
    text = given.strip().lower()
    resolution = panel.study_area.resolution
    try:
        valid = h3.is_valid_cell(text)
    except (OverflowError, ValueError, TypeError):  # e.g. '-1' or more than 64 bits
        valid = False
    if not valid:
        return f"{given!r} is not an H3 cell id"
    if h3.get_resolution(text) != resolution:
        return f"{given!r} is a resolution-{h3.get_resolution(text)} cell; {city} uses resolution {resolution}"
    return f"{given!r} is outside {city}'s study area ({panel.n_cells} cells, see /v1/cities)"


def _check_cells(panel: CountPanel, city: str, ids: list[str], where: str, hint: str,
                 problems: list[dict[str, Any]]) -> np.ndarray:
    """Row index of each given cell id; a problem (field ``where[i].h3``) for each unknown or repeated one."""
    given = pl.Series("h3", ids, dtype=pl.String)
    ints = given.str.strip_chars().str.to_lowercase().str.to_integer(base=16, strict=False)
    cells = ints.fill_null(0).cast(pl.UInt64, strict=False).fill_null(0).to_numpy()
    index = panel.study_area.index_of(cells)
    for i in np.flatnonzero(index < 0)[:MAX_PROBLEMS].tolist():
        problems.append({"loc": ("body", where, i, "h3"), "msg": f"h3: {_cell_problem(city, panel, given[i])}",
                         "type": "value_error"})
    repeated = ~pl.Series(index).is_first_distinct().to_numpy() & (index >= 0)  # second and later occurrences
    for i in np.flatnonzero(repeated)[:MAX_PROBLEMS].tolist():
        first = int(np.flatnonzero(index == index[i])[0])
        problems.append({"loc": ("body", where, i, "h3"),
                         "msg": f"h3: cell {given[i]!r} is already at {where}[{first}]; send one entry per cell {hint}",
                         "type": "value_error"})
    return index


@dataclass(frozen=True)
class OverrideBatch:
    """A checked override report: cells of one shift that were flagged but not patrolled, with their reasons."""

    city: str
    shift_id: int
    start_utc: datetime
    start_local: datetime
    end_local: datetime
    hours: float
    timezone: str
    h3_ids: list[str]
    reasons: list[str]
    codes: list[str | None]


def check_overrides(panel: CountPanel, request: OverrideRequest, now: datetime) -> OverrideBatch:
    """As :func:`check_patrols`: the shift (past shifts and the next one) and the cells, all problems in one 422."""
    problems: list[dict[str, Any]] = []
    try:
        shift_id: int | None = patrol_shift(panel, request.shift, now)
    except FieldError as exc:
        problems.append({"loc": ("body", "shift"), "msg": exc.message, "type": "value_error"})
        shift_id = None
    index = _check_cells(panel, request.city, [o.h3 for o in request.overrides], "overrides",
                         "with one reason", problems)
    if problems or shift_id is None:
        raise RequestValidationError(problems[:MAX_PROBLEMS])
    window = panel.calendar.bounds([shift_id]).row(0, named=True)
    ids = panel.study_area.h3_ids
    return OverrideBatch(city=request.city, shift_id=shift_id, start_utc=window["start_utc"],
                         start_local=window["start_local"], end_local=window["end_local"], hours=float(window["hours"]),
                         timezone=panel.calendar.timezone, h3_ids=[ids[i] for i in index.tolist()],
                         reasons=[o.reason for o in request.overrides], codes=[o.code for o in request.overrides])


def check_patrols(panel: CountPanel, request: PatrolRequest, now: datetime) -> PatrolBatch:
    """Validate the report against the city's panel; all problems in one 422, each naming its field."""
    problems: list[dict[str, Any]] = []
    try:
        shift_id = patrol_shift(panel, request.shift, now)
    except FieldError as exc:
        problems.append({"loc": ("body", "shift"), "msg": exc.message, "type": "value_error"})
        shift_id = None

    doses = np.array([p.dose_minutes for p in request.patrols], dtype=np.float64)
    index = _check_cells(panel, request.city, [p.h3 for p in request.patrols], "patrols", "with its total minutes",
                         problems)

    window = None
    if shift_id is not None:
        window = panel.calendar.bounds([shift_id]).row(0, named=True)
        minutes = window["hours"] * 60.0
        for i in np.flatnonzero(doses > minutes + 1e-9)[:MAX_PROBLEMS].tolist():
            problems.append({"loc": ("body", "patrols", i, "dose_minutes"),
                             "msg": f"dose_minutes: {doses[i]:g} is more than the shift's length ({minutes:g} minutes)",
                             "type": "value_error"})
    if problems or shift_id is None or window is None:  # a bad shift is one of the problems
        raise RequestValidationError(problems[:MAX_PROBLEMS])

    ids = panel.study_area.h3_ids
    return PatrolBatch(city=request.city, shift_id=shift_id, start_utc=window["start_utc"],
                       start_local=window["start_local"], end_local=window["end_local"], hours=float(window["hours"]),
                       timezone=panel.calendar.timezone, h3_ids=[ids[i] for i in index.tolist()], doses=doses)


# --- storing and reading ------------------------------------------------------------------------------


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused for a different report."""


@dataclass(frozen=True)
class Idempotency:
    key: str  # the client's Idempotency-Key
    request_hash: str  # sha256 of the report as parsed
    response: bytes  # the answer to store with it


class PatrolLog:
    def __init__(self, db: Database):
        self.db = db

    def replay(self, key_id: str, idempotency: Idempotency) -> bytes | None:
        """The stored first answer for this key and Idempotency-Key, None when there is none (a conflict when the
        key came with another report)."""
        with self.db.session() as session:
            row = session.get(IdempotencyRow, (key_id, idempotency.key))
        if row is None:
            return None
        if row.request_hash != idempotency.request_hash:
            raise IdempotencyConflict(idempotency.key)
        return bytes(row.body)

    def record(self, batch: PatrolBatch, principal: Principal, recorded_at: datetime,
               audit: dict[str, Any] | None = None, idempotency: Idempotency | None = None) -> int:
        """Insert one row per cell and, in the same transaction, the audit entry (``audit`` = endpoint, params,
        response_bytes) and the idempotency key with its answer. Returns the rows stored; raises IntegrityError
        when another request stored the same idempotency key first (nothing of this one is stored)."""
        rows = [
            {"city": batch.city, "shift_id": batch.shift_id, "shift_start": batch.start_utc, "h3": cell,
             "dose_minutes": dose, "key_id": principal.key_id, "recorded_at": recorded_at}
            for cell, dose in zip(batch.h3_ids, batch.doses.tolist())
        ]
        return self._insert("patrol_log", rows, batch.city, principal, recorded_at, audit, idempotency)

    def record_overrides(self, batch: OverrideBatch, principal: Principal, recorded_at: datetime,
                         audit: dict[str, Any] | None = None, idempotency: Idempotency | None = None) -> int:
        """As :meth:`record`, into the override table (its own hash chain)."""
        rows = [
            {"city": batch.city, "shift_id": batch.shift_id, "shift_start": batch.start_utc, "h3": cell,
             "reason": reason, "code": code, "key_id": principal.key_id, "recorded_at": recorded_at}
            for cell, reason, code in zip(batch.h3_ids, batch.reasons, batch.codes)
        ]
        return self._insert("patrol_overrides", rows, batch.city, principal, recorded_at, audit, idempotency)

    def _insert(self, table: str, rows: list[dict[str, Any]], city: str, principal: Principal, recorded_at: datetime,
                audit: dict[str, Any] | None, idempotency: Idempotency | None) -> int:
        with self.db.engine.begin() as conn:
            if idempotency is not None:  # first: a concurrent duplicate fails here, before any log row
                conn.execute(insert(IdempotencyRow), {
                    "key_id": principal.key_id, "idempotency_key": idempotency.key,
                    "request_hash": idempotency.request_hash, "status": 201, "body": idempotency.response,
                    "created_at": recorded_at})
            chain_insert(conn, table, rows)
            if audit is not None:
                chain_insert(conn, "audit_log", [dict(
                    at=recorded_at, key_id=principal.key_id, role=principal.role.value, endpoint=audit["endpoint"],
                    params=json.dumps(audit["params"], sort_keys=True, default=str), city=city,
                    model_version=None, response_bytes=int(audit["response_bytes"]))])
        return len(rows)

    def totals(self, city: str, start: datetime | None = None, end: datetime | None = None,
               start_shift: int | None = None, end_shift: int | None = None,
               limit: int | None = None) -> pl.DataFrame:
        """Dose summed per (shift, cell), oldest shift first: shift_id, shift_start (UTC), h3, dose_minutes.
        ``start``/``end`` bound the shift's start instant, ``start_shift``/``end_shift`` its id ([start, end))."""
        query = (select(PatrolRow.shift_id, func.min(PatrolRow.shift_start), PatrolRow.h3,
                        func.sum(PatrolRow.dose_minutes))
                 .where(PatrolRow.city == city)
                 .group_by(PatrolRow.shift_id, PatrolRow.h3)
                 .order_by(PatrolRow.shift_id, PatrolRow.h3))
        if start is not None:
            query = query.where(PatrolRow.shift_start >= start.astimezone(UTC))
        if end is not None:
            query = query.where(PatrolRow.shift_start < end.astimezone(UTC))
        if start_shift is not None:
            query = query.where(PatrolRow.shift_id >= start_shift)
        if end_shift is not None:
            query = query.where(PatrolRow.shift_id < end_shift)
        if limit is not None:
            query = query.limit(limit)
        with self.db.session() as session:
            rows = session.execute(query).all()
        shift_id, shift_start, cell, dose = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
        return pl.DataFrame({
            "shift_id": pl.Series(shift_id, dtype=pl.Int64),
            # SQLite returns aggregate datetimes as text, PostgreSQL as aware datetimes
            "shift_start": pl.Series([as_utc(_as_datetime(v)) for v in shift_start], dtype=pl.Datetime("us", "UTC")),
            "h3": pl.Series(cell, dtype=pl.String),
            "dose_minutes": pl.Series(dose, dtype=pl.Float64),
        })


    def overrides(self, city: str, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
        """Override rows in the order recorded: shift_id, h3, reason, code (``start``/``end`` bound the shift's
        start instant, [start, end))."""
        query = (select(OverrideRow.shift_id, OverrideRow.h3, OverrideRow.reason, OverrideRow.code)
                 .where(OverrideRow.city == city).order_by(OverrideRow.id))
        if start is not None:
            query = query.where(OverrideRow.shift_start >= start.astimezone(UTC))
        if end is not None:
            query = query.where(OverrideRow.shift_start < end.astimezone(UTC))
        with self.db.session() as session:
            rows = session.execute(query).all()
        return pl.DataFrame([tuple(r) for r in rows], schema=OVERRIDE_SCHEMA, orient="row")


def _as_datetime(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def patrol_log(db: Database, city: str, start_shift: int | None = None, end_shift: int | None = None) -> pl.DataFrame:
    """Patrol dose per shift and cell for shifts in [start_shift, end_shift): ``shift_id`` (int64), ``h3`` (str),
    ``dose_minutes`` (float64, every report summed). Empty (same schema) when nothing was recorded."""
    return PatrolLog(db).totals(city, start_shift=start_shift, end_shift=end_shift).select(list(SCHEMA))
