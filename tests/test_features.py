"""Feature matrices: hand-computed values, batch/single consistency, and the leakage property."""

from datetime import UTC, datetime, timedelta

import h3
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.matrix import FeatureConfig, build_features, build_targets
from features.panel import build_panel
from features.validation import CANONICAL_SCHEMA

CENTER = h3.latlng_to_cell(43.6532, -79.3832, 9)  # Toronto City Hall
# every optional feature on: the leakage and batch/single tests cover the multi-scale and seasonal columns too
FULL = FeatureConfig(parent_resolutions=(8, 7), spatial_all_history=True, seasonal=True)


def incidents_at(rows):
    """rows: (h3 cell, UTC datetime, category) -> canonical incidents placed at cell centres."""
    lat, lon = zip(*(h3.cell_to_latlng(c) for c, _, _ in rows)) if rows else ((), ())
    return pl.DataFrame(
        {
            "incident_id": [f"t{i}" for i in range(len(rows))],
            "occurred_at": [t for _, t, _ in rows],
            "timezone": ["UTC"] * len(rows),
            "category": [c for _, _, c in rows],
            "latitude": list(lat),
            "longitude": list(lon),
            "source": ["test"] * len(rows),
        },
        schema=CANONICAL_SCHEMA,
    )


@pytest.fixture
def toy():
    cal = ShiftCalendar.from_strings("UTC", ["00:00", "08:00", "16:00"])
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(CENTER, 2)], 9)
    first = cal.shift_of(datetime(2020, 1, 1, tzinfo=UTC))
    origin = first + 30
    start = lambda s: cal.bounds([s])["start_utc"][0] + timedelta(minutes=5)  # noqa: E731
    neighbour = sorted(h3.grid_ring(CENTER, 1))[0]
    rows = [
        (CENTER, start(origin - 1), "a"),
        (CENTER, start(origin - 2), "a"),
        (CENTER, start(origin - 2), "b"),
        (CENTER, start(origin - 3), "a"),
        (CENTER, start(origin - 6), "b"),
        (CENTER, start(origin - 21), "a"),
        (neighbour, start(origin - 1), "a"),
        (CENTER, start(origin), "a"),  # at the origin: must not be seen
        (CENTER, start(origin + 5), "b"),  # after: must not be seen
    ]
    panel, report = build_panel(incidents_at(rows), area, cal, ["a", "b"], first_shift=first, end_shift=first + 60)
    assert report.binned == len(rows)
    return (panel, origin, area.index_of(np.array([h3.str_to_int(CENTER)]))[0],
            area.index_of(np.array([h3.str_to_int(neighbour)]))[0])


def test_hand_computed_features(toy):
    panel, origin, c, n = toy
    fm = build_features(panel, origin)
    row = dict(zip(fm.columns, fm.X[c]))
    assert row["count_prev_shift"] == 1
    assert row["count_1d"] == 4  # shifts o-1, o-2 (two incidents), o-3
    assert row["count_7d"] == row["count_28d"] == row["count_365d"] == 6
    assert row["same_shift_28d"] == 3  # o-3, o-6, o-21 share the shift of day
    assert row["same_weekday_shift_8w"] == 1  # o-21
    g = np.exp(-1 / 3)
    assert row["near_repeat_1d"] == pytest.approx(1 + 2 * g + g**2 + g**5 + g**20, rel=1e-6)
    assert row["ring1_mean_7d"] == pytest.approx(1 / 6)  # one incident among the 6 neighbours
    assert row["long_run_rate"] == pytest.approx(6 / 30)
    assert row["cat_a_28d"] == 4 and row["cat_b_28d"] == 2
    assert row["cal_shift_of_day"] == origin % 3
    nrow = dict(zip(fm.columns, fm.X[n]))
    assert nrow["count_prev_shift"] == 1 and nrow["count_7d"] == 1
    assert nrow["ring1_mean_7d"] > 0  # the centre is its neighbour


