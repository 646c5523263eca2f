"""The patrol log: planners record which cells were patrolled in a shift and for how long; analysts read the
totals back. Only cells, minutes and shifts: no free text, no people."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import polars as pl
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from forecasting.patrol_dose import override_summary
from serving.audit import AuditLog
from serving.db import utcnow
from serving.dependencies import Audit, Metrics, Models, Now, PatrolReader, PatrolRecorder, Patrols, city_state, ready_panel
from serving.errors import ApiError, FieldError
from serving.keys import Principal
from serving.models_store import CityState, ModelStore
from serving.patrols import (
    Idempotency,
    IdempotencyConflict,
    PatrolLog,
    check_overrides,
    check_patrols,
    utc_instant,
)
from serving.routers.hotspots import ERRORS
from serving.schemas import (
    OverrideReasonCount,
    OverrideReceipt,
    OverrideRequest,
    OverrideSummaryResponse,
    PatrolQuery,
    PatrolReceipt,
    PatrolRequest,
    PatrolShift,
    PatrolTotal,
    PatrolTotals,
)

router = APIRouter(tags=["patrols"])

POST_ERRORS: dict[int | str, dict[str, Any]] = {
    401: ERRORS[401],
    403: {**ERRORS[403], "description": "The key's role may not record patrols."},
    404: ERRORS[404],
    422: {**ERRORS[422], "description": "Bad shift, h3 cell or dose_minutes (the message names the field and entry)."},
    503: {**ERRORS[503], "description": "The city's panel cannot be read, or the log cannot be written."},
}
GET_ERRORS = {**POST_ERRORS, 403: {**ERRORS[403], "description": "The key's role may not read the patrol log."},
              422: {**ERRORS[422], "description": "Bad city, start, end or limit (the message names it)."}}


def _panel_state(models: ModelStore, city: str) -> CityState:
    """The city (404 if unknown) with a readable panel (503 otherwise); no champion model is needed."""
    state = city_state(models, city)
    if state.panel is None:
        raise ApiError(503, state.message or f"the panel of {city} cannot be read ({state.status})",
                       headers={"Retry-After": "60"})
    return state


# A retried report with the same key is answered from the first one and stores nothing again.
IdempotencyKey = Annotated[str | None, Header(max_length=200, description=(
    "Any unique string per report (e.g. a UUID): a retry with the same key returns the first "
    "answer and stores nothing again."))]


@router.post("/patrols", status_code=201, response_model=PatrolReceipt, responses=POST_ERRORS,
             summary="Record the patrol minutes spent in cells during a shift (append-only)")
def record_patrols(request: Request, body: PatrolRequest, principal: PatrolRecorder, models: Models,
                   patrols: Patrols, metrics: Metrics, now: Now,
                   idempotency_key: IdempotencyKey = None) -> Response:
    state = _panel_state(models, body.city)
    batch = check_patrols(ready_panel(state), body, now)
    pending = None
    if idempotency_key:
        request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        pending = Idempotency(idempotency_key, request_hash, b"")
        first = _replay(patrols, principal.key_id, pending)
        if first is not None:
            return first
    recorded_at = utcnow()
    receipt = PatrolReceipt(
        city=batch.city, count=len(batch.h3_ids), total_minutes=batch.total_minutes, recorded_at=recorded_at,
        shift=PatrolShift(shift_id=batch.shift_id, start=batch.start_local, end=batch.end_local, hours=batch.hours,
                          timezone=batch.timezone),
    )
    content = receipt.model_dump_json().encode("utf-8")
    params = {"city": batch.city, "shift": body.shift.isoformat(), "shift_id": batch.shift_id,
              "shift_start": batch.start_local.isoformat(), "n_cells": len(batch.h3_ids),
              "total_minutes": batch.total_minutes}  # no cell list: a count is enough for the audit trail
    if pending is not None:
        pending = Idempotency(pending.key, pending.request_hash, content)
    try:
        rows = patrols.record(batch, principal, recorded_at, idempotency=pending,
                              audit={"endpoint": request.url.path, "params": params, "response_bytes": len(content)})
    except IntegrityError:  # the same Idempotency-Key stored by a concurrent request first
        first = _replay(patrols, principal.key_id, pending) if pending is not None else None
        if first is None:
            raise ApiError(503, "the patrol log cannot be written; nothing was stored, try again") from None
        return first
    except Exception as exc:  # noqa: BLE001 - a database problem is the operator's: say so, never a bare 500
        raise ApiError(503, "the patrol log cannot be written; nothing was stored, try again") from exc
    metrics.patrols_recorded(batch.city, rows)
    return Response(content=content, status_code=201, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _replay(patrols: PatrolLog, key_id: str, pending: Idempotency) -> Response | None:
    """The first answer to this Idempotency-Key (marked as a replay), None when there is none."""
    try:
        first = patrols.replay(key_id, pending)
    except IdempotencyConflict:
        raise FieldError("Idempotency-Key", f"{pending.key!r} was already used for another report: send a new key "
                                            f"for a new report", location="header") from None
    if first is None:
        return None
    return Response(content=first, status_code=201, media_type="application/json",
                    headers={"Cache-Control": "no-store", "Idempotent-Replayed": "true"})


def _bound(field: str, moment: datetime | None, tz: str) -> datetime | None:
    """A query bound in the city's time zone when it has no offset, checked to have a UTC instant."""
    if moment is None:
        return None
    utc_instant(field, moment, tz, location="query")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=ZoneInfo(tz))


