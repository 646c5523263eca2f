"""SEPP's EM over the events only (sparse same-cell pairs within the kernel's support, the intensity's integral
in closed form) gives the fit of the dense EM over every cell and shift: the same iterations, the same
parameters to rounding, cold and warm-started."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import synthetic_downtown_panel

from features.panel import CountPanel
from forecasting.baselines import SEPP, _cell_events, _support, _TriggerPairs


def dense_em(panel: CountPanel, until: int, fit_days: int, start_params=None, max_iter=200, tol=1e-6):
    """The dense EM this module replaced: every cell x shift of the window, excitation by recursive filter."""
    start = max(panel.first_shift, until - fit_days * panel.calendar.per_day)
    n = panel.dense(start, until, dtype=np.float64)
    T = n.shape[0]
    if start_params is None:
        mu, theta, g = np.maximum(n.sum(axis=0) / T, 1e-12) * 0.5, 0.5, 1.0 - 1.0 / 6.0
    else:
        mu, theta, g = start_params
    remaining = (T - 1 - np.arange(T))[:, None]
    has = n > 0
    previous, n_iter = -np.inf, 0
    while n_iter < max_iter:
        n_iter += 1
        a, d = SEPP._excitation(n, g)
        trig_rate = theta * (1 - g) * a
        lam = mu[None, :] + trig_rate
        ratio = np.where(has, n / np.where(has, lam, 1.0), 0.0)
        background = (ratio * mu[None, :]).sum(axis=0)
        triggered = (ratio * trig_rate).sum()
        lag_weighted = (ratio * theta * (1 - g) * d).sum()
        mu = np.maximum(background / T, 1e-12)
        kernel_mass = (n * (1 - g**remaining)).sum()
        theta = float(min(triggered / max(kernel_mass, 1e-12), 0.999))
        g = float(np.clip(1.0 - 1.0 / max(lag_weighted / max(triggered, 1e-12), 1.0 + 1e-6), 1e-6, 1 - 1e-6))
        loglik = float(np.sum(np.where(has, n * np.log(np.where(has, lam, 1.0)), 0.0)) - lam.sum())
        if abs(loglik - previous) <= tol * max(1.0, abs(loglik)):
            break
        previous = loglik
    return mu, theta, g, n_iter, loglik


@pytest.fixture(scope="module")
def panel():
    return synthetic_downtown_panel(4, 30, 2, 7, datetime(2019, 3, 1, tzinfo=UTC))


def test_sparse_em_equals_the_dense_em(panel):
    cutoff = panel.end_shift - 40
    model = SEPP(fit_days=200).fit(panel, cutoff)
    mu, theta, g, n_iter, loglik = dense_em(panel, cutoff, 200)
    assert model.n_iter_ == n_iter > 3
    assert model.theta_ == pytest.approx(theta, rel=1e-9)
    assert model.g_ == pytest.approx(g, rel=1e-9)
    assert model.loglik_ == pytest.approx(loglik, rel=1e-12)
    np.testing.assert_allclose(model.mu_, mu, rtol=1e-9, atol=1e-15)
    # warm started from that fit, a month later: still the dense EM's path
    start = (model.mu_.copy(), max(model.theta_, 0.05), model.g_)
    warm = SEPP(fit_days=200, warm_start=True)
    warm.mu_, warm.theta_, warm.g_ = model.mu_, model.theta_, model.g_
    warm.fit(panel, cutoff + 30)
    mu, theta, g, n_iter, _ = dense_em(panel, cutoff + 30, 200, start)
    assert warm.n_iter_ == n_iter
    assert warm.g_ == pytest.approx(g, rel=1e-9) and warm.theta_ == pytest.approx(theta, rel=1e-9)
    np.testing.assert_allclose(warm.mu_, mu, rtol=1e-9, atol=1e-15)


def test_trigger_pairs_are_the_same_cell_predecessors_within_the_support(panel):
    start, stop = panel.end_shift - 300, panel.end_shift
    events = _cell_events(panel, start, stop, None)
    dense = panel.dense(start, stop, dtype=np.float64)
    assert events.count.sum() == dense.sum()
    assert np.array_equal(dense[events.shift, events.cell], events.count)
    g = 0.8
    horizon = _support(g, 300)
    assert 10 < horizon < 299  # a cutoff, not the whole window
    pairs = _TriggerPairs.of(events, horizon, 300)
    a, d = pairs.excitation(g)
    full_a, full_d = SEPP._excitation(dense, g)  # no cutoff; each pair left out weighs < KERNEL_EPS
    np.testing.assert_allclose(a, full_a[events.shift, events.cell], rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(d, full_d[events.shift, events.cell], rtol=1e-12, atol=1e-16)
    assert pairs.covers(g) and not pairs.covers(0.95)
    assert _TriggerPairs.of(events, 299, 300).covers(1 - 1e-6)  # the whole window: every pair is in