def test_hand_computed_multiscale_and_seasonal_features():
    """A year of history in UTC shifts 00/08/16; the origin is Friday 2020-01-03, 08:00 (shift of day 1)."""
    cal = ShiftCalendar.from_strings("UTC", ["00:00", "08:00", "16:00"])
    disk = h3.grid_disk(CENTER, 2)
    area = StudyArea([h3.str_to_int(c) for c in disk], 9)
    parent = h3.cell_to_parent(CENTER, 8)
    sibling = next(c for c in sorted(disk) if c != CENTER and h3.cell_to_parent(c, 8) == parent)
    stranger = next(c for c in sorted(disk) if h3.cell_to_parent(c, 8) != parent)
    first = cal.shift_of(datetime(2019, 1, 1, tzinfo=UTC))
    origin = cal.shift_of(datetime(2020, 1, 3, 8, tzinfo=UTC))
    at = lambda *a: datetime(*a, tzinfo=UTC)  # noqa: E731
    rows = [
        (CENTER, at(2019, 1, 4, 9), "a"),  # January, Friday, shift 1
        (CENTER, at(2019, 1, 15, 3), "a"),  # January, Tuesday, shift 0
        (CENTER, at(2019, 2, 10, 12), "a"),  # February, Sunday, shift 1
        (CENTER, at(2019, 12, 27, 10), "a"),  # December, Friday, shift 1
        (CENTER, at(2020, 1, 1, 1), "a"),  # January, Wednesday, shift 0
        (sibling, at(2019, 12, 30, 1), "a"),
        (stranger, at(2019, 12, 30, 1), "a"),
        (CENTER, at(2020, 1, 3, 8, 30), "a"),  # at the origin: unseen
        (CENTER, at(2020, 1, 20, 8, 30), "a"),  # after: unseen
    ]
    panel, _ = build_panel(incidents_at(rows), area, cal, ["a"], first_shift=first, end_shift=origin + 60)
    fm = build_features(panel, origin, FULL)
    c, s_, x = area.index_of(np.array([h3.str_to_int(v) for v in (CENTER, sibling, stranger)]))
    row = dict(zip(fm.columns, fm.X[c]))
    elapsed = origin - first
    assert elapsed == 367 * 3 + 1
    assert row["rate_shift_of_day_all"] == pytest.approx(3 / 367)  # 2019-01-04, 02-10, 12-27 of 367 shift-1s
    assert row["rate_shift_of_week_all"] == pytest.approx(2 / 52)  # 2019-01-04 and 12-27, 52 Friday shift-1s
    assert row["rate_month_all"] == pytest.approx(3 / (93 + 7))  # January 2019 (2) + 2020 so far (1), in shifts
    assert row["parent_r8_28d"] == 3  # 12-27 and 01-01 here, 12-30 in the sibling; not the stranger's
    assert row["parent_r8_365d"] == 6  # the window opens 2019-01-03 08:00: every past incident of the parent
    assert row["parent_r8_all"] == pytest.approx(6 / elapsed)
    assert row["ring1_mean_all"] == pytest.approx(fm.column("long_run_rate")[
        area.index_of(np.array([h3.str_to_int(v) for v in h3.grid_ring(CENTER, 1)]))].mean())
    siblings = area.index_of(np.array([h3.str_to_int(v) for v in disk if h3.cell_to_parent(v, 8) == parent]))
    assert row["parent_r8_rate_month_all"] == pytest.approx(fm.column("rate_month_all")[siblings].sum())
    assert fm.X[s_][fm.columns.index("parent_r8_28d")] == 3 and fm.X[x][fm.columns.index("parent_r8_28d")] == 1
    assert fm.X[s_][fm.columns.index("rate_month_all")] == 0  # December only
    # one origin alone or among others: the same row
    batch = build_features(panel, np.arange(origin - 200, origin + 1), FULL)
    np.testing.assert_allclose(batch.X[-panel.n_cells:], fm.X, rtol=1e-6)
    with pytest.raises(ValueError, match="must be coarser"):
        build_features(panel, origin, FeatureConfig(parent_resolutions=(9,)))


def test_targets_are_the_origin_counts(toy):
    panel, origin, c, _ = toy
    y = build_targets(panel, [origin, origin + 5])
    assert y.shape == (2 * panel.n_cells,)
    assert y[c] == 1 and y[panel.n_cells + c] == 1 and y.sum() == 2
    assert build_targets(panel, [origin + 5], category="a").sum() == 0


def test_origin_before_panel_is_rejected(toy):
    panel, *_ = toy
    with pytest.raises(ValueError, match="precedes"):
        build_features(panel, panel.first_shift - 1)


# --- real data: Toronto --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toronto_panel(toronto_incidents):
    """Downtown Toronto 2018-2020 at resolution 9, with a fixed study area and span."""
    box, panel = toronto_box_panel(toronto_incidents, (43.63, 43.68), (-79.42, -79.36),
                                   datetime(2018, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC))
    return box, panel.study_area, panel.calendar, list(panel.categories), panel


