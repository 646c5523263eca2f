"""Concentration and overlap measures shared by the flag diagnostics and the feedback-loop simulator.

One implementation each, so a Gini or a Jaccard in a backtest's diagnostics means exactly what it means in the
simulation. Every measure works along the last axis: a 1-d input gives a float, a 2-d input one value per row
(vectorised over shifts or simulated rounds).
"""

from __future__ import annotations

import math

import numpy as np


def _value(x: np.ndarray) -> float | np.ndarray:
    """A float for a 0-d result (1-d input), the array otherwise."""
    return float(x) if np.ndim(x) == 0 else x


def gini(values: np.ndarray) -> float | np.ndarray:
    """Gini coefficient of non-negative values (0 = all equal, (n-1)/n = everything in one of n); 0 when the
    total is 0 (no flags or patrols at all: no concentration)."""
    x = np.sort(np.asarray(values, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    total = np.asarray(x.sum(axis=-1))
    if n == 0:
        return _value(np.zeros(total.shape))
    weighted = x @ np.arange(1, n + 1, dtype=np.float64)
    g = np.divide(2 * weighted, n * total, out=np.zeros(total.shape), where=total > 0) - (n + 1) / n
    return _value(np.where(total > 0, g, 0.0))


def top_share(values: np.ndarray, share: float | None = None, *, k: int | None = None) -> float | np.ndarray:
    """Share of the total held by the largest values: the top ``k``, or the top ``ceil(share * n)`` (at least
    one); nan where the total is 0."""
    if (share is None) == (k is None):
        raise ValueError("top_share needs exactly one of share (fraction of values) or k (number of values)")
    x = np.sort(np.asarray(values, dtype=np.float64), axis=-1)[..., ::-1]  # largest first
    n = x.shape[-1]
    m = min(k if k is not None else max(1, math.ceil(share * n)), n)
    total = np.asarray(x.sum(axis=-1))
    if m < 1:
        return _value(np.full(total.shape, np.nan))
    return _value(np.divide(x[..., :m].sum(axis=-1), total, out=np.full(total.shape, np.nan), where=total > 0))


def lorenz(values: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve (share of cells, share of the total) of 1-d values at ``points`` evenly spaced cell shares."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    cum = np.concatenate([[0.0], np.cumsum(x)]) / max(x.sum(), 1e-12)
    grid = np.linspace(0, 1, points)
    return grid, np.interp(grid * x.size, np.arange(x.size + 1), cum)


def jaccard(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Jaccard similarity of boolean sets (1 where both are empty): of two masks, or row by row of two matrices."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    inter, union = (a & b).sum(axis=-1), (a | b).sum(axis=-1)
    return _value(np.divide(inter, union, out=np.ones(np.shape(inter)), where=np.asarray(union) > 0))
