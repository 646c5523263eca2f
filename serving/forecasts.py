"""Forecasts for the API: resolve the shift and category, run the champion, rank, explain, cache.

A forecast for shift t uses the panel's history before t only (the forecaster cuts the panel there), so any
shift from the second of the panel to the first one after its data can be asked for. Cells are ranked with
the project's tie rule (:func:`forecasting.metrics.rank_cells`) and selected by count (k) or by area share
(:func:`forecasting.metrics.cells_for_coverage`), exactly as the backtest does.

Forecasts are cached per (city, shift, category, model version, panel files): a new champion or an updated
panel gives new keys, and old entries age out of the LRU. A cached forecast is immutable, so the JSON bodies
made from it (per endpoint, shift as asked, k or coverage) are cached too, in a byte-bounded LRU: a cache hit
serialises nothing. Explanations (LightGBM ``pred_contrib``, about 1 ms per cell on a city model) are computed
for the cells a response needs, on first need, not for the whole city up front.

Each worker process has its own caches.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Hashable
from zoneinfo import ZoneInfo

import h3
import numpy as np

from features.calendar import ShiftCalendar
from features.matrix import build_features
from features.panel import CountPanel
from forecasting.metrics import cells_for_coverage, rank_cells
from serving.errors import FieldError
from serving.models_store import CityState, LoadedModel

if TYPE_CHECKING:
    from serving.metrics import ServiceMetrics

TOP_FEATURES = 3
RowsExplainer = Callable[[np.ndarray], tuple[np.ndarray, list[str]]]  # cells -> (contributions, feature names)


class Explanations:
    """The top contributing features of each cell of one forecast, computed for the cells asked for on first
    need and kept; the input rows are released once every cell is explained."""

    def __init__(self, n_cells: int, explain_rows: RowsExplainer):
        self._explain_rows: RowsExplainer | None = explain_rows
        self._done = np.zeros(n_cells, dtype=bool)
        self._index = np.zeros((n_cells, TOP_FEATURES), dtype=np.int32)
        self._value = np.zeros((n_cells, TOP_FEATURES), dtype=np.float64)
        self._names: list[str] = []
        self._lock = threading.Lock()

    def top(self, cells: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per cell (in the order given): (feature, contribution) pairs, largest |contribution| first."""
        cells = np.asarray(cells, dtype=np.int64)
        with self._lock:
            missing = np.unique(cells[~self._done[cells]])
            if missing.size:
                contrib, names = self._explain_rows(missing)
                contrib = np.asarray(contrib, dtype=np.float64).reshape(missing.size, -1)
                if names and names[-1] == "bias":
                    contrib, names = contrib[:, :-1], list(names[:-1])
                top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :TOP_FEATURES]
                self._index[missing, : top.shape[1]] = top
                self._value[missing, : top.shape[1]] = np.take_along_axis(contrib, top, axis=1)
                self._names, self._done[missing] = list(names), True
                if self._done.all():
                    self._explain_rows = None
        width = min(TOP_FEATURES, len(self._names))
        names, index, value = self._names, self._index[cells, :width].tolist(), self._value[cells, :width].tolist()
        return [[(names[j], v) for j, v in zip(js, vs)] for js, vs in zip(index, value)]


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


@dataclass(frozen=True)
class ResolvedShift:
    shift_id: int
    requested: str
    after_data: bool


