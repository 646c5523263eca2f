"""FastAPI dependencies: settings, the shared stores, the clock, and API-key authentication by role.

Every dependency is ``async``: FastAPI then runs it on the event loop instead of a thread-pool round trip each.
Work that may block (the first model refresh, verifying a key not seen in the last seconds) is sent to the thread
pool from inside them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from features.panel import CountPanel
from features.settings import Settings
from serving.areas import AreaNames
from serving.audit import AuditLog, refusal_entry
from serving.errors import ApiError
from serving.forecasts import ForecastService
from serving.keys import KeyStore, Permission, Principal, roles_with
from serving.metrics import ServiceMetrics
from serving.models_store import CityState, LoadedModel, ModelStore
from serving.patrols import PatrolLog

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="API key (hsk_...) of a planner, "
                              "analyst, auditor or admin.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_models(request: Request) -> ModelStore:
    """The model store; a refresh that is due starts in a background thread (never waited for), and only the
    very first one (an app started without its lifespan) runs in line, in the thread pool."""
    store: ModelStore = request.app.state.models
    if store.refreshed:
        store.maybe_refresh()
    else:
        await run_in_threadpool(store.maybe_refresh)
    return store


@dataclass(frozen=True)
class ForecastServices:
    """What the forecast routes use, as one dependency. FastAPI resolves each dependency of a request anew (tens
    of microseconds each, whatever it returns), and a cached forecast is otherwise little more than that
    bookkeeping: one node instead of five."""

    models: ModelStore
    forecasts: ForecastService
    audit: AuditLog
    areas: AreaNames
    settings: Settings


async def get_forecast_services(request: Request) -> ForecastServices:
    state = request.app.state
    return ForecastServices(await get_models(request), state.forecasts, state.audit, state.areas, state.settings)


async def get_audit(request: Request) -> AuditLog:
    return request.app.state.audit


async def get_forecasts(request: Request) -> ForecastService:
    return request.app.state.forecasts


async def get_patrols(request: Request) -> PatrolLog:
    return request.app.state.patrols


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_areas(request: Request) -> AreaNames:
    return request.app.state.areas


async def get_now() -> datetime:
    """The clock ('next' shift); tests override it with app.dependency_overrides."""
    return datetime.now(UTC)


def require(permission: Permission) -> Callable[..., Awaitable[Principal]]:
    """Dependency: the caller's key must be valid (else 401) and its role must allow ``permission`` (else 403).
    A key verified in the last seconds is checked on the event loop (a hash and a lookup), others in the thread
    pool (a database read); a refusal's audit entry is awaited on the loop like every other entry."""

    async def _check(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> Principal:
        keys: KeyStore = request.app.state.keys  # read here, not as sub-dependencies: each costs per request
        audit: AuditLog = request.app.state.audit

        async def refuse(status: int, reason: str) -> ApiError:
            try:  # refused requests are audited too; a failing log must not turn a 401 into a 500
                await audit.record_async(*refusal_entry(key, request.url.path, status, reason))
            except Exception:  # noqa: BLE001
                pass
            return ApiError(status, reason)

        if not key:
            raise await refuse(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        found = keys.recently_verified(key) or await run_in_threadpool(keys.verify, key)
        if found is None:
            raise await refuse(401, "invalid or revoked API key")
        principal = Principal(*found)
        if not principal.can(permission):
            allowed = ", ".join(role.value for role in roles_with(permission))
            raise await refuse(403, f"role {principal.role.value!r} may not access {permission.value}; this needs "
                                    f"one of: {allowed}")
        return principal

    return _check


def city_state(models: ModelStore, city: str) -> CityState:
    """The city's state, 404 when there is no panel for it."""
    state = models.get(city)
    if state is None:
        known = ", ".join(models.cities()) or "none: run `hotspots panel <source>` first"
        raise ApiError(404, f"unknown city {city!r}; cities with a panel: {known}")
    return state


def ready_state(state: CityState) -> CityState:
    """503 with what to run when the city has no usable model or panel."""
    if not state.ready:
        raise _not_ready(state)
    return state


def ready_panel(state: CityState) -> CountPanel:
    """The city's panel; 503 as :func:`ready_state` when it cannot be read (no model needed)."""
    if state.panel is None:
        raise _not_ready(state)
    return state.panel


def ready_model(state: CityState) -> LoadedModel:
    """The city's champion; 503 as :func:`ready_state` when the city cannot be served."""
    if state.model is None or not state.ready:
        raise _not_ready(state)
    return state.model


def _not_ready(state: CityState) -> ApiError:
    return ApiError(503, state.message or f"{state.city} cannot be served ({state.status})", headers={"Retry-After": "60"})


Settings_ = Annotated[Settings, Depends(get_settings)]
Models = Annotated[ModelStore, Depends(get_models)]
Audit = Annotated[AuditLog, Depends(get_audit)]
Forecasts = Annotated[ForecastService, Depends(get_forecasts)]
Now = Annotated[datetime, Depends(get_now)]
Planner = Annotated[Principal, Depends(require(Permission.forecasts))]
Analyst = Annotated[Principal, Depends(require(Permission.models))]
Auditor = Annotated[Principal, Depends(require(Permission.audit))]
Patrols = Annotated[PatrolLog, Depends(get_patrols)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
Areas = Annotated[AreaNames, Depends(get_areas)]
Services = Annotated[ForecastServices, Depends(get_forecast_services)]
PatrolRecorder = Annotated[Principal, Depends(require(Permission.patrols))]
PatrolReader = Annotated[Principal, Depends(require(Permission.patrol_log))]
