"""Forecasts for the API: resolve the shift and category, run the champion, rank, explain, cache.

A forecast for shift t uses the panel's history before t only (the forecaster cuts the panel there), so any
shift from the second of the panel to the first one after its data can be asked for. Cells are ranked with
the project's tie rule (:func:`forecasting.metrics.rank_cells`) and selected by count (k) or by area share
(:func:`forecasting.metrics.cells_for_coverage`), exactly as the backtest does.

Forecasts are cached per (city, shift, category, model version, panel files): a new champion or an updated
panel gives new keys, and old entries age out of the LRU.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Hashable
from zoneinfo import ZoneInfo

import h3
import numpy as np

from features.panel import CountPanel
from forecasting.metrics import cells_for_coverage, rank_cells
from serving.errors import FieldError
from serving.models_store import CityState, LoadedModel

TOP_FEATURES = 3


@dataclass(frozen=True)
class Forecast:
    city: str
    shift_id: int
    category: str
    model: LoadedModel
    expected: np.ndarray  # (n_cells,)
    order: np.ndarray  # cell indices, best first
    percentile: np.ndarray  # (n_cells,) % of cells with expected <= this cell's
    top_features: list[list[tuple[str, float]]]  # per cell, largest |contribution| first


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


def shift_start_local(panel: CountPanel, shift_id: int) -> datetime:
    return panel.calendar.bounds([shift_id])["start_local"][0]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="minutes")


def resolve_shift(panel: CountPanel, requested: str, now: datetime) -> ResolvedShift:
    """'next' or the ISO start of a shift -> shift id within [first_shift + 1, end_shift]."""
    cal = panel.calendar
    lo, hi = panel.first_shift + 1, panel.end_shift
    text = requested.strip()
    if text.lower() == "next":
        upcoming = cal.next_shift(now)
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
    shift_id = cal.shift_of(moment_utc)
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


class ForecastService:
    def __init__(self, cache_size: int = 256):
        self.cache = LRUCache(cache_size)
        self._model_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _model_lock(self, model: LoadedModel) -> threading.Lock:
        with self._locks_guard:
            return self._model_locks.setdefault((model.name, model.version), threading.Lock())

    def forecast(self, state: CityState, shift_id: int, category: str) -> tuple[Forecast, bool]:
        """(forecast, cache hit)."""
        model = state.model
        key = (state.city, shift_id, category, model.version, state.panel_token)
        return self.cache.get_or_compute(key, lambda: self._compute(state, shift_id, category))

    def _compute(self, state: CityState, shift_id: int, category: str) -> Forecast:
        panel, model = state.panel, state.model
        with self._model_lock(model):  # one LightGBM call per model at a time
            expected = np.asarray(model.forecaster.predict(panel, shift_id), dtype=np.float64).reshape(-1)
            contrib, names = model.forecaster.contributions(panel, shift_id)
        contrib = np.asarray(contrib, dtype=np.float64)
        if names and names[-1] == "bias":
            contrib, names = contrib[:, :-1], list(names[:-1])
        top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :TOP_FEATURES]
        top_features = [[(names[j], float(contrib[i, j])) for j in row] for i, row in enumerate(top)]
        order = rank_cells(expected, shift_id)[0]
        percentile = 100.0 * np.searchsorted(np.sort(expected), expected, side="right") / expected.size
        return Forecast(state.city, shift_id, category, model, expected, order, percentile, top_features)


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