class LRUCache:
    """Thread-safe LRU with one computation per key at a time (concurrent misses wait for the first)."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._data)

    def _lookup(self, key):
        if key in self._data:
            self._data.move_to_end(key)
            return True, self._data[key]
        return False, None

    def get_or_compute(self, key: Hashable, compute: Callable[[], object]) -> tuple[object, bool]:
        """(value, hit)."""
        with self._lock:
            hit, value = self._lookup(key)
            if hit:
                return value, True
            gate = self._inflight.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit, value = self._lookup(key)
                if hit:
                    return value, True
            try:
                value = compute()
                with self._lock:
                    self._data[key] = value
                    while len(self._data) > self.size:
                        self._data.popitem(last=False)
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


# --- parameters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftTimes:
    start: datetime  # local, with its UTC offset
    end: datetime
    hours: float


@lru_cache(maxsize=16384)
def shift_times(calendar: ShiftCalendar, shift_id: int) -> ShiftTimes:
    """A shift's window in local time (memoised: a calendar's shifts never change, and the calendar's polars
    conversions cost milliseconds per call)."""
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
        moment_utc = moment.astimezone(timezone.utc)
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


def check_category(panel: CountPanel, requested: str | None, city: str) -> None:
    """Reject names the panel does not know (before any model is needed)."""
    if requested is not None and requested != "all" and requested not in panel.categories:
        raise FieldError("category", f"unknown category {requested!r}; {city} has {', '.join(panel.categories)} "
                                     f"(or 'all')")


def resolve_category(model: LoadedModel, requested: str | None, city: str) -> str:
    target = model.target
    if requested is None or requested == target:
        return target
    raise FieldError("category", f"the champion model for {city} (version {model.version}) forecasts {target!r}; "
                                 f"there is no model for {requested!r}")


def check_k(panel: CountPanel, k: int | None, coverage: float | None) -> None:
    if k is not None and coverage is not None:
        raise FieldError("coverage", "k and coverage are mutually exclusive: give one of them")
    if k is not None and not 1 <= k <= panel.n_cells:
        raise FieldError("k", f"must be between 1 and {panel.n_cells} (the study area's cells), got {k}")


# --- computing ----------------------------------------------------------------------------------------


class BodyCache:
    """Thread-safe LRU of response bodies bounded by their total size in bytes."""

    def __init__(self, max_bytes: int, max_item_bytes: int):
        self.max_bytes, self.max_item_bytes = max_bytes, max_item_bytes
        self._data: OrderedDict[Hashable, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get_or_make(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._data.get(key)
            if found is not None:
                self._data.move_to_end(key)
                return found
        body = make()  # two threads may both make it: the bodies are identical
        if len(body) <= self.max_item_bytes:
            with self._lock:
                if key not in self._data:
                    self._data[key] = body
                    self._size += len(body)
                while self._size > self.max_bytes:
                    self._size -= len(self._data.popitem(last=False)[1])
        return body


class ForecastService:
    def __init__(self, cache_size: int = 256, metrics: "ServiceMetrics | None" = None,
                 body_cache_bytes: int = 64 * 2**20):
        self.cache = LRUCache(cache_size)
        self.bodies = BodyCache(body_cache_bytes, max_item_bytes=body_cache_bytes // 16)
        self.metrics = metrics  # cache hits/misses and cold compute seconds, when the app measures them
        self._model_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _model_lock(self, model: LoadedModel) -> threading.Lock:
        with self._locks_guard:
            return self._model_locks.setdefault((model.name, model.version), threading.Lock())

    def forecast(self, state: CityState, shift_id: int, category: str) -> tuple[Forecast, bool]:
        """(forecast, cache hit)."""
        model = state.model
        key = (state.city, shift_id, category, model.version, state.panel_token)
        forecast, hit = self.cache.get_or_compute(key, lambda: self._compute(state, shift_id, category, key))
        if self.metrics is not None:
            self.metrics.forecast_lookup(state.city, hit)
        return forecast, hit

    def body(self, forecast: Forecast, variant: Hashable, make: Callable[[], bytes]) -> bytes:
        """The response body ``variant`` (endpoint, parameters as asked) of a forecast, made once and kept."""
        return self.bodies.get_or_make((forecast.key, forecast.model.source, variant), make)

    def _compute(self, state: CityState, shift_id: int, category: str, key: Hashable = None) -> Forecast:
        panel, model = state.panel, state.model
        lock = self._model_lock(model)
        with lock:  # one LightGBM call per model at a time
            started = time.perf_counter()  # the work, not the wait for the lock
            expected, explain_rows = _predict(model.forecaster, panel, shift_id, lock)
        order = rank_cells(expected, shift_id)[0]
        percentile = 100.0 * np.searchsorted(np.sort(expected), expected, side="right") / expected.size
        if self.metrics is not None:
            self.metrics.forecast_computed(state.city, time.perf_counter() - started)
        return Forecast(state.city, shift_id, category, model, expected, order, percentile,
                        Explanations(expected.size, explain_rows), key)


def _predict(forecaster, panel: CountPanel, shift_id: int, lock: threading.Lock) -> tuple[np.ndarray, RowsExplainer]:
    """Expected counts of every cell, and a function explaining given cells.

    A LightGBM forecaster's ``predict`` and ``contributions`` each build the shift's feature matrix (from the
    panel cut at the shift: history before it only) and run the booster on it; here the matrix is built once
    and kept, the booster predicts every cell, and ``pred_contrib`` runs later on the rows a response shows.
    Other forecasters go through their public ``predict`` and ``contributions``."""
    booster, config = getattr(forecaster, "booster_", None), getattr(forecaster, "features", None)
    if booster is not None and config is not None and getattr(forecaster, "columns_", None):
        X = build_features(panel.until(shift_id), shift_id, config).X
        iteration = forecaster.best_iteration_
        expected = np.asarray(booster.predict(X, num_iteration=iteration), dtype=np.float64).reshape(-1)
        names = list(forecaster.columns_) + ["bias"]

        def explain_rows(cells: np.ndarray) -> tuple[np.ndarray, list[str]]:
            with lock:
                return booster.predict(X[cells], num_iteration=iteration, pred_contrib=True), names

        return expected, explain_rows
    expected = np.asarray(forecaster.predict(panel, shift_id), dtype=np.float64).reshape(-1)
    contrib, names = forecaster.contributions(panel, shift_id)
    contrib = np.asarray(contrib, dtype=np.float64)
    return expected, lambda cells: (contrib[cells], list(names))


def select_cells(panel: CountPanel, forecast: Forecast, k: int | None, coverage: float | None, default_k: int) -> int:
    if coverage is not None:
        return cells_for_coverage(panel.study_area.areas_km2, forecast.order, coverage)
    return k if k is not None else min(default_k, panel.n_cells)


def hexagon_ring(h3_id: str) -> list[tuple[float, float]]:
    """RFC 7946 exterior ring of a cell: [lon, lat] positions, counter-clockwise, closed."""
    ring = [(round(lng, 7), round(lat, 7)) for lat, lng in h3.cell_to_boundary(h3_id)]
    signed = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]))
    if signed < 0:
        ring.reverse()
    return ring + [ring[0]]
