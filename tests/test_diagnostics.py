"""Production diagnostics: hand-computed toy cases for every measure, the gain grouping on a real LightGBM fit,
the dose regression against a known truth (simulated patrols: a known rate ratio), and a real Toronto slice."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime

import h3
import mlflow
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.matrix import FeatureConfig, build_targets
from features.panel import COUNTS_SCHEMA, CountPanel
from forecasting.baselines import Naive
from forecasting.diagnostics import (
    FlagRule,
    diagnose,
    feature_groups,
    flag_diagnostics,
    flag_matrix,
    gain_share,
    run_lengths,
)
from forecasting.lgbm import LightGBMForecaster
from forecasting.measures import gini, jaccard, top_share
from forecasting.metrics import shift_hits
from forecasting.patrol_dose import dose_bin_edges, patrol_diagnostics
from forecasting.reporting.assess import log_diagnostics
from forecasting.reporting.diagnostics_view import diagnostics_page, diagnostics_section
from forecasting.reporting.templating import png_data_uri

# --- hand-computed toy cases -------------------------------------------------------------------------


def test_gini_hand_values():
    assert gini(np.full(10, 7.0)) == pytest.approx(0.0)
    one = np.zeros(8)
    one[3] = 100  # one cell holds every flag: (n - 1) / n
    assert gini(one) == pytest.approx(7 / 8)
    # [0, 0, 1, 1]: mean absolute difference over all 16 ordered pairs = 8/16, over 2 x mean 0.5 -> 0.5
    assert gini([1, 0, 1, 0]) == pytest.approx(0.5)
    assert gini(np.zeros(5)) == 0.0


def test_top_share_hand_values():
    counts = np.array([50, 30, 10, 5, 5, 0, 0, 0, 0, 0] * 10, dtype=float)  # 100 cells
    assert top_share(counts, 0.01) == pytest.approx(50 / 1000)  # 1 cell
    assert top_share(counts, 0.05) == pytest.approx(250 / 1000)  # 5 cells: five 50s


def test_jaccard_identical_disjoint_and_partial():
    a = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    b = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_allclose(jaccard(a, b), [1.0, 0.0, 2 / 4, 1.0])


def test_measures_row_by_row_equal_one_row_at_a_time():
    """The simulator measures rows (rounds), the diagnostics one vector: the same numbers either way."""
    rng = np.random.default_rng(11)
    counts = rng.poisson(0.4, (6, 50)).astype(float)
    counts[2] = 0  # an empty row: Gini 0, top share undefined
    masks = rng.random((6, 50)) < 0.2
    masks[4] = False
    np.testing.assert_array_equal(gini(counts), [gini(row) for row in counts])
    np.testing.assert_array_equal(top_share(counts, 0.05), [top_share(row, 0.05) for row in counts])
    np.testing.assert_array_equal(top_share(counts, k=3), top_share(counts, 0.05))  # ceil(5% of 50) = 3 values
    np.testing.assert_array_equal(jaccard(masks, masks[::-1]), [jaccard(a, b) for a, b in zip(masks, masks[::-1])])
    assert np.isnan(top_share(counts, k=3)[2]) and gini(counts)[2] == 0.0 and jaccard(masks[4], masks[4]) == 1.0
    assert isinstance(gini(counts[0]), float) and gini(counts).shape == (6,)
    with pytest.raises(ValueError, match="exactly one of share"):
        top_share(counts, 0.05, k=3)


def test_run_lengths_of_a_known_matrix():
    flags = np.array([
        [1, 0, 1, 0],
        [1, 0, 0, 0],
        [0, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 0, 0, 0],
    ], dtype=bool)
    lengths, censored = run_lengths(flags)
    # column 0: runs 2 (from the start) and 2 (to the end); column 1: 2; column 2: 1 (start), 2; column 3: none
    np.testing.assert_array_equal(lengths, [2, 2, 2, 1, 2])
    np.testing.assert_array_equal(censored, [True, True, False, True, False])
    assert lengths.sum() == flags.sum()


def _shift_ids(n: int, first: int = 3000) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.int64)


def test_one_cell_always_flagged_is_a_static_map():
    n_cells, origins = 10, _shift_ids(12)
    pred = np.ones((12, n_cells))
    pred[:, 4] = 5.0
    d = flag_diagnostics(pred, np.ones(n_cells), origins, 3, FlagRule(top_k=1))
    assert d.gini == pytest.approx(9 / 10) and d.gini_static == pytest.approx(9 / 10)
    assert d.top1_share == 1.0 and d.cells_ever_flagged == 1 and d.rotation == 1.0
    assert d.jaccard_shift == 1.0 and d.jaccard_day == 1.0 and d.churn_shift == 0.0
    assert d.runs_shift.max == 12 and d.runs_shift.n_runs == 1 and d.runs_shift.censored_share == 1.0
    assert d.runs_day.n_runs == 3 and d.runs_day.mean == 4  # each shift of day flagged on all 4 days
    assert d.tie_share == 0.0


def test_a_rotating_map_has_no_concentration_and_full_churn():
    n_cells, n_shifts = 6, 12
    origins = _shift_ids(n_shifts)
    pred = np.zeros((n_shifts, n_cells))
    pred[np.arange(n_shifts), np.arange(n_shifts) % n_cells] = 1.0  # cell i flagged at shifts i, i + 6
    d = flag_diagnostics(pred, np.ones(n_cells), origins, 3, FlagRule(top_k=1))
    assert d.gini == pytest.approx(0.0) and d.cells_ever_flagged == n_cells and d.rotation == n_cells
    assert d.jaccard_shift == 0.0 and d.jaccard_day == 0.0 and d.churn_day == 1.0
    assert d.runs_shift.max == 1 and d.runs_shift.n_runs == n_shifts
    # ties: the unflagged cells are all 0 but the flagged one is 1, so no flag is a tie-break
    assert d.tie_share == 0.0


def test_same_shift_of_day_runs_and_gaps_in_the_origins():
    per_day, n_days, n_cells = 3, 5, 4
    origins = _shift_ids(per_day * n_days, first=3000)  # 3000 % 3 == 0: starts at shift of day 0
    pred = np.zeros((origins.size, n_cells))
    pred[origins % per_day == 0, 2] = 1.0  # cell 2 is flagged every morning, nothing else is ever on top...
    pred[origins % per_day != 0, 1] = 1.0  # ...cell 1 the rest of the day
    d = flag_diagnostics(pred, np.ones(n_cells), origins, per_day, FlagRule(top_k=1))
    assert d.runs_day.max == n_days  # mornings on 5 consecutive days
    np.testing.assert_array_equal(d.runs_shift.lengths, [1, 2])  # cell 2 runs of 1 shift, cell 1 runs of 2
    assert d.jaccard_day == 1.0 and d.jaccard_shift == pytest.approx(5 / 14)  # 14 pairs, 5 (late->late) equal
    # a missing shift breaks runs and consecutive pairs instead of joining them
    keep = origins != origins[7]
    g = flag_diagnostics(pred[keep], np.ones(n_cells), origins[keep], per_day, FlagRule(top_k=1))
    assert g.series_shift[1].size == 12 and g.runs_shift.lengths @ g.runs_shift.counts == keep.sum()


def test_coverage_rule_and_ties_follow_the_metrics_module():
    rng = np.random.default_rng(3)
    n_cells, origins = 50, _shift_ids(20)
    areas = rng.uniform(0.08, 0.12, n_cells)
    pred = rng.integers(0, 3, (20, n_cells)).astype(float)  # many ties
    observed = rng.poisson(0.5, (20, n_cells)).astype(float)
    flags = flag_matrix(pred, areas, origins, FlagRule(coverage=0.1))
    h = shift_hits(pred, observed, areas, origins, [0.1])
    np.testing.assert_array_equal(flags.sum(axis=1), h.n_flagged[:, 0])
    np.testing.assert_allclose((flags * observed).sum(axis=1), h.hits[:, 0])
    d = flag_diagnostics(pred, areas, origins, 3, FlagRule(coverage=0.1))
    assert 0 < d.tie_share <= 1  # integer forecasts tie at the boundary
    with pytest.raises(ValueError, match="exactly one"):
        FlagRule(coverage=0.1, top_k=3)


# --- gain share on a real LightGBM fit ---------------------------------------------------------------


@pytest.fixture(scope="module")
def toronto_panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.63, 43.69), (-79.43, -79.35), datetime(2018, 1, 1, tzinfo=UTC))[1]


def test_gain_share_groups_a_real_lightgbm_fit(toronto_panel):
    panel = toronto_panel
    model = LightGBMForecaster(train_days=240, valid_days=28, n_estimators=60, zero_rate=0.1, num_threads=1)
    model.fit(panel, panel.end_shift - 60)
    importance = model.feature_importance()
    groups = feature_groups(panel.calendar, panel.categories, model.features)
    assert set(groups) == set(model.columns_)  # the probe builds exactly the model's columns
    share = gain_share(importance, groups)
    assert share.unknown == []
    assert sum(share.by_group.values()) == pytest.approx(1.0)
    # cross-check against the naming convention of features/matrix.py (independent of the probe)
    for name, group in groups.items():
        if "ring" in name:
            assert group == "neighbour_lagged", name
        elif name.startswith(("count_", "same_", "near_repeat_", "cat_", "long_run")):
            assert group == "own_lagged", name
        elif name.startswith("cal_"):
            assert group == "calendar", name
        else:
            assert name in ("cell_lat", "cell_lon") and group == "static", name
    total = sum(importance.values())
    lagged = ("count_", "same_", "near_repeat", "cat_", "long_run", "ring")
    by_name = sum(v for k, v in importance.items() if k.startswith(lagged))
    assert share.lagged_share == pytest.approx(by_name / total)
    assert share.lagged_share > 0.5  # on real data the cell's recorded history carries most of the gain


def test_feature_groups_follow_the_config_and_categories():
    cal = ShiftCalendar("UTC", (0, 480, 960))
    groups = feature_groups(cal, ["a", "b"], FeatureConfig(window_days=(2, 365), include_location=False))
    assert groups["count_2d"] == "own_lagged" and groups["cat_b_28d"] == "own_lagged"
    assert "cell_lat" not in groups and "count_7d" not in groups
    assert groups["cal_shift_hours"] == "calendar"  # constant in UTC, still an origin-level feature
    with pytest.raises(ValueError, match="empty"):
        gain_share({}, groups)


# --- dose regression against a known truth -----------------------------------------------------------

TRUE_RR_PREV_SHIFT, TRUE_RR_PREV_DAY = 1.30, 0.85  # per 60 minutes of patrol


@pytest.fixture(scope="module")
def patrolled_city():
    """Synthetic: a known expected count per cell and shift, patrols sent to the cells the model ranks high
    (with noise), and recorded crime that depends on the previous shift's and previous day's dose by known
    rate ratios. 30% of recorded crime is 'discovered' (binomial thinning, same dose effect)."""
    rng = np.random.default_rng(11)
    cal = ShiftCalendar("America/Toronto")
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(43.70, -79.40, 9), 9)], 9)
    n_cells, per_day, n_days = len(area), cal.per_day, 200
    first = cal.local_day(datetime(2021, 3, 1).date()) * per_day
    n_shifts = n_days * per_day
    shifts = np.arange(first, first + n_shifts)
    base = rng.lognormal(np.log(0.08), 0.9, n_cells)
    mu = base[None, :] * np.array([0.7, 1.0, 1.3])[shifts % per_day][:, None]
    noisy = np.log(mu) + rng.normal(0, 0.8, mu.shape)
    top = np.argsort(-noisy, axis=1)[:, :25]
    dose = np.zeros_like(mu)
    np.put_along_axis(dose, top, rng.uniform(10, 120, top.shape), axis=1)
    extra = rng.integers(0, n_cells, (n_shifts, 8))
    np.put_along_axis(dose, extra, rng.uniform(5, 30, extra.shape), axis=1)
    prev_shift = np.vstack([np.zeros((1, n_cells)), dose[:-1]])
    prev_day = np.vstack([np.zeros((per_day, n_cells)), dose[:-per_day]])
    rate = mu * TRUE_RR_PREV_SHIFT ** (prev_shift / 60) * TRUE_RR_PREV_DAY ** (prev_day / 60)
    total = rng.poisson(rate)
    discovered = rng.binomial(total, 0.3)
    t, c = np.nonzero(total)
    counts = pl.concat([
        pl.DataFrame({"shift": shifts[t], "cell": c, "category": 0, "count": total[t, c] - discovered[t, c]}),
        pl.DataFrame({"shift": shifts[t], "cell": c, "category": 1, "count": discovered[t, c]}),
    ]).filter(pl.col("count") > 0).cast(COUNTS_SCHEMA).sort("shift", "cell", "category")
    panel = CountPanel(area, cal, ("reported", "discovered"), first, first + n_shifts, counts,
                       meta={"discovered_categories": ["discovered"]})
    pt, pc = np.nonzero(dose)
    h3_ids = np.array(area.h3_ids)
    patrols = pl.DataFrame({"shift_id": shifts[pt], "h3": h3_ids[pc], "dose_minutes": dose[pt, pc]})
    origins = shifts[per_day * 7:]  # a test period after a week of logged patrols
    rows = origins - first
    return panel, patrols, origins, mu[rows], total[rows].astype(float), dose[rows]


@pytest.fixture(scope="module")
def dose_result(patrolled_city):
    """The default (offset) analysis of the patrolled city, shared by the regression and the bins tests (they
    made the same call with the same arguments, each 1-2 CPU-s)."""
    panel, patrols, origins, mu, observed, _ = patrolled_city
    return patrol_diagnostics(patrols, panel, origins, mu, observed, n_boot=200)


def test_dose_regression_recovers_the_known_rate_ratios(patrolled_city, dose_result):
    panel, patrols, origins, mu, observed, _ = patrolled_city
    result = dose_result
    reg = {(r["outcome"], r["term"]): r for r in result.regression.iter_rows(named=True)}
    for term, truth in (("prev_shift", TRUE_RR_PREV_SHIFT), ("prev_day", TRUE_RR_PREV_DAY)):
        r = reg[("all", term)]
        assert r["low"] < truth < r["high"], (term, r)
        assert r["high"] / r["low"] < 1.15  # informative, not a vacuous interval
    assert reg[("all", "intercept")]["rate_ratio_per_60min"] == pytest.approx(1.0, abs=0.05)  # calibrated offset
    assert "cluster-robust" in result.method and "statsmodels" in result.method
    # the split exists because the panel says which category is discovered; the thinning keeps the effect
    assert result.split_available and {o for o, _ in reg} == {"all", "discovered", "reported"}
    assert reg[("discovered", "prev_shift")]["low"] < TRUE_RR_PREV_SHIFT < reg[("discovered", "prev_shift")]["high"]
    # a proportionally wrong expectation moves the intercept, not the dose effect
    scaled = patrol_diagnostics(patrols, panel, origins, 2 * mu, observed, n_boot=50)
    s = {(r["outcome"], r["term"]): r for r in scaled.regression.iter_rows(named=True)}
    assert s[("all", "prev_shift")]["coef"] == pytest.approx(reg[("all", "prev_shift")]["coef"], rel=1e-6)
    assert s[("all", "intercept")]["rate_ratio_per_60min"] == pytest.approx(
        0.5 * reg[("all", "intercept")]["rate_ratio_per_60min"], rel=1e-6)


def test_dose_regression_with_the_expected_count_as_covariate(patrolled_city):
    panel, patrols, origins, mu, observed, _ = patrolled_city
    keep = slice(0, 150)  # a smaller fit: every cell-shift is a row in this mode
    result = patrol_diagnostics(patrols, panel, origins[keep], mu[keep], observed[keep], control="covariate", n_boot=20)
    reg = {r["term"]: r for r in result.regression.filter(pl.col("outcome") == "all").iter_rows(named=True)}
    assert reg["prev_shift"]["low"] < TRUE_RR_PREV_SHIFT < reg["prev_shift"]["high"]
    assert 0.9 < reg["log_expected"]["coef"] < 1.1  # the slope on log(expected) of a calibrated forecast


def test_dose_bins_hand_computed(patrolled_city, dose_result):
    panel, patrols, origins, mu, observed, dose = patrolled_city
    result = dose_result
    bins = result.bins.filter(pl.col("outcome") == "all")
    assert bins["bin"].to_list() == ["0", "(0, 15]", "(15, 30]", "(30, 60]", ">60"]
    masks = [dose == 0, (dose > 0) & (dose <= 15), (dose > 15) & (dose <= 30), (dose > 30) & (dose <= 60), dose > 60]
    for row, m in zip(bins.iter_rows(named=True), masks):
        assert row["cell_shifts"] == m.sum()
        assert row["rate"] == pytest.approx(observed[m].mean())
        assert row["obs_exp"] == pytest.approx(observed[m].sum() / mu[m].sum())
        assert row["rate_low"] <= row["rate"] <= row["rate_high"]
    assert result.n_patrolled == int((dose > 0).sum())
    assert result.total_dose_hours == pytest.approx(dose.sum() / 60)
    # reported + discovered = all, bin by bin
    parts = result.bins.filter(pl.col("outcome") != "all").group_by("bin").agg(pl.col("recorded").sum())
    joined = bins.join(parts, on="bin", suffix="_parts")
    np.testing.assert_allclose(joined["recorded"], joined["recorded_parts"])
    q = dose_bin_edges(dose, "quantile")
    assert q[0] == 0 and q.size == 4 and np.all(np.diff(q) > 0)


def test_no_split_is_said_not_invented(patrolled_city):
    panel, patrols, origins, mu, observed, _ = patrolled_city
    plain = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift,
                       panel.counts)
    result = patrol_diagnostics(patrols, plain, origins, mu, observed, n_boot=20)
    assert not result.split_available and "not available" in result.split_note
    assert set(result.regression["outcome"]) == {"all"} and set(result.bins["outcome"]) == {"all"}
    with pytest.raises(KeyError, match="unknown category"):
        patrol_diagnostics(patrols, plain, origins, mu, observed, discovered_categories=["narcotics"], n_boot=20)


def test_bad_patrol_logs_get_clear_errors(patrolled_city):
    panel, patrols, origins, mu, observed, _ = patrolled_city
    with pytest.raises(ValueError, match="lacks column"):
        patrol_diagnostics(patrols.drop("dose_minutes"), panel, origins, mu, observed)
    with pytest.raises(ValueError, match="negative dose_minutes"):
        patrol_diagnostics(patrols.with_columns(pl.col("dose_minutes") * -1), panel, origins, mu, observed)
    with pytest.raises(ValueError, match="expected and observed"):
        patrol_diagnostics(patrols, panel, origins, mu[:-1], observed)
    # rows for unknown or foreign cells are counted and set aside, not fatal
    junk = pl.DataFrame({"shift_id": [int(origins[5])] * 2, "h3": ["not-a-cell", h3.latlng_to_cell(0.0, 0.0, 9)],
                         "dose_minutes": [10.0, 10.0]})
    result = patrol_diagnostics(pl.concat([patrols, junk]), panel, origins, mu, observed, n_boot=20)
    assert result.dropped["unparseable_h3"] == 1 and result.dropped["outside_study_area"] == 1
    assert any("not placed" in n for n in result.notes)


# --- real Toronto slice: naive and a memory-less map -------------------------------------------------


@pytest.fixture(scope="module")
def toronto_naive(toronto_panel):
    panel = toronto_panel
    cutoff = panel.end_shift - 90
    origins = np.arange(cutoff, panel.end_shift)
    naive = Naive().fit(panel, cutoff).predict(panel, origins)
    noise = np.random.default_rng(0).random(naive.shape)  # a map with no memory of where crime was
    observed = build_targets(panel, origins).reshape(origins.size, panel.n_cells).astype(float)
    return panel, origins, {"naive": naive, "random": noise}, observed


def test_real_slice_concentration_and_churn(toronto_naive):
    panel, origins, preds, observed = toronto_naive
    areas = panel.study_area.areas_km2
    d = diagnose(preds, observed, areas, origins, panel.calendar.per_day, model="naive", baseline="random",
                 coverages=(0.05,), top_k=(10,))
    n = panel.n_cells
    for tag in ("5pct", "top10"):
        nv, rnd = d.flags[("naive", tag)], d.flags[("random", tag)]
        k = nv.mean_flagged
        random_jaccard = k / (2 * n - k)  # expected Jaccard of two independent random k-sets
        assert rnd.jaccard_shift == pytest.approx(random_jaccard, rel=0.5)
        assert nv.jaccard_day > 3 * random_jaccard and nv.jaccard_shift > 3 * random_jaccard
        assert rnd.gini < nv.gini <= nv.gini_static + 0.01
        assert nv.cells_ever_flagged < rnd.cells_ever_flagged <= n
        assert nv.runs_shift.mean > rnd.runs_shift.mean
        for f in (nv, rnd):
            assert f.runs_shift.lengths @ f.runs_shift.counts == f.flag_counts.sum()  # every flag in one run
            assert f.runs_day.lengths @ f.runs_day.counts == f.flag_counts.sum()
    h = shift_hits(preds["naive"], observed, areas, origins, [0.05])
    np.testing.assert_array_equal(d.flags[("naive", "5pct")].flag_counts.sum(), h.n_flagged.sum())


def test_result_exports(toronto_naive, tmp_path):
    panel, origins, preds, observed = toronto_naive
    d = diagnose(preds, observed, panel.study_area.areas_km2, origins, panel.calendar.per_day, model="naive",
                 baseline="random", coverages=(0.01, 0.05), importance={"count_7d": 3.0, "cal_month": 1.0}, panel=panel)
    flat = d.to_dict()
    assert flat["diag.gini.5pct"] == pytest.approx(d.flags[("naive", "5pct")].gini)
    assert flat["diag.baseline.jaccard_mean.1pct"] == pytest.approx(d.flags[("random", "1pct")].jaccard_shift)
    assert flat["diag.gain_lagged_share"] == pytest.approx(0.75)
    assert all(isinstance(v, float) and np.isfinite(v) for v in flat.values())
    payload = json.loads(json.dumps(d.payload(), allow_nan=False))
    assert payload["patrol"] is None and "no patrol log" in payload["patrol_note"]
    assert len(payload["flags"]) == 4 and payload["flags"][0]["lorenz"]["flag_share"][-1] == pytest.approx(1.0)
    # the figure is drawn once (each drawing of this 13 x 9.5 inch figure was a quarter of the module's CPU): the
    # section draws it, the page and the pixel check reuse the PNG the section embeds, as log_diagnostics does
    section = diagnostics_section(d)
    assert section.startswith('<section class="diagnostics">') and section.endswith("</section>")
    assert f"{d.flags[('naive', '5pct')].gini:.3f}" in section and section.count("data:image/png;base64,") == 1
    png = base64.b64decode(section.split("data:image/png;base64,")[1].split('"')[0])
    page = diagnostics_page(d, "Toronto <toy>", png=png)
    assert page.startswith("<!DOCTYPE html>") and "<h1>Toronto &lt;toy&gt;</h1>" in page
    assert page.count("data:image/png;base64,") == 1 and f"{d.flags[('naive', '5pct')].gini:.3f}" in page
    assert png_data_uri(png) in page
    pixels = imread(io.BytesIO(png), format="png")[..., :3] * 255
    assert pixels.std() > 10  # not blank
    with pytest.raises(KeyError, match="no predictions"):
        diagnose(preds, observed, panel.study_area.areas_km2, origins, 3, model="lightgbm")
    with pytest.raises(ValueError, match="needs the panel"):
        diagnose(preds, observed, panel.study_area.areas_km2, origins, 3, model="naive", importance={"x": 1.0})


def test_logs_into_mlflow_where_the_model_card_reads(toronto_naive, patrolled_city, tmp_path):
    from service_support import isolated_mlflow_env

    from features.settings import Settings
    from forecasting.reporting.tracking import configure

    panel, patrols, origins, mu, observed, _ = patrolled_city
    d = diagnose({"m": mu}, observed, panel.study_area.areas_km2, origins, 3, model="m", baseline=None,
                 coverages=(0.05,), patrols=patrols, panel=panel, n_boot=20)
    assert d.baseline is None and d.to_dict()["diag.dose.rate_ratio.prev_shift"] > 1
    with isolated_mlflow_env():
        configure(Settings(data_dir=tmp_path / "data"))
        with mlflow.start_run() as run:
            log_diagnostics(d)
        client = MlflowClient()
        metrics = client.get_run(run.info.run_id).data.metrics
        assert metrics["diagnostics.gini.5pct"] == pytest.approx(d.flags[("m", "5pct")].gini)
        assert "patrol_diagnostics.rate_ratio.prev_day" in metrics
        files = {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")}
        assert files == {"diagnostics/diagnostics.json", "diagnostics/diagnostics.html", "diagnostics/diagnostics.png"}
