"""The forecast service: run the champion on a shift, rank the cells, and cache forecasts and response bodies.

Cells are ranked with the project's tie rule (:func:`forecasting.metrics.rank_cells`) and selected by count (k)
or by area share (:func:`forecasting.metrics.cells_for_coverage`), exactly as the backtest does.

Forecasts are cached per (city, shift, category, model version, panel files): a new champion or an updated
panel gives new keys, and old entries age out of the LRU. A cached forecast is immutable, so the bodies made
from it (per endpoint, shift as asked, k or coverage) are cached too, in a byte-bounded LRU: a cache hit
serialises nothing. Each worker process has its own caches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from features.panel import CountPanel
from forecasting.metrics import cells_for_coverage, rank_cells
from serving.caches import BodyCache, ComputeOnceCache
from serving.explanations import Explanations
from serving.models_store import CityState, LoadedModel
from serving.predictor import predict_shift
from serving.priority import ColdForecasts

if TYPE_CHECKING:
    from serving.metrics import ServiceMetrics


log = logging.getLogger("hotspots.serving")
WARM_FORECASTS = 8  # per city: the recently asked forecasts a new champion computes before it is swapped in
WARM_EXPLAINED = 20  # and the cells it explains in each: the default k, or as many as were recently shown
RANKED_ENTRIES = 12  # whole rankings kept serialised (JSON ~3 MB, GeoJSON ~5 MB, ranked ids 0.1 MB for 6,000 cells)


@dataclass(frozen=True)
class Forecast:
    city: str
    shift_id: int
    category: str
    model: LoadedModel
    expected: np.ndarray  # (n_cells,)
    order: np.ndarray  # cell indices, best first
    percentile: np.ndarray  # (n_cells,) % of cells with expected <= this cell's
    explanations: Explanations = field(repr=False, compare=False)
    key: Hashable = None  # the forecast cache's key (city, shift, category, model version, panel files)

    def top_features(self, cells: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per cell: the largest |contribution| terms first."""
        return self.explanations.top(cells)


