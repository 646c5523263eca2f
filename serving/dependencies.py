"""FastAPI dependencies: settings, the shared stores, the clock, and API-key authentication by role.

Dependencies that only read app state are ``async``: FastAPI then runs them on the event loop instead of a
thread-pool round trip each. Those that may block (the model refresh, key verification) stay plain functions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from features.panel import CountPanel
from features.settings import Settings
from serving.areas import AreaNames
from serving.audit import AuditLog
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


def get_models(request: Request) -> ModelStore:
    store: ModelStore = request.app.state.models
    store.maybe_refresh()
    return store


async def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


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


def require(permission: Permission) -> Callable[..., Principal]:
    """Dependency: the caller's key must be valid (else 401) and its role must allow ``permission`` (else 403)."""

    def _check(request: Request, key: Annotated[str | None, Security(api_key_header)],
               keys: Annotated[KeyStore, Depends(get_keys)], audit: Annotated[AuditLog, Depends(get_audit)]) -> Principal:
        def refuse(status: int, reason: str):
            try:  # refused requests are audited too; a failing log must not turn a 401 into a 500
                audit.record_refusal(key, request.url.path, status, reason)
            except Exception:  # noqa: BLE001
                pass
            return ApiError(status, reason)

        if not key:
            raise refuse(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        found = keys.verify(key)
        if found is None:
            raise refuse(401, "invalid or revoked API key")
        principal = Principal(*found)
        if not principal.can(permission):
            allowed = ", ".join(role.value for role in roles_with(permission))
            raise refuse(403, f"role {principal.role.value!r} may not access {permission.value}; this needs one of: "
                              f"{allowed}")
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
PatrolRecorder = Annotated[Principal, Depends(require(Permission.patrols))]
PatrolReader = Annotated[Principal, Depends(require(Permission.patrol_log))]
