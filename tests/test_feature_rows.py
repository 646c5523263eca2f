"""Feature rows built only for the rows a model keeps (``build_features(..., rows=)``): each row equals the full
matrix's row, and stays leakage-free: changing incidents at or after a row's origin never changes it."""

from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel
from scipy.signal import lfilter

from features.calendar import ShiftCalendar
from features.matrix import FeatureConfig, _History, build_features, cumulative
from features.panel import CountPanel

FULL = FeatureConfig(parent_resolutions=(8, 7), spatial_all_history=True, seasonal=True)


@pytest.fixture(scope="module")
def panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2018, 1, 1, tzinfo=UTC),
                             datetime(2020, 1, 1, tzinfo=UTC))[1]


def sample(n: int, rate: float, seed: int) -> np.ndarray:
    return np.flatnonzero(np.random.default_rng(seed).random(n) < rate)


@pytest.mark.parametrize("config", [FeatureConfig(), FULL], ids=["default", "every-option"])
def test_rows_equal_the_full_matrix_rows(panel, config):
    origins = np.arange(panel.end_shift - 200, panel.end_shift - 100)
    whole = build_features(panel, origins, config)
    rows = sample(whole.X.shape[0], 0.1, seed=1)
    part = build_features(panel, origins, config, rows=rows)
    assert part.columns == whole.columns and part.X.dtype == np.float32
    np.testing.assert_array_equal(part.X, whole.X[rows])  # to the bit, every column
    np.testing.assert_array_equal(part.origin, whole.origin[rows])
    np.testing.assert_array_equal(part.cell, whole.cell[rows])
    assert build_features(panel, origins, config, rows=rows[:0]).X.shape == (0, len(whole.columns))


def test_rows_equal_the_full_matrix_rows_on_a_daily_calendar(panel):
    """One shift a day: the same shift of day is a stride of one shift, read from the running sums the windows
    read (a read outside the rows kept for them would raise)."""
    counts = (panel.counts.with_columns(pl.col("shift") // panel.calendar.per_day).group_by("shift", "cell", "category")
              .agg(pl.col("count").sum()).sort("shift", "cell", "category").cast(panel.counts.schema))
    daily = CountPanel(panel.study_area, ShiftCalendar(panel.calendar.timezone, (0,)), panel.categories,
                       panel.first_shift // panel.calendar.per_day, panel.end_shift // panel.calendar.per_day, counts)
    origins = np.arange(daily.end_shift - 60, daily.end_shift - 20)
    whole = build_features(daily, origins)
    rows = sample(whole.X.shape[0], 0.2, seed=8)
    np.testing.assert_array_equal(build_features(daily, origins, rows=rows).X, whole.X[rows])
    same_day = whole.column("same_shift_28d").reshape(origins.size, -1)
    dense = daily.dense(origins[0] - 28, origins[-1])
    np.testing.assert_array_equal(same_day, [dense[k:k + 28].sum(axis=0) for k in range(origins.size)])


def test_a_history_refuses_reads_outside_the_windows_it_kept():
    rows = np.array([0, 3, 3, 7, 9])
    history = _History(rows, np.array([0, 1, 1, 0, 1]), np.ones(5), h0=0, n_shifts=10, n_cols=2, ends=np.array([10]),
                       reads={1: {4}})
    np.testing.assert_array_equal(history.window(np.array([10]), 4), [[1, 1]])  # rows 7 and 9
    with pytest.raises(RuntimeError, match="outside the reads"):
        history.window(np.array([10]), 5)


def with_future_incidents(panel: CountPanel, start: int, seed: int) -> CountPanel:
    """The panel with random extra incidents in shifts >= ``start`` (every category, every cell)."""
    rng = np.random.default_rng(seed)
    n = 400
    extra = pl.DataFrame({"shift": rng.integers(start, panel.end_shift, n), "cell": rng.integers(0, panel.n_cells, n),
                          "category": rng.integers(0, len(panel.categories), n), "count": rng.integers(1, 4, n)},
                         schema=panel.counts.schema)
    counts = (pl.concat([panel.counts, extra]).group_by("shift", "cell", "category").agg(pl.col("count").sum())
              .sort("shift", "cell", "category").select(panel.counts.columns).cast(panel.counts.schema))
    return CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift, counts)


def test_sampled_rows_never_see_incidents_at_or_after_their_origin(panel):
    """Rows whose origin is at or before ``split`` are identical when incidents from ``split`` on change; later
    rows do see them (so the comparison would catch a leak)."""
    origins = np.arange(panel.end_shift - 150, panel.end_shift - 50)
    split = int(origins[60])
    rows = sample(origins.size * panel.n_cells, 0.2, seed=2)
    base = build_features(panel, origins, FULL, rows=rows)
    changed = build_features(with_future_incidents(panel, split, seed=3), origins, FULL, rows=rows)
    early = base.origin <= split
    assert early.sum() > 0 and (~early).sum() > 0
    np.testing.assert_array_equal(changed.X[early], base.X[early])
    assert not np.array_equal(changed.X[~early], base.X[~early])


def test_row_loops_are_numpys_and_scipys_arithmetic():
    """The per-row loops that replace np.cumsum(axis=0) and lfilter give the same values, to the bit."""
    rng = np.random.default_rng(4)
    counts = (rng.random((500, 300)) < 0.05).astype(np.float32) * rng.integers(1, 5, (500, 300)).astype(np.float32)
    expected = np.zeros((501, 300), np.float32)
    np.cumsum(counts, axis=0, out=expected[1:])
    np.testing.assert_array_equal(cumulative(counts, np.float32), expected)
    noisy = rng.random((200, 100))
    expected64 = np.zeros((201, 100))
    np.cumsum(noisy, axis=0, out=expected64[1:])
    np.testing.assert_array_equal(cumulative(noisy), expected64)
    rows, cols = np.nonzero(counts)
    history = _History(rows, cols, counts[rows, cols], h0=0, n_shifts=500, n_cols=300)
    origins = np.arange(50, 500)
    both = history.decayed(origins, (3.0, 21.0), 40)
    for tau, got in zip((3.0, 21.0), both, strict=True):
        g = np.exp(-1.0 / tau)
        e = np.vstack([np.zeros((1, 300)), lfilter([1.0], [1.0, -g], counts.astype(np.float64), axis=0)])
        lo = origins - 40
        want = (e[origins] - np.where(lo[:, None] >= 0, e[np.maximum(lo, 0)] * g**40, 0.0)).astype(np.float32)
        np.testing.assert_array_equal(got, want)


def test_bad_rows_are_refused_with_the_fix(panel):
    origins = np.arange(panel.end_shift - 20, panel.end_shift - 10)
    with pytest.raises(ValueError, match="sorted unique indices below"):
        build_features(panel, origins, rows=np.array([5, 3]))
    with pytest.raises(ValueError, match="flatnonzero"):
        build_features(panel, origins, rows=np.array([origins.size * panel.n_cells]))