class ForecastService:
    def __init__(self, cache_size: int = 256, metrics: ServiceMetrics | None = None,
                 body_cache_bytes: int = 64 * 2**20):
        self.cache: ComputeOnceCache[Forecast] = ComputeOnceCache(cache_size)
        self.bodies = BodyCache(body_cache_bytes, max_item_bytes=body_cache_bytes // 16)
        # a forecast's whole ranking as JSON items per format (a few MB each): city-wide selections are slices
        self.ranked: ComputeOnceCache[tuple[bytes, np.ndarray]] = ComputeOnceCache(RANKED_ENTRIES)
        self.metrics = metrics  # cache hits/misses and cold compute seconds, when the app measures them
        self.cold = ColdForecasts()  # cold forecasts under way: bulk bodies wait for them (serving.priority)
        self._model_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # city -> recently asked (shift, category), in order -> the most cells shown with explanations
        self._recent: dict[str, dict[tuple[int, str], int]] = {}

    def _model_lock(self, model: LoadedModel) -> threading.Lock:
        with self._locks_guard:
            return self._model_locks.setdefault((model.name, model.version), threading.Lock())

    @staticmethod
    def _key(state: CityState, shift_id: int, category: str) -> Hashable:
        return (state.city, shift_id, category, _ready(state)[1].version, state.panel_token)

    def cached(self, state: CityState, shift_id: int, category: str) -> Forecast | None:
        """The forecast when it is already computed (a lookup: safe on the event loop), else None."""
        forecast = self.cache.peek(self._key(state, shift_id, category))
        if forecast is not None:
            self._looked_up(state.city, shift_id, category, hit=True)
        return forecast

    def forecast(self, state: CityState, shift_id: int, category: str) -> tuple[Forecast, bool]:
        """(forecast, cache hit)."""
        key = self._key(state, shift_id, category)
        forecast, hit = self.cache.get_or_compute(key, lambda: self._compute(state, shift_id, category, key))
        self._looked_up(state.city, shift_id, category, hit)
        return forecast, hit

    def _looked_up(self, city: str, shift_id: int, category: str, hit: bool) -> None:
        """A forecast was asked for: remember it (a new champion warms it up) and count the cache hit or miss."""
        self._remember(city, shift_id, category)
        if self.metrics is not None:
            self.metrics.forecast_lookup(city, hit)

    def _remember(self, city: str, shift_id: int, category: str) -> None:
        with self._locks_guard:
            recent = self._recent.setdefault(city, {})
            recent[(shift_id, category)] = recent.pop((shift_id, category), 0)
            while len(recent) > WARM_FORECASTS:
                del recent[next(iter(recent))]

    def explaining(self, forecast: Forecast, cells: int) -> None:
        """A response shows ``cells`` explained cells of ``forecast``: a new champion explains as many when it
        warms this shift up, so the first such request after a swap finds them computed (pred_contrib costs about
        1 ms a cell: 50 cells would otherwise be 50 ms on that request)."""
        with self._locks_guard:
            recent = self._recent.get(forecast.city, {})
            key = (forecast.shift_id, forecast.category)
            if key in recent:
                recent[key] = max(recent[key], cells)

    def warm(self, state: CityState) -> None:
        """Compute, with ``state``'s model and panel, the forecasts recently asked of its city and the
        explanations of their first cells (as many as were shown, at least WARM_EXPLAINED): called by the model
        store before it swaps ``state`` in."""
        with self._locks_guard:
            recent = list(self._recent.get(state.city, {}).items())
        panel, model = _ready(state)
        for (shift_id, category), shown in reversed(recent):  # the most recent first
            if category != model.target or not panel.first_shift <= shift_id <= panel.end_shift:
                continue  # the new model forecasts another category, or the panel changed
            key = self._key(state, shift_id, category)
            try:
                forecast, _ = self.cache.get_or_compute(key, partial(self._compute, state, shift_id, category, key))
                forecast.top_features(forecast.order[:max(WARM_EXPLAINED, shown)])
            except Exception:  # noqa: BLE001 - the request will compute it (and report the failure) itself
                log.exception("warming %s shift %s with version %s failed", state.city, shift_id, model.version)

    async def bulk_turn(self) -> None:
        """A bulk body's turn: after the cold forecasts under way (at most ``cold.max_wait``), the wait measured."""
        waited = await self.cold.bulk_turn()
        if self.metrics is not None:
            self.metrics.bulk_waited(waited)

    def body(self, forecast: Forecast, variant: Hashable, make: Callable[[], bytes]) -> bytes:
        """The response body ``variant`` (endpoint, parameters as asked) of a forecast, made once and kept."""
        return self.bodies.get_or_make((forecast.key, forecast.model.source, variant), make)

    def cached_body(self, forecast: Forecast, variant: Hashable) -> bytes | None:
        """The body ``variant`` when it is already made (a lookup), else None."""
        return self.bodies.peek((forecast.key, forecast.model.source, variant))

    def _compute(self, state: CityState, shift_id: int, category: str, key: Hashable = None) -> Forecast:
        panel, model = _ready(state)
        lock = self._model_lock(model)
        with lock:  # one LightGBM call per model at a time
            started = time.perf_counter()  # the work, not the wait for the lock
            expected, explain_rows = predict_shift(model.forecaster, panel, shift_id)
        order = rank_cells(expected, shift_id)[0]
        percentile = 100.0 * np.searchsorted(np.sort(expected), expected, side="right") / expected.size
        if self.metrics is not None:
            self.metrics.forecast_computed(state.city, time.perf_counter() - started)
        return Forecast(state.city, shift_id, category, model, expected, order, percentile,
                        Explanations(expected.size, explain_rows), key)


def _ready(state: CityState) -> tuple[CountPanel, LoadedModel]:
    """The panel and model of a city the routes checked as ready (ready_panel, ready_model) before asking."""
    if state.panel is None or state.model is None:
        raise ValueError(f"{state.city} has no panel or no model to forecast with ({state.status})")
    return state.panel, state.model


def select_cells(panel: CountPanel, forecast: Forecast, k: int | None, coverage: float | None, default_k: int) -> int:
    if coverage is not None:
        return cells_for_coverage(panel.study_area.areas_km2, forecast.order, coverage)
    return k if k is not None else min(default_k, panel.n_cells)
