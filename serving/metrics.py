"""Prometheus metrics of the service, served at ``GET /metrics`` (no key: it is the operator's scraper's).

What is measured: requests and their latency by route *template* (``/v1/models/{city}``, never the raw path),
method and status; forecast cache lookups (hit or miss) and the seconds a cold forecast takes; patrol rows
recorded; and, read at scrape time, which champion version each city serves and whether it is ready. Labels
carry route templates, methods, status codes and city names only: no key ids, cells, forecasts or parameters.

Each app gets its own registry, so tests that build several apps do not collide. With several uvicorn workers
set ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable folder before the service starts: every worker then writes
its counters there and ``/metrics`` (answered by any worker) sums them with prometheus_client's multiprocess
collector. The champion and readiness figures are those of the worker that answers the scrape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.routing import replace_params
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.models_store import CityState

if TYPE_CHECKING:
    from serving.accuracy import AccuracyRecords

log = logging.getLogger("hotspots.serving")

UNMATCHED = "<unmatched>"  # requests no route matched (404 from the router): one label, whatever the path
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMPUTE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
BULK_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def multiprocess_dir() -> str | None:
    """The multiprocess folder when prometheus_client runs in multiprocess mode (decided when it is imported)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if folder and values.ValueClass is values.MutexValue:
        log.warning("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: metrics stay per process")
        return None
    return folder


class ChampionCollector(Collector):
    """Read at scrape time from the model store: the champion each city serves, and whether it can be served."""

    def __init__(self, snapshot: Callable[[], dict[str, CityState]]):
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        info = InfoMetricFamily("hotspots_champion_model", "Champion model version served per city.",
                                labels=["city"])
        ready = GaugeMetricFamily("hotspots_city_ready", "1 when the city can be forecast (panel and champion loaded).",
                                  labels=["city"])
        for city, state in sorted(self.snapshot().items()):
            ready.add_metric([city], 1.0 if state.ready else 0.0)
            if state.model is not None:
                info.add_metric([city], {"version": state.model.version, "source": state.model.source,
                                         "model_name": state.model.name})
        yield info
        yield ready


class AccuracyCollector(Collector):
    """Read at scrape time from the last accuracy records (serving.accuracy; a stale one is recomputed in the
    background, never during the scrape): realised hit rate and PAI, the baseline's, the backtest band, and
    the drift alarms (1 = fired)."""

    def __init__(self, records: AccuracyRecords):
        self.records = records

    def describe(self):
        return []

    def collect(self):
        gauges = {name: GaugeMetricFamily(f"hotspots_{name}", text, labels=labels) for name, text, labels in (
            ("realised_hit_rate", "Share of the scored shifts' incidents in the cells the service flagged.",
             ["city", "window"]),
            ("realised_pai", "Realised hit rate over the flagged area share.", ["city", "window"]),
            ("realised_baseline_hit_rate", "The strongest baseline's hit rate flagging as many cells on the same shifts.",
             ["city", "window"]),
            ("realised_scored_shifts", "Served shifts scored (over, with their incidents in the panel).", ["city"]),
            ("backtest_hit_rate_low", "Lower end of the backtest's 95% hit-rate interval at the compared coverage.",
             ["city"]),
            ("backtest_hit_rate_high", "Upper end of that interval.", ["city"]),
            ("drift_alarm", "1 when the drift check fired (hit_rate, volume, category_mix).", ["city", "kind"]),
            ("degraded", "1 when any drift alarm fired: /readyz says degraded.", ["city"]),
        )}
        for city, state in sorted(self.records.models.snapshot().items()):
            if not state.ready:
                continue
            self.records.maybe_refresh(city)
            record = self.records.cached(city)
            if record is None:
                continue
            for window in (record.rolling, record.overall):
                label = [city, "rolling" if window.days else "overall"]
                for name, value in (("realised_hit_rate", window.hit_rate), ("realised_pai", window.pai),
                                    ("realised_baseline_hit_rate", window.baseline_hit_rate)):
                    if value is not None:
                        gauges[name].add_metric(label, value)
            gauges["realised_scored_shifts"].add_metric([city], record.scored_shifts)
            if record.backtest is not None:
                gauges["backtest_hit_rate_low"].add_metric([city], record.backtest.hit_rate_low)
                gauges["backtest_hit_rate_high"].add_metric([city], record.backtest.hit_rate_high)
            for alarm in record.drift:
                gauges["drift_alarm"].add_metric([city, alarm.kind], 1.0 if alarm.fired else 0.0)
            gauges["degraded"].add_metric([city], 1.0 if record.degraded else 0.0)
        yield from gauges.values()


