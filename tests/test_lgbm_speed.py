"""The speed settings of the LightGBM forecaster change time only: the feature-chunk grid gives the same training
rows, the sampled rows (features built only for the rows kept) are the full matrix's rows under the same zero
sampling, and the binning setting reaches LightGBM."""

from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import toronto_box_panel

from features.matrix import build_features, build_targets
from forecasting.lgbm import LightGBMForecaster


@pytest.fixture(scope="module")
def panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2018, 1, 1, tzinfo=UTC))[1]


def assert_rows_drawn(model, seen, start: int, stop: int, rates_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampled rows of [start, stop) on the 360-shift chunk grid are the full matrix's rows that the chunk's own
    seed keeps with the per-cell probabilities ``rates_of(chunk_start)`` (positives always), weighted 1/p; returns
    (weights, targets, kept)."""
    X, y, w, o = model._rows(seen, start, stop, sample=True)
    origins = np.arange(start, stop)
    full = build_features(seen, origins, model.features)
    target = build_targets(seen, origins)
    lo, hi = start, (start // 360 + 1) * 360
    keep, rate = [], []
    for a, b in zip([lo, hi], [hi, stop]):
        p = np.tile(rates_of(a), b - a)
        yy = target[(a - start) * seen.n_cells:(b - start) * seen.n_cells]
        keep.append((yy > 0) | (np.random.default_rng([model.seed, a, b]).random(yy.size) < p))
        rate.append(p)
    kept, rate = np.concatenate(keep), np.concatenate(rate)
    np.testing.assert_array_equal(X, full.X[kept])
    np.testing.assert_array_equal(y, target[kept])
    np.testing.assert_array_equal(o, full.origin[kept])
    np.testing.assert_array_equal(w, np.where(target > 0, 1.0, 1.0 / rate)[kept])
    return w, target, kept


def test_chunk_grid_does_not_change_the_rows(panel):
    """Unsampled rows over a span cut on two different chunk grids are identical, cached chunks included."""
    stop = panel.first_shift + 400 * 3
    start = stop - 120 * 3
    small, large = LightGBMForecaster(chunk_shifts=45), LightGBMForecaster(chunk_shifts=360)
    a = small._rows(panel.until(stop), start, stop, sample=False)
    b = large._rows(panel.until(stop), start, stop, sample=False)
    again = large._rows(panel.until(stop), start, stop, sample=False)  # from the cache
    for x, y, z in zip(a, b, again):
        assert x.shape == y.shape and np.array_equal(x, y) and np.array_equal(y, z)
    assert a[0].dtype == np.float32 and a[0].shape[0] == 120 * 3 * panel.n_cells


def test_rows_built_under_other_parameters_are_not_reused(panel):
    """``set_params`` between fits builds the cached chunks again: after each change the rows equal a fresh
    model's under the same parameters."""
    stop = panel.first_shift + 400 * 3
    start, seen = stop - 120 * 3, panel.until(stop)
    model, changed = LightGBMForecaster(zero_rate=0.2), {"zero_rate": 0.2}
    model._rows(seen, start, stop, sample=True)
    for change in ({"zero_rate": 0.1}, {"seed": 3}, {"zero_sampling": "uniform"}, {"features__window_days": (1, 7)}):
        model.set_params(**change)
        changed |= change
        rows, fresh = model._rows(seen, start, stop, sample=True), LightGBMForecaster().set_params(**changed)
        for got, want in zip(rows, fresh._rows(seen, start, stop, sample=True)):
            np.testing.assert_array_equal(got, want)


def test_max_bin_reaches_lightgbm_and_fits_are_deterministic(panel):
    cutoff = panel.first_shift + 400 * 3
    make = lambda: LightGBMForecaster(train_days=200, valid_days=28, n_estimators=30, zero_rate=0.2,  # noqa: E731
                                      num_threads=1, max_bin=15)
    one, two = make().fit(panel, cutoff), make().fit(panel, cutoff)
    assert one.lgb_params()["max_bin"] == 15
    assert "[max_bin: 15]" in one.booster_.model_to_string()
    origins = np.arange(cutoff, cutoff + 6)
    assert np.array_equal(one.predict(panel, origins), two.predict(panel, origins))


def test_sampled_rows_are_the_full_matrix_rows_the_sampling_keeps(panel):
    """Positives and zeros drawn with the chunk's own seed, weights 1 and 1/zero_rate, features to the bit: what
    the forecaster trained on before it built features only for the rows it keeps (uniform zero sampling)."""
    stop = panel.first_shift + 400 * 3
    start = stop - 90 * 3
    model = LightGBMForecaster(chunk_shifts=360, zero_sampling="uniform", zero_rate=0.1, seed=7)
    X, y, w, o = model._rows(panel.until(stop), start, stop, sample=True)
    origins = np.arange(start, stop)
    full = build_features(panel.until(stop), origins, model.features)
    target = build_targets(panel.until(stop), origins)
    lo, hi = start, (start // 360 + 1) * 360  # the chunks of the 360-shift grid the span covers
    keep = []
    for a, b in zip([lo, hi], [hi, stop]):
        yy = target[(a - start) * panel.n_cells:(b - start) * panel.n_cells]
        keep.append((yy > 0) | (np.random.default_rng([7, a, b]).random(yy.size) < 0.1))
    keep = np.concatenate(keep)
    assert 0 < (target[keep] == 0).sum() < (target == 0).sum()  # zeros were sampled, not all kept
    np.testing.assert_array_equal(X, full.X[keep])
    np.testing.assert_array_equal(y, target[keep])
    np.testing.assert_array_equal(w, np.where(target > 0, 1.0, 10.0)[keep])
    np.testing.assert_array_equal(o, full.origin[keep])


def test_quiet_cells_zeros_are_sampled_at_their_own_rate_with_weight_one_over_it(panel):
    """Importance sampling of zeros: in cells without an incident in the ``quiet_days`` before a chunk's first
    origin (only earlier shifts decide), zeros are kept at ``quiet_zero_rate`` with weight 1/quiet_zero_rate; every
    other row is drawn exactly as with one global zero rate, and features are the full matrix's rows."""
    stop = panel.first_shift + 400 * 3
    start = stop - 90 * 3
    hi = (start // 360 + 1) * 360  # the second chunk of the 360-shift grid
    seen = panel.until(stop)
    model = LightGBMForecaster(chunk_shifts=360, zero_sampling="uniform", zero_rate=0.1, quiet_zero_rate=0.02,
                               quiet_days=28, seed=7)

    def rates(a: int) -> np.ndarray:
        quiet = seen.cell_totals(a - 28 * 3, a) == 0  # the 28 days before the chunk, nothing later
        assert 0 < quiet.sum() < seen.n_cells
        return np.where(quiet, 0.02, 0.1)

    w, _, _ = assert_rows_drawn(model, seen, start, stop, rates)
    assert {50.0, 10.0, 1.0} == set(np.unique(w).tolist())  # quiet zeros, other zeros, positives
    # what happens at or after a chunk's first origin cannot change which cells are quiet for it
    quiet_now = model._zero_rates(seen, hi)
    assert np.array_equal(quiet_now, model._zero_rates(panel.until(hi), hi))
    # uniform sampling without a quiet rate is one global rate
    assert np.array_equal(LightGBMForecaster(zero_sampling="uniform", zero_rate=0.1)._zero_rates(seen, hi),
                          np.full(seen.n_cells, 0.1))


def test_zeros_are_kept_in_proportion_to_the_cells_past_count(panel):
    """The default zero sampling: a cell's zeros are kept with probability proportional to its count before the
    chunk's first origin (cells without one count as the quietest cell with one), mean zero_rate, clipped to
    [floor, ceiling], each with weight 1/p; positives always, weight 1. Nothing at or after the chunk's first
    origin changes the probabilities."""
    stop = panel.first_shift + 400 * 3
    start = stop - 90 * 3
    lo, hi = start, (start // 360 + 1) * 360
    seen = panel.until(stop)
    model = LightGBMForecaster(chunk_shifts=360, zero_rate=0.1, zero_rate_floor=0.02, zero_rate_ceiling=0.5, seed=7)
    assert LightGBMForecaster().zero_sampling == "by_rate"

    def rates(a: int) -> np.ndarray:
        before = seen.counts.filter(seen.counts["shift"] < a)  # every incident before the chunk, by hand
        past = np.bincount(before["cell"].to_numpy(), weights=before["count"].to_numpy(), minlength=seen.n_cells)
        assert (past == 0).any() and (past > 0).any()
        past = np.where(past > 0, past, past[past > 0].min())
        p = np.clip(past / past.mean() * 0.1, 0.02, 0.5)
        assert p.min() == 0.02 and p.max() > 0.1  # quiet cells at the floor, busy ones above the mean
        assert np.array_equal(model._zero_rates(seen, a), p)
        return p

    _, target, keep = assert_rows_drawn(model, seen, start, stop, rates)
    # busy cells' zeros are kept more often than quiet cells' (the point)
    zeros = target == 0
    kept_share = np.bincount(np.tile(np.arange(seen.n_cells), stop - start)[zeros & keep], minlength=seen.n_cells) / \
        np.bincount(np.tile(np.arange(seen.n_cells), stop - start)[zeros], minlength=seen.n_cells).clip(1)
    first = model._zero_rates(seen, lo)
    assert kept_share[first == first.max()].mean() > 3 * kept_share[first == 0.02].mean()
    # only shifts before the chunk's first origin decide: the panel as known at hi gives the same probabilities
    assert np.array_equal(model._zero_rates(seen, hi), model._zero_rates(panel.until(hi), hi))
    with pytest.raises(ValueError, match="zero_sampling must be 'by_rate' or 'uniform'"):
        LightGBMForecaster(zero_sampling="stratified")._zero_rates(seen, hi)
    with pytest.raises(ValueError, match="zero_rate_floor <= zero_rate_ceiling"):
        LightGBMForecaster(zero_rate_floor=0.4, zero_rate_ceiling=0.3)._zero_rates(seen, hi)
    # the ceiling binds the busiest cells; a ranker (no row weights) samples uniformly
    capped = LightGBMForecaster(zero_rate=0.1, zero_rate_floor=0.02, zero_rate_ceiling=0.15)._zero_rates(seen, hi)
    assert capped.max() == 0.15 and capped.min() == 0.02 and (capped == 0.15).sum() < seen.n_cells // 2
    assert np.array_equal(LightGBMForecaster(objective="rank_xendcg", zero_rate=0.1)._zero_rates(seen, hi),
                          np.full(seen.n_cells, 0.1))
