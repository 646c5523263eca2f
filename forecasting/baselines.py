"""Baselines, each a faithful version of what an analyst would otherwise use.

* ``Naive``: the traditional hotspot map, mean count per shift over a trailing window.
* ``KDE``: Gaussian kernel density of recent incidents evaluated per cell (binned at cell centres).
* ``ProspectiveHotspot``: Bowers, Johnson & Pease (2004) space-time weighting 1/(1+d) * 1/(1+w).
* ``SEPP``: the grid self-exciting point process of Mohler et al. (2015), background rate per cell plus
  exponential (geometric, in shifts) triggering, fitted by expectation-maximisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.signal import lfilter
from scipy.spatial import cKDTree

from features.panel import CountPanel
from forecasting.base import Forecaster, window_counts


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
        start = max(panel.first_shift, until - self.fit_days * panel.calendar.per_day)
        n = panel.dense(start, until, category=self.category, dtype=np.float64)
        T, n_events = n.shape[0], n.sum()
        if n_events == 0:
            self.mu_, self.theta_, self.g_ = np.zeros(n.shape[1]), 0.0, 0.5
            return
        if self.warm_start and self.mu_ is not None and self.mu_.size == n.shape[1]:
            mu, theta, g = np.maximum(self.mu_, 1e-12), max(self.theta_, 0.05), self.g_
        else:
            mu = np.maximum(n.sum(axis=0) / T, 1e-12) * 0.5
            theta, g = 0.5, 1.0 - 1.0 / 6.0
        remaining = (T - 1 - np.arange(T))[:, None]  # shifts left in the window after each event's shift
        has = n > 0
        previous = -np.inf
        for it in range(1, self.max_iter + 1):
            a, d = self._excitation(n, g)
            trig_rate = theta * (1 - g) * a
            lam = mu[None, :] + trig_rate
            ratio = np.where(has, n / np.where(has, lam, 1.0), 0.0)
            background = (ratio * mu[None, :]).sum(axis=0)
            triggered = (ratio * trig_rate).sum()
            lag_weighted = (ratio * theta * (1 - g) * d).sum()
            mu = np.maximum(background / T, 1e-12)
            kernel_mass = (n * (1 - g**remaining)).sum()
            theta = float(min(triggered / max(kernel_mass, 1e-12), 0.999))
            mean_lag = max(lag_weighted / max(triggered, 1e-12), 1.0 + 1e-6)
            g = float(np.clip(1.0 - 1.0 / mean_lag, 1e-6, 1 - 1e-6))
            loglik = float(np.sum(np.where(has, n * np.log(np.where(has, lam, 1.0)), 0.0)) - lam.sum())
            if abs(loglik - previous) <= self.tol * max(1.0, abs(loglik)):
                break
            previous = loglik
        self.mu_, self.theta_, self.g_, self.n_iter_, self.loglik_ = mu, theta, g, it, loglik

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        horizon = int(np.ceil(np.log(1e-8) / np.log(self.g_))) if 0 < self.g_ < 1 else 1
        lo = max(panel.first_shift, int(origins[0]) - horizon)
        hi = int(origins[-1])
        n = panel.dense(lo, hi + 1, category=self.category, dtype=np.float64)  # row hi is empty (cut panel)
        a, _ = self._excitation(n, self.g_)
        return self.mu_[None, :] + self.theta_ * (1 - self.g_) * a[origins - lo]
