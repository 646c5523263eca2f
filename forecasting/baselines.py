"""Baselines, each a faithful version of what an analyst would otherwise use.

* ``Naive``: the traditional hotspot map, mean count per shift over a trailing window.
* ``KDE``: Gaussian kernel density of recent incidents evaluated per cell (binned at cell centres).
* ``ProspectiveHotspot``: Bowers, Johnson & Pease (2004) space-time weighting 1/(1+d) * 1/(1+w).
* ``SEPP``: the grid self-exciting point process of Mohler et al. (2015), background rate per cell plus
  exponential (geometric, in shifts) triggering, fitted by expectation-maximisation.
* ``HistoryCounts``: the long-history count map a sceptical analyst starts from: every past incident per cell
  (all history), or the trailing year.
* ``ExpWeighted``: exponentially weighted counts, the half-life chosen inside ``fit`` on the validation
  window just before the cutoff (never on the period being forecast).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from features.panel import CountPanel
from forecasting.base import Forecaster, NotFittedError, window_counts
from forecasting.metrics import HEADLINE_COVERAGES, shift_hits


@dataclass
class Naive(Forecaster):
    window_days: int = 28
    name: str = field(default="naive", init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        pass  # nothing to learn: the map is the recent past

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        shifts = self.window_days * panel.calendar.per_day
        return window_counts(panel, origins, shifts, self.category) / shifts


def _local_xy(panel: CountPanel) -> np.ndarray:
    """Cell centres in metres (local equirectangular projection: exact enough within a city)."""
    lat, lon = panel.study_area.centroids
    lat0 = np.deg2rad(lat.mean())
    r = 6_371_008.8
    return np.column_stack([np.deg2rad(lon) * r * np.cos(lat0), np.deg2rad(lat) * r])


@dataclass
class KDE(Forecaster):
    bandwidth_m: float = 300.0
    window_days: int = 28
    name: str = field(default="kde", init=False, repr=False)
    kernel_: sp.csr_matrix | None = field(default=None, init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        xy = _local_xy(panel)
        tree = cKDTree(xy)
        dist = tree.sparse_distance_matrix(tree, max_distance=3 * self.bandwidth_m, output_type="coo_matrix")
        weights = np.exp(-0.5 * (dist.data / self.bandwidth_m) ** 2)
        kernel = sp.coo_matrix((weights, (dist.row, dist.col)), shape=dist.shape).tocsr()
        kernel.setdiag(1.0)  # distance 0 is dropped by the sparse matrix
        # each source cell spreads a unit mass over the grid (so totals are preserved)
        col_sums = np.asarray(kernel.sum(axis=0)).ravel()
        self.kernel_ = (kernel @ sp.diags(1.0 / col_sums)).tocsr()

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        shifts = self.window_days * panel.calendar.per_day
        counts = window_counts(panel, origins, shifts, self.category) / shifts
        if self.kernel_ is None:  # predict() checks fit first
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        return (self.kernel_ @ counts.T).T


@dataclass
class ProspectiveHotspot(Forecaster):
    """Risk of cell c = sum over recent incidents of 1/(1 + d) * 1/(1 + w), d the distance in cell steps
    (incidents further than ``bandwidth_m`` ignored) and w the whole weeks since the incident (up to
    ``weeks``). The risk is rescaled so its total equals the recent mean count per shift, giving counts."""

    bandwidth_m: float = 400.0
    weeks: int = 8
    name: str = field(default="prospective", init=False, repr=False)
    rings_: int = field(default=1, init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        import h3

        spacing = np.sqrt(3) * h3.average_hexagon_edge_length(panel.study_area.resolution, "m")
        self.rings_ = int(self.bandwidth_m // spacing)

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        week = 7 * panel.calendar.per_day
        cumulative = [window_counts(panel, origins, w * week, self.category) for w in range(self.weeks + 1)]
        temporal = sum((cumulative[w + 1] - cumulative[w]) / (1 + w) for w in range(self.weeks))
        risk = temporal.copy()
        area = panel.study_area
        for k in range(1, self.rings_ + 1):
            risk += (area.ring_adjacency(k) @ temporal.T).T / (1 + k)
        recent_rate = cumulative[-1].sum(axis=1, keepdims=True) / (self.weeks * week)
        total = risk.sum(axis=1, keepdims=True)
        return np.divide(risk * recent_rate, total, out=np.zeros_like(risk), where=total > 0)


@dataclass
class SEPP(Forecaster):
    """lambda_c(s) = mu_c + theta * sum_{s' < s} n_c(s') (1 - g) g^(s - s' - 1), time in shifts.

    The geometric kernel is the shift-discretised exponential of Mohler et al. (2015); events of the same
    shift do not trigger each other. EM updates: mu_c from the background shares, theta from the triggered
    share (with an edge correction for the kernel mass after the window), g from the mean triggering lag."""

    fit_days: int = 365
    max_iter: int = 200
    tol: float = 1e-6
    warm_start: bool = False  # refit from the previous fit's parameters (as in scikit-learn)
    name: str = field(default="sepp", init=False, repr=False)
    mu_: np.ndarray | None = field(default=None, init=False, repr=False)
    theta_: float = field(default=0.0, init=False, repr=False)
    g_: float = field(default=0.0, init=False, repr=False)
    n_iter_: int = field(default=0, init=False, repr=False)
    loglik_: float = field(default=np.nan, init=False, repr=False)

    @staticmethod
    def _excitation(counts: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
        """A[s] = sum_{s'<s} n[s'] g^(s-1-s'),  D[s] = sum_{s'<s} n[s'] (s-s') g^(s-1-s')  (per cell)."""
        from scipy.signal import lfilter  # here, not at the top: scipy.signal costs ~1 s to import (CLI, service)

        prev = np.zeros_like(counts)
        prev[1:] = counts[:-1]
        a = lfilter([1.0], [1.0, -g], prev, axis=0)
        a_prev = np.zeros_like(a)
        a_prev[1:] = a[:-1]
        d = lfilter([1.0], [1.0, -g], prev + g * a_prev, axis=0)
        return a, d

    @property
    def mean_lag_shifts(self) -> float:
        return 1.0 / (1.0 - self.g_)

    def _fit(self, panel: CountPanel, until: int) -> None:
        """EM over the shifts with incidents only: the intensity matters where events are (the log-likelihood's
        first term) and its integral has a closed form (the second), so a year of a city costs its events and
        their same-cell predecessors within the kernel's support, not cells x shifts."""
        start = max(panel.first_shift, until - self.fit_days * panel.calendar.per_day)
        T = until - start
        events = _cell_events(panel, start, until, self.category)
        cell, n = events.cell, events.count
        if n.size == 0:
            self.mu_, self.theta_, self.g_ = np.zeros(panel.n_cells), 0.0, 0.5
            return
        if self.warm_start and self.mu_ is not None and self.mu_.size == panel.n_cells:
            mu, theta, g = np.maximum(self.mu_, 1e-12), max(self.theta_, 0.05), self.g_
        else:
            mu = np.maximum(np.bincount(cell, weights=n, minlength=panel.n_cells) / T, 1e-12) * 0.5
            theta, g = 0.5, 1.0 - 1.0 / 6.0
        remaining = (T - 1 - events.shift).astype(np.float64)  # shifts left in the window after each event's shift
        pairs: _TriggerPairs | None = None
        previous, n_iter = -np.inf, 0
        while n_iter < self.max_iter:
            n_iter += 1
            if pairs is None or not pairs.covers(g):  # rebuilt with room to spare: g moves a little each step
                pairs = _TriggerPairs.of(events, min(2 * _support(g, T), max(T - 1, 1)), T)
            a, d = pairs.excitation(g)
            trig_rate = theta * (1 - g) * a
            mu_at = mu[cell]
            lam = mu_at + trig_rate
            ratio = n / lam
            background = np.bincount(cell, weights=ratio * mu_at, minlength=panel.n_cells)
            triggered = (ratio * trig_rate).sum()
            lag_weighted = (ratio * theta * (1 - g) * d).sum()
            kernel_mass = (n * (1 - g**remaining)).sum()
            lam_total = T * mu.sum() + theta * kernel_mass  # sum of lam over every cell and shift, in closed form
            mu = np.maximum(background / T, 1e-12)
            theta = float(min(triggered / max(kernel_mass, 1e-12), 0.999))
            mean_lag = max(lag_weighted / max(triggered, 1e-12), 1.0 + 1e-6)
            g = float(np.clip(1.0 - 1.0 / mean_lag, 1e-6, 1 - 1e-6))
            loglik = float((n * np.log(lam)).sum() - lam_total)
            if abs(loglik - previous) <= self.tol * max(1.0, abs(loglik)):
                break
            previous = loglik
        self.mu_, self.theta_, self.g_, self.n_iter_, self.loglik_ = mu, theta, g, n_iter, loglik

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        horizon = int(np.ceil(np.log(1e-8) / np.log(self.g_))) if 0 < self.g_ < 1 else 1
        lo = max(panel.first_shift, int(origins[0]) - horizon)
        hi = int(origins[-1])
        n = panel.dense(lo, hi + 1, category=self.category, dtype=np.float64)  # row hi is empty (cut panel)
        a, _ = self._excitation(n, self.g_)
        if self.mu_ is None:  # predict() checks fit first
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        return self.mu_[None, :] + self.theta_ * (1 - self.g_) * a[origins - lo]


# Pairs whose kernel weight lag * g^(lag - 1) is below this are left out of SEPP's fit: far below float64's
# resolution of any intensity they would be added to (every event contributes at least 1 to its own cell's sum).
KERNEL_EPS = 1e-18


@dataclass(frozen=True)
class _CellEvents:
    """The (cell, shift) pairs with incidents in a window, sorted by cell then shift; shift counted from the
    window's start."""

    cell: np.ndarray
    shift: np.ndarray
    count: np.ndarray


def _cell_events(panel: CountPanel, start: int, stop: int, category) -> _CellEvents:
    rows = panel.slice(start, stop, category)
    span = stop - start
    key = rows["cell"].to_numpy().astype(np.int64) * span + (rows["shift"].to_numpy() - start)
    keys, inverse = np.unique(key, return_inverse=True)  # categories of one cell and shift summed
    count = np.bincount(inverse, weights=rows["count"].to_numpy().astype(np.float64), minlength=keys.size)
    return _CellEvents(keys // span, keys % span, count)


def _support(g: float, T: int) -> int:
    """The longest lag whose kernel weight lag * g^(lag - 1) reaches ``KERNEL_EPS`` (at most the window)."""
    lags = np.arange(1, max(T, 1) + 1, dtype=np.float64)
    with np.errstate(under="ignore"):
        kept = np.flatnonzero(lags * g ** (lags - 1) >= KERNEL_EPS)
    return int(kept[-1]) + 1 if kept.size else 1


@dataclass(frozen=True)
class _TriggerPairs:
    """Each event's earlier events of the same cell within ``horizon`` shifts, as a sparse (event x lag - 1)
    matrix of the earlier counts: the excitation at every event is then one sparse product per EM step."""

    by_lag: sp.csr_matrix
    horizon: int
    complete: bool  # the horizon spans the whole window: every pair is in

    @classmethod
    def of(cls, events: _CellEvents, horizon: int, T: int) -> _TriggerPairs:
        key = events.cell * T + events.shift  # sorted (cell-major), as _cell_events returns them
        first = np.searchsorted(key, np.maximum(key - horizon, events.cell * T), side="left")
        idx = np.arange(key.size)
        k = idx - first  # earlier events of the same cell within the horizon
        later = np.repeat(idx, k)
        earlier = np.repeat(first - np.cumsum(k) + k, k) + np.arange(k.sum())
        lag = events.shift[later] - events.shift[earlier]
        matrix = sp.csr_matrix((events.count[earlier], (later, lag - 1)), shape=(key.size, horizon))
        return cls(matrix, horizon, horizon >= T - 1)

    def covers(self, g: float) -> bool:
        return self.complete or _support(g, self.horizon + 1) <= self.horizon

    def excitation(self, g: float) -> tuple[np.ndarray, np.ndarray]:
        """A and D of ``SEPP._excitation`` at the events: sum n' g^(lag - 1) and sum n' lag g^(lag - 1)."""
        lags = np.arange(1, self.horizon + 1, dtype=np.float64)
        with np.errstate(under="ignore"):
            weights = g ** (lags - 1)
        out = self.by_lag @ np.column_stack([weights, lags * weights])
        return out[:, 0], out[:, 1]


def _history_totals(panel: CountPanel, origins: np.ndarray, category) -> np.ndarray:
    """Counts over [first_shift, o) per origin and cell: the sparse total before the first origin plus a
    cumulative sum over the (short) span of the origins."""
    first = int(origins[0])
    base = panel.cell_totals(panel.first_shift, first, category)
    dense = panel.dense(first, int(origins[-1]), category=category, dtype=np.float64)
    cum = np.zeros((dense.shape[0] + 1, dense.shape[1]))
    np.cumsum(dense, axis=0, out=cum[1:])
    return base[None, :] + cum[origins - first]


@dataclass
class HistoryCounts(Forecaster):
    """Mean count per shift over all history before the origin (``window_days=None``) or its last
    ``window_days``: where crime has been recorded for a long time, the strongest static map in most cities."""

    window_days: int | None = None
    name: str = field(default="all_history", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window_days is not None:
            self.name = "last_year" if self.window_days == 365 else f"last_{self.window_days}_days"

    def _fit(self, panel: CountPanel, until: int) -> None:
        pass  # nothing to learn: the map is the recorded past

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        if self.window_days is None:
            counts = _history_totals(panel, origins, self.category)
            shifts = (origins - panel.first_shift).astype(np.float64)
        else:
            span = self.window_days * panel.calendar.per_day
            counts = window_counts(panel, origins, span, self.category)
            shifts = np.minimum(origins - panel.first_shift, span).astype(np.float64)
        return np.divide(counts, shifts[:, None], out=np.zeros_like(counts), where=shifts[:, None] > 0)


@dataclass
class ExpWeighted(Forecaster):
    """Exponentially weighted mean count per shift: sum over past shifts s of n(s) d^(t-1-s), normalised by the
    weights' sum, with d = 0.5^(1 / half-life in shifts).

    With ``half_life_days=None`` the half-life is chosen in ``fit`` from ``half_lives`` by the mean hit rate at
    the headline coverages over the ``select_days`` before the cutoff (the forecasts there use only history
    before each of those shifts, and the cutoff's panel holds nothing later), so the test period never picks it."""

    half_life_days: float | None = None
    half_lives: tuple[float, ...] = (7.0, 28.0, 91.0, 182.0, 365.0, 730.0)
    select_days: int = 56
    name: str = field(default="exp_weighted", init=False, repr=False)
    half_life_: float = field(default=np.nan, init=False, repr=False)
    selection_: dict = field(default_factory=dict, init=False, repr=False)

    @staticmethod
    def _weighted(panel: CountPanel, origins: np.ndarray, half_life_days: float, category) -> np.ndarray:
        from scipy.signal import lfilter  # here, not at the top: scipy.signal costs ~1 s to import (CLI, service)

        d = 0.5 ** (1.0 / (half_life_days * panel.calendar.per_day))
        first = int(origins[0])
        rows = panel.slice(panel.first_shift, first, category)
        age = first - 1 - rows["shift"].to_numpy()
        base = np.bincount(rows["cell"].to_numpy(), weights=rows["count"].to_numpy() * d ** age, minlength=panel.n_cells)
        dense = panel.dense(first, int(origins[-1]), category=category, dtype=np.float64)
        recent = lfilter([1.0], [1.0, -d], dense, axis=0) if dense.shape[0] else dense
        steps = origins - first
        total = d ** steps[:, None] * base[None, :]
        later = steps > 0
        total[later] += recent[steps[later] - 1]
        weight = (1.0 - d ** (origins - panel.first_shift)) / (1.0 - d)  # sum of the weights of the past shifts
        return np.divide(total, weight[:, None], out=np.zeros_like(total), where=weight[:, None] > 0)

    def _fit(self, panel: CountPanel, until: int) -> None:
        if self.half_life_days is not None:
            self.half_life_, self.selection_ = float(self.half_life_days), {}
            return
        per_day = panel.calendar.per_day
        origins = np.arange(max(panel.first_shift + 1, until - self.select_days * per_day), until, dtype=np.int64)
        if origins.size == 0:
            self.half_life_, self.selection_ = float(self.half_lives[len(self.half_lives) // 2]), {}
            return
        observed = panel.dense(int(origins[0]), until, category=self.category, dtype=np.float64)
        areas = panel.study_area.areas_km2
        scores = {}
        for h in self.half_lives:
            hits = shift_hits(self._weighted(panel, origins, h, self.category), observed, areas, origins,
                              HEADLINE_COVERAGES)
            crimes = hits.crimes.sum()
            scores[float(h)] = float((hits.hits.sum(axis=0) / crimes).mean()) if crimes > 0 else 0.0
        self.half_life_ = max(scores, key=lambda h: scores[h])  # the first of equals: the grid's order decides
        self.selection_ = scores

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        return self._weighted(panel, origins, self.half_life_, self.category)

    def fit_summary(self) -> dict[str, float]:
        return {"half_life_days": float(self.half_life_)}
