"""What the forecast routes share: checking a request against the city's panel and model, the context block
of a response, and the audited response.

The CPU-heavy parts (feature building and predicting on a cache miss, serialising or drawing a body) run in the
thread pool, never on the event loop, so one slow forecast does not hold up the other requests (``/healthz``
included). A request whose forecast and body are cached does only lookups, so it stays on the event loop and
awaits its audit entry's commit there: no thread-pool trip (each costs thread hand-overs under the GIL). Bulk
bodies wait for the cold forecasts under way (serving.priority)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from features.panel import CountPanel
from serving.audit import AuditLog
from serving.checks import check_category, check_k, resolve_category
from serving.dependencies import city_state, ready_model, ready_panel
from serving.errors import ApiError
from serving.forecasts import Forecast, ForecastService
from serving.keys import Principal
from serving.models_store import CityState, ModelStore
from serving.priority import SMALL_BODY_BYTES, ColdShare
from serving.schemas import ForecastContext, ModelRef, ShiftWindow, _Query
from serving.shifts import ResolvedShift, resolve_shift, shift_start_local, shift_times

log = logging.getLogger("hotspots.serving")
FORECAST_HEADERS = {"Cache-Control": "private, no-store"}


@dataclass(frozen=True)
class Prepared:
    state: CityState
    shift: ResolvedShift
    category: str
    forecast: Forecast
    cache_hit: bool

    @property
    def panel(self) -> CountPanel:
        """The city's panel (:func:`checked` made sure there is one)."""
        return ready_panel(self.state)


def checked(models: ModelStore, query: _Query, now: datetime, k: int | None = None, coverage: float | None = None,
            max_k: int | None = None) -> tuple[CityState, ResolvedShift, str]:
    """Checks in the order a caller can act on: city (404), parameters against the panel (422), a champion
    (503), the category against the model (422). Lookups and date arithmetic only: safe on the event loop."""
    state = city_state(models, query.city)
    panel = ready_panel(state)
    shift = resolve_shift(panel, query.shift, now)
    check_k(panel, k, coverage, max_k)
    check_category(panel, query.category, state.city)
    model = ready_model(state)
    return state, shift, resolve_category(model, query.category, state.city)


def _forecast(forecasts: ForecastService, state: CityState, shift: ResolvedShift, category: str) -> Prepared:
    try:
        forecast, hit = forecasts.forecast(state, shift.shift_id, category)
    except Exception as exc:  # noqa: BLE001 - a model that cannot run on this panel: say so, never a bare 500
        log.exception("forecast failed for %s at shift %s", state.city, shift.shift_id)
        model = ready_model(state)
        raise ApiError(503, f"the champion model of {state.city} (version {model.version}) failed on shift "
                            f"{shift.shift_id}: {type(exc).__name__}: {exc}") from exc
    return Prepared(state, shift, category, forecast, hit)


async def prepare_off_loop(models: ModelStore, forecasts: ForecastService, query: _Query, now: datetime,
                           cold: ColdShare, k: int | None = None, coverage: float | None = None,
                           max_k: int | None = None) -> Prepared:
    """:func:`checked`, then the forecast: from the cache on the event loop, or computed in the thread pool
    on a miss (features of the shift and the model over every cell: seconds of CPU). A miss counts in the
    request's ``cold`` share: from then on, bulk bodies wait for it (serving.priority)."""
    state, shift, category = checked(models, query, now, k, coverage, max_k)
    forecast = forecasts.cached(state, shift.shift_id, category)
    if forecast is not None:
        return Prepared(state, shift, category, forecast, True)
    cold.missed()
    return await run_in_threadpool(_forecast, forecasts, state, shift, category)


async def respond(request: Request, forecasts: ForecastService, audit: AuditLog, principal: Principal, p: Prepared,
                  variant: Hashable, make: Callable[[], bytes], params: dict[str, Any],
                  media_type: str = "application/json", flagged: list[str] | str | None = None,
                  bulk_share: ColdShare | None = None) -> Response:
    """The body ``variant`` of the forecast (from the body cache, else made in the thread pool), audited (the
    request awaits its entry's commit on the event loop, holding no thread), then sent; ``flagged`` (the H3 ids a
    hotspots response hands out, or their JSON array) goes into the audit row for the accuracy record.

    A bulk body (megabytes, or a drawing: ``bulk_share`` is then the request's share of the cold forecasts) waits
    for the other requests' cold forecasts first, unless it is already made and small (serving.priority)."""
    content = forecasts.cached_body(p.forecast, variant)
    if bulk_share is not None and (content is None or len(content) > SMALL_BODY_BYTES):
        bulk_share.release()  # its own forecast is computed: it must not wait for itself
        await forecasts.bulk_turn()
    if content is None:
        content = await run_in_threadpool(forecasts.body, p.forecast, variant, make)
    try:
        await audit.record_async(principal, request.url.path, params, len(content), city=p.state.city,
                                 model_version=p.forecast.model.version, flagged=flagged)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "the audit log cannot be written; forecasts are not served without an audit entry") from exc
    return _response(content, p, media_type)


def context(p: Prepared) -> dict[str, Any]:
    panel, model = p.panel, p.forecast.model
    window = shift_times(panel.calendar, p.shift.shift_id)
    return ForecastContext(
        city=p.state.city,
        category=p.category,
        shift=ShiftWindow(shift_id=p.shift.shift_id, requested=p.shift.requested, start=window.start,
                          end=window.end, hours=window.hours, timezone=panel.calendar.timezone,
                          after_data=p.shift.after_data),
        model=ModelRef(name=model.name, version=model.version, source=model.source, target=model.target),
        data_end=shift_start_local(panel, panel.end_shift),
    ).model_dump()


def audit_params(p: Prepared, query: _Query, **extra: Any) -> dict[str, Any]:
    params = {"city": query.city, "shift": query.shift, "shift_id": p.shift.shift_id,
              "shift_start": shift_start_local(p.panel, p.shift.shift_id).isoformat(), "category": p.category,
              "model_source": p.forecast.model.source, "after_data": p.shift.after_data}
    params.update({k: v for k, v in extra.items() if v is not None})
    return params


def _response(content: bytes, p: Prepared, media_type: str) -> Response:
    headers = {**FORECAST_HEADERS, "X-Cache": "hit" if p.cache_hit else "miss", "X-Model-Version": p.forecast.model.version}
    return Response(content=content, media_type=media_type, headers=headers)
