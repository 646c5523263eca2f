"""The hotspot service (FastAPI).

Run it with ``uvicorn serving.app:create_app --factory`` (settings from ``HOTSPOTS_*`` variables and
``hotspots.toml``). Probes: ``/healthz`` (the process answers) and ``/readyz`` (which cities have a champion
loaded, which version, and whether it came from the local fallback copy). The API lives under ``/v1`` and
needs an ``X-API-Key``.

Place-based only: responses hold cells, expected counts, ranks and model metadata, never incident records.
"""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from features.settings import Settings, get_settings
from serving.accuracy import AccuracyRecords
from serving.areas import AreaNames
from serving.audit import AuditLog
from serving.db import Database
from serving.dependencies import Models
from serving.docs import install_docs
from serving.errors import install_handlers
from serving.forecasts import ForecastService
from serving.keys import KeyStore
from serving.limits import RequestLimitsMiddleware
from serving.metrics import AccuracyCollector, MetricsMiddleware, ServiceMetrics
from serving.metrics import router as metrics_router
from serving.model_cards import ModelCards
from serving.models_store import ModelStore, public_message
from serving.patrols import PatrolLog
from serving.routers import audit, cities, diagnostics, forecast, hotspots, models, patrols, transparency
from serving.routers import map as map_page
from serving.schemas import CityReadiness, Health, Readiness

log = logging.getLogger("hotspots.serving")
API_VERSION = "v1"

probes = APIRouter(tags=["probes"])


@probes.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health()


@probes.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "No city can be served."}},
            summary="Readiness: cities with a loaded champion, their versions, fallback use")
def readyz(request: Request, store: Models) -> JSONResponse:
    accuracy: AccuracyRecords = request.app.state.accuracy
    cities = []
    for city, state in sorted(store.snapshot().items()):
        record = accuracy.cached(city) if state.ready else None  # never computed here: the last record
        if state.ready:
            accuracy.maybe_refresh(city)
        cities.append(CityReadiness(city=city, ready=state.ready, status=state.status, model_name=state.registered_name,
                                    model_version=state.model.version if state.model else None,
                                    model_source=state.model.source if state.model else None,
                                    message=public_message(state), degraded=bool(record and record.degraded),
                                    degraded_reasons=record.reasons if record else []))
    reachable = store.registry_reachable and store.registry_present()  # a registry file removed since the refresh
    ready = any(c.ready for c in cities)
    body = Readiness(ready=ready, registry_reachable=reachable,
                     registry_error=None if reachable else "the model registry cannot be read (details in the "
                                                           "service log)", cities=cities,
                     status="not_ready" if not ready else ("degraded" if any(c.degraded for c in cities) else "ready"))
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            app.state.models.refresh()
        except Exception:  # noqa: BLE001 - start anyway; /readyz tells what is missing
            log.exception("initial model refresh failed")
        # area names take seconds per city (polygon joins): computed beside the first requests, not in them
        threading.Thread(target=app.state.areas.warm, args=(app.state.models.snapshot(),), name="area-names",
                         daemon=True).start()
        # The long-lived objects (models, panels, libraries: millions) leave the collector's generations, so
        # full collections no longer stall a request for ~0.2 s every few thousand requests (the p99).
        gc.collect()
        gc.freeze()
        yield
        app.state.db.dispose()

    app = FastAPI(
        title="hotspots",
        version="0.1.0",
        summary="Place-based crime hotspot forecasts per H3 cell and patrol shift (never people, never incidents).",
        lifespan=lifespan,
        docs_url=None,  # served from the package below, not from a CDN
        redoc_url=None,
    )
    db = Database.for_settings(settings)
    app.state.settings = settings
    app.state.db = db
    app.state.keys = KeyStore(db)
    app.state.audit = AuditLog(db)
    app.state.models = ModelStore(settings, refresh_seconds=settings.model_refresh_seconds)
    app.state.metrics = ServiceMetrics(app.state.models.snapshot)
    app.state.patrols = PatrolLog(db)
    app.state.areas = AreaNames(settings)
    app.state.forecasts = ForecastService(settings.forecast_cache_size, metrics=app.state.metrics)
    app.state.models.warm = app.state.forecasts.warm  # a new champion is swapped in with its forecasts computed
    app.state.model_cards = ModelCards(app.state.models, ttl_seconds=settings.model_refresh_seconds)
    app.state.accuracy = AccuracyRecords(db, app.state.models, settings)
    app.state.metrics.add_collector(AccuracyCollector(app.state.accuracy))
    install_handlers(app)
    app.add_middleware(RequestLimitsMiddleware, keys=app.state.keys, audit_refusal=app.state.audit.record_refusal)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_docs(app)

    app.include_router(probes)
    app.include_router(metrics_router)
    v1 = APIRouter(prefix=f"/{API_VERSION}")
    for module in (cities, hotspots, forecast, models, diagnostics, audit, patrols):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(map_page.router)
    app.include_router(transparency.router)
    app.mount("/static", StaticFiles(directory=map_page.STATIC_DIR), name="static")
    return app