class ServiceMetrics:
    """The service's metrics, in a registry of their own (or in the multiprocess folder)."""

    def __init__(self, snapshot: Callable[[], dict[str, CityState]]):
        self.multiprocess_dir = multiprocess_dir()
        # multiprocess mode: values live in the folder's files; objects are registered nowhere (no collisions)
        self.registry = None if self.multiprocess_dir else CollectorRegistry(auto_describe=True)
        self.champions = ChampionCollector(snapshot)
        self.collectors: list[Collector] = [self.champions]  # read at scrape time (add_collector adds more)
        if self.registry is not None:
            self.registry.register(self.champions)
        r = self.registry
        self.requests = Counter("hotspots_http_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("hotspots_http_request_duration_seconds",
                                 "Request latency (until the response is sent) by route template, method and status.",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("hotspots_forecast_cache_lookups", "Forecast cache lookups by city and result (hit, miss).",
                             ["city", "result"], registry=r)
        self.compute = Histogram("hotspots_forecast_compute_seconds", "Seconds to compute a forecast not in the cache.",
                                 ["city"], buckets=COMPUTE_BUCKETS, registry=r)
        self.bulk_wait = Histogram("hotspots_bulk_wait_seconds", "Seconds a bulk response (more cells than are "
                                   "explained, every cell of /v1/forecast, or a PNG) waited for other requests' cold "
                                   "forecasts.",
                                   buckets=BULK_WAIT_BUCKETS, registry=r)
        self.patrol_rows = Counter("hotspots_patrol_rows_recorded", "Patrol log rows recorded (cell x shift reports).",
                                   ["city"], registry=r)

    def add_collector(self, collector: Collector) -> None:
        """Another scrape-time collector (the accuracy records), in both the per-process and multiprocess modes."""
        self.collectors.append(collector)
        if self.registry is not None:
            self.registry.register(collector)

    # --- hooks ---------------------------------------------------------------------------------------------
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        labels = (route, method if method in METHODS else "OTHER", str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def forecast_lookup(self, city: str, hit: bool) -> None:
        self.cache.labels(city, "hit" if hit else "miss").inc()

    def forecast_computed(self, city: str, seconds: float) -> None:
        self.compute.labels(city).observe(seconds)

    def bulk_waited(self, seconds: float) -> None:
        self.bulk_wait.observe(seconds)

    def patrols_recorded(self, city: str, rows: int) -> None:
        self.patrol_rows.labels(city).inc(rows)

    # --- exposition ----------------------------------------------------------------------------------------
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): Prometheus text format, or OpenMetrics when the scraper asks for it."""
        if self.registry is not None:
            registry = self.registry
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            for collector in self.collectors:
                registry.register(collector)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


def route_template(scope: Scope, root_path: str = "") -> str:
    """The matched route's path template with any router prefix, e.g. ``/v1/models/{city}``.

    The route's own ``path_format`` may lack the prefixes of the routers it was included in, so the prefix is
    taken from the request path: the path minus the route's part rebuilt from the path parameters. A mounted
    app (static files) leaves no route but moves ``root_path`` (``root_path`` = its value before routing)."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not template:
        mounted = scope.get("root_path", "")
        return f"{mounted}/{{path}}" if scope.get("endpoint") is not None and mounted != root_path else UNMATCHED
    path = scope.get("path", "")
    try:
        own, _ = replace_params(template, getattr(route, "param_convertors", {}), dict(scope.get("path_params") or {}))
    except Exception:  # noqa: BLE001 - an odd route: the template without its prefix still groups requests
        return template
    return path[: len(path) - len(own)] + template if own and path.endswith(own) else template


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body buffering): time and count every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        root_path = scope.get("root_path", "")

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:  # an exception escaping the app is a 500 for the client
            self.metrics.observe_request(route_template(scope, root_path), scope.get("method", "OTHER"), status,
                                         time.perf_counter() - started)


# --- the endpoint ------------------------------------------------------------------------------------------

router = APIRouter(tags=["probes"])
OPENMETRICS = "application/openmetrics-text"


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (no key; no forecasts, no personal data)",
            responses={200: {"description": "Prometheus text exposition format (OpenMetrics when asked for in Accept).",
                             "content": {CONTENT_TYPE_PLAIN_0_0_4.split(";")[0]: {"schema": {"type": "string"}},
                                         OPENMETRICS: {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(content=body, media_type=content_type, headers={"Cache-Control": "no-store"})