def _query_window(models: ModelStore, query: PatrolQuery) -> tuple[str, datetime | None, datetime | None]:
    """The city's time zone and the query's [start, end) as aware datetimes (local when given without an offset)."""
    tz = ready_panel(_panel_state(models, query.city)).calendar.timezone
    start, end = _bound("start", query.start, tz), _bound("end", query.end, tz)
    if start is not None and end is not None and end <= start:
        raise FieldError("end", f"{end.isoformat()} is not after start ({start.isoformat()})")
    return tz, start, end


@router.get("/patrols", response_model=PatrolTotals, responses=GET_ERRORS,
            summary="Patrol minutes per shift and cell (every report summed), oldest shift first")
def patrol_totals(request: Request, principal: PatrolReader, query: Annotated[PatrolQuery, Query()], models: Models,
                  patrols: Patrols, audit: Audit) -> Response:
    tz, start, end = _query_window(models, query)
    try:
        frame = patrols.totals(query.city, start=start, end=end, limit=query.limit + 1)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "the patrol log cannot be read; try again") from exc
    truncated = frame.height > query.limit
    frame = frame.head(query.limit).with_columns(pl.col("shift_start").dt.convert_time_zone(tz))
    body = PatrolTotals(
        city=query.city, start=start, end=end, count=frame.height, total_minutes=float(frame["dose_minutes"].sum()),
        truncated=truncated, patrols=[PatrolTotal(**row) for row in frame.iter_rows(named=True)],
    )
    params = {"city": query.city, "start": start and start.isoformat(), "end": end and end.isoformat(),
              "limit": query.limit, "rows": frame.height}
    return _audited(request, audit, principal, query.city, params, body.model_dump_json().encode("utf-8"))


def _audited(request: Request, audit: AuditLog, principal: Principal, city: str, params: dict[str, Any],
             content: bytes) -> Response:
    """The patrol log read back, sent only once its audit entry is written."""
    try:
        audit.record(principal, request.url.path, params, len(content), city=city)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "the audit log cannot be written; the patrol log is not served without an audit entry") from exc
    return Response(content=content, media_type="application/json", headers={"Cache-Control": "private, no-store"})


OVERRIDE_ERRORS = {**POST_ERRORS, 422: {**ERRORS[422], "description": "Bad shift, h3 cell, reason or code (the "
                                                                      "message names the field and entry)."}}


@router.post("/patrols/overrides", status_code=201, response_model=OverrideReceipt, responses=OVERRIDE_ERRORS,
             summary="Record flagged cells that were NOT patrolled in a shift, and why (append-only; no free text)")
def record_overrides(request: Request, body: OverrideRequest, principal: PatrolRecorder, models: Models,
                     patrols: Patrols, now: Now,
                     idempotency_key: IdempotencyKey = None) -> Response:
    state = _panel_state(models, body.city)
    batch = check_overrides(ready_panel(state), body, now)
    pending = None
    if idempotency_key:
        request_hash = hashlib.sha256(b"overrides:" + body.model_dump_json().encode()).hexdigest()
        pending = Idempotency(idempotency_key, request_hash, b"")
        first = _replay(patrols, principal.key_id, pending)
        if first is not None:
            return first
    recorded_at = utcnow()
    by_reason = {reason: batch.reasons.count(reason) for reason in sorted(set(batch.reasons))}
    receipt = OverrideReceipt(
        city=batch.city, count=len(batch.h3_ids), by_reason=by_reason, recorded_at=recorded_at,
        shift=PatrolShift(shift_id=batch.shift_id, start=batch.start_local, end=batch.end_local, hours=batch.hours,
                          timezone=batch.timezone),
    )
    content = receipt.model_dump_json().encode("utf-8")
    params = {"city": batch.city, "shift": body.shift.isoformat(), "shift_id": batch.shift_id,
              "shift_start": batch.start_local.isoformat(), "n_cells": len(batch.h3_ids), "by_reason": by_reason}
    if pending is not None:
        pending = Idempotency(pending.key, pending.request_hash, content)
    try:
        patrols.record_overrides(batch, principal, recorded_at, idempotency=pending,
                                 audit={"endpoint": request.url.path, "params": params, "response_bytes": len(content)})
    except IntegrityError:  # the same Idempotency-Key stored by a concurrent request first
        first = _replay(patrols, principal.key_id, pending) if pending is not None else None
        if first is None:
            raise ApiError(503, "the patrol log cannot be written; nothing was stored, try again") from None
        return first
    except SQLAlchemyError as exc:  # a database problem is the operator's: say so, never a bare 500
        raise ApiError(503, "the patrol log cannot be written; nothing was stored, try again") from exc
    return Response(content=content, status_code=201, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


@router.get("/patrols/overrides", response_model=OverrideSummaryResponse, responses=GET_ERRORS,
            summary="The share of flagged cells not patrolled, by reason (flags = cell-shifts with a patrol dose or "
                    "an override recorded)")
def override_totals(request: Request, principal: PatrolReader, query: Annotated[PatrolQuery, Query()], models: Models,
                    patrols: Patrols, audit: Audit) -> Response:
    tz, start, end = _query_window(models, query)
    try:
        summary = override_summary(patrols.overrides(query.city, start, end),
                                   patrols.totals(query.city, start=start, end=end))
    except SQLAlchemyError as exc:
        raise ApiError(503, "the patrol log cannot be read; try again") from exc
    body = OverrideSummaryResponse(
        city=query.city, start=start, end=end, flags=summary.flags, not_patrolled=summary.not_patrolled,
        share_not_patrolled=summary.share_not_patrolled if summary.flags else None,
        by_reason=[OverrideReasonCount(**row) for row in summary.by_reason.iter_rows(named=True)],
        contradicted=summary.contradicted, flags_source=summary.flags_source)
    params = {"city": query.city, "start": start and start.isoformat(), "end": end and end.isoformat()}
    return _audited(request, audit, principal, query.city, params, body.model_dump_json().encode("utf-8"))