def test_range_build_equals_single_origin_builds(toronto_panel):
    *_, panel = toronto_panel
    origins = np.arange(panel.end_shift - 400, panel.end_shift - 300)
    batch = build_features(panel, origins, FULL)
    for k in (0, 37, 99):
        single = build_features(panel, origins[k], FULL)
        block = batch.X[k * panel.n_cells : (k + 1) * panel.n_cells]
        np.testing.assert_allclose(single.X, block, rtol=1e-5, atol=1e-6)
    assert batch.X.shape == (100 * panel.n_cells, len(batch.columns))
    assert np.isfinite(batch.X).all()


def test_window_counts_match_a_direct_count_of_incidents(toronto_panel):
    box, area, cal, _, panel = toronto_panel
    origin = panel.end_shift - 200
    fm = build_features(panel, origin)
    start = cal.bounds([origin])["start_utc"][0]
    week = box.filter((pl.col("occurred_at") < start) & (pl.col("occurred_at") >= cal.bounds([origin - 21])["start_utc"][0]))
    assert fm.column("count_7d").sum() == week.height


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incidents_at_or_after_origin_never_change_its_features(toronto_panel, data):
    """Adding or removing any incident at or after t's start leaves t's feature rows unchanged."""
    box, area, cal, cats, panel = toronto_panel
    origin = data.draw(st.integers(panel.first_shift + 1, panel.end_shift - 10), label="origin")
    t0 = cal.bounds([origin])["start_utc"][0]
    future = box.filter(pl.col("occurred_at") >= t0)
    base = build_features(panel, origin, FULL)

    drop_rows = data.draw(st.lists(st.integers(0, future.height - 1), max_size=50, unique=True), label="drop")
    drop_ids = set(future["incident_id"].gather(drop_rows).to_list()) if drop_rows else set()
    n_add = data.draw(st.integers(0, 20), label="add")
    offsets = data.draw(st.lists(st.integers(0, 3 * 86400 * 30), min_size=n_add, max_size=n_add), label="offsets")
    cells = data.draw(st.lists(st.integers(0, len(area) - 1), min_size=n_add, max_size=n_add), label="cells")
    lat, lon = area.centroids
    added = pl.DataFrame(
        {
            "incident_id": [f"new{i}" for i in range(n_add)],
            "occurred_at": [t0 + timedelta(seconds=o) for o in offsets],
            "timezone": ["America/Toronto"] * n_add,
            "category": [cats[i % len(cats)] for i in range(n_add)],
            "latitude": [float(lat[c]) for c in cells],
            "longitude": [float(lon[c]) for c in cells],
            "source": ["test"] * n_add,
        },
        schema=CANONICAL_SCHEMA,
    )
    changed = pl.concat([box.filter(~pl.col("incident_id").is_in(list(drop_ids))), added])
    changed_panel, _ = build_panel(changed, area, cal, cats, first_shift=panel.first_shift, end_shift=panel.end_shift)
    after = build_features(changed_panel, origin, FULL)
    assert after.columns == base.columns
    np.testing.assert_array_equal(after.X, base.X)


def test_a_leak_would_be_caught(toronto_panel):
    """Sanity check of the property test: an incident just before t's start does change t's features."""
    box, area, cal, cats, panel = toronto_panel
    origin = panel.end_shift - 50
    t0 = cal.bounds([origin])["start_utc"][0]
    lat, lon = area.centroids
    extra = box.head(1).with_columns(
        pl.lit("x").alias("incident_id"), pl.lit(t0 - timedelta(minutes=1)).alias("occurred_at"),
        pl.lit(float(lat[0])).alias("latitude"), pl.lit(float(lon[0])).alias("longitude"),
    )
    changed, _ = build_panel(pl.concat([box, extra]), area, cal, cats, first_shift=panel.first_shift, end_shift=panel.end_shift)
    assert not np.array_equal(build_features(changed, origin).X, build_features(panel, origin).X)
    # and the long-history columns alone see it too
    new = [j for j, name in enumerate(build_features(panel, origin, FULL).columns) if "_all" in name]
    assert not np.array_equal(build_features(changed, origin, FULL).X[:, new], build_features(panel, origin, FULL).X[:, new])


def test_config_changes_columns():
    cfg = FeatureConfig(window_days=(1, 7), same_shift_days=(28,), spatial_window_days=(7, 28), include_location=False)
    assert cfg.lookback(3) == 56 * 3
    assert FeatureConfig(window_days=(1, 7), same_shift_days=(28,), spatial_window_days=(7, 28), seasonal=True,
                         parent_resolutions=(8,), parent_window_days=(90, None)).lookback(3) == 90 * 3
