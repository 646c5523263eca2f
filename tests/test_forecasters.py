"""Every forecaster: a hand-computed case, the shared contract, and no test-period data reaching fit."""

from datetime import UTC, datetime, timedelta

import h3
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.panel import CountPanel, build_panel
from features.synthetic import SyntheticCity, simulate, smooth_background
from forecasting.base import NotFittedError
from forecasting.baselines import KDE, SEPP, Naive, ProspectiveHotspot
from forecasting.lgbm import LightGBMForecaster

CENTER = h3.latlng_to_cell(43.6532, -79.3832, 9)
CAL = ShiftCalendar.from_strings("UTC", ["00:00", "08:00", "16:00"])
FIRST = CAL.shift_of(datetime(2020, 1, 1, tzinfo=UTC))


def toy_panel(events: dict[tuple[str, int], int], span: int = 200) -> tuple[CountPanel, StudyArea]:
    """events: (h3 cell, shift offset from FIRST) -> count."""
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(CENTER, 3)], 9)
    rows = []
    for (cell, offset), n in events.items():
        lat, lon = h3.cell_to_latlng(cell)
        start = CAL.bounds([FIRST + offset])["start_utc"][0]
        rows += [(f"{cell}-{offset}-{i}", start + timedelta(minutes=1), lat, lon) for i in range(n)]
    incidents = pl.DataFrame(
        {"incident_id": [r[0] for r in rows], "occurred_at": [r[1] for r in rows], "timezone": "UTC",
         "category": "x", "latitude": [r[2] for r in rows], "longitude": [r[3] for r in rows], "source": "t"},
        schema_overrides={"occurred_at": pl.Datetime("us", "UTC")},
    )
    panel, _ = build_panel(incidents, area, CAL, ["x"], first_shift=FIRST, end_shift=FIRST + span)
    return panel, area


def idx(area, cell):
    return int(area.index_of(np.array([h3.str_to_int(cell)]))[0])


def test_naive_is_the_trailing_mean():
    panel, area = toy_panel({(CENTER, 97): 2, (CENTER, 99): 1, (CENTER, 95): 5})
    f = Naive(window_days=1).fit(panel, FIRST + 100)
    pred = f.predict(panel, FIRST + 100)
    assert pred.shape == (1, len(area))
    assert pred[0, idx(area, CENTER)] == pytest.approx(3 / 3)  # shifts 97..99: 2 + 1, the 5 is older
    assert pred.sum() == pytest.approx(1.0)


def test_kde_spreads_one_unit_of_mass_symmetrically():
    panel, area = toy_panel({(CENTER, 99): 1})
    pred = KDE(bandwidth_m=300, window_days=1).fit(panel, FIRST + 100).predict(panel, FIRST + 100)[0]
    assert pred.sum() == pytest.approx(1 / 3)  # one incident over a 3-shift window
    c = idx(area, CENTER)
    ring = [idx(area, n) for n in h3.grid_ring(CENTER, 1)]
    assert pred[c] == pred.max() and np.ptp(pred[ring]) < 0.1 * pred[ring].mean()
    # narrow kernel: all the mass stays home
    narrow = KDE(bandwidth_m=20, window_days=1).fit(panel, FIRST + 100).predict(panel, FIRST + 100)[0]
    assert narrow[c] == pytest.approx(1 / 3)


def test_prospective_weights_hand_computed():
    # an incident 1 whole week before the origin (w = 1) and one in the last week (w = 0)
    panel, area = toy_panel({(CENTER, 100 - 21 - 1): 1, (CENTER, 99): 1})
    f = ProspectiveHotspot(bandwidth_m=400, weeks=2).fit(panel, FIRST + 100)
    assert f.rings_ == 1  # ring spacing at res 9 is ~300 m
    pred = f.predict(panel, FIRST + 100)[0]
    own = 1 / (1 + 0) + 1 / (1 + 1)  # 1.5
    neighbour = own / (1 + 1)  # 0.75 at distance 1
    total = own + 6 * neighbour
    recent_rate = 2 / (2 * 21)
    c = idx(area, CENTER)
    assert pred[c] == pytest.approx(own / total * recent_rate)
    assert pred[idx(area, h3.grid_ring(CENTER, 1)[0])] == pytest.approx(neighbour / total * recent_rate)
    assert pred[idx(area, h3.grid_ring(CENTER, 2)[0])] == 0


def test_sepp_intensity_hand_computed():
    panel, area = toy_panel({(CENTER, 99): 1, (CENTER, 97): 2})
    f = SEPP().fit(panel, FIRST + 100)
    f.mu_ = np.full(len(area), 0.01)
    f.theta_, f.g_ = 0.5, 0.8
    pred = f.predict(panel, FIRST + 100)[0]
    # mu + theta (1 - g) (1 * g^0 + 2 * g^2)
    assert pred[idx(area, CENTER)] == pytest.approx(0.01 + 0.5 * 0.2 * (1 + 2 * 0.8**2))
    assert pred[idx(area, h3.grid_ring(CENTER, 1)[0])] == pytest.approx(0.01)


def test_sepp_recovers_known_parameters_on_the_synthetic_city():
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(43.65, -79.38, 8), 6)], 8)
    cal = ShiftCalendar("America/Toronto")
    city = SyntheticCity(
        study_area=area, calendar=cal, background=smooth_background(area, total_per_day=60, seed=3),
        shift_profile=(1.0, 1.0, 1.0), weekday_profile=(1.0,) * 7,
        branching_ratio=0.4, decay_per_hour=1 / 72, spread=0.0,
    )
    first = cal.shift_of(datetime(2019, 1, 1, tzinfo=UTC))
    result = simulate(city, first, first + 3 * 730, seed=11, burn_in_shifts=300)
    panel = result.panel()
    f = SEPP(fit_days=730).fit(panel, panel.end_shift)
    # Offspring landing in their parent's own shift (~5% at a 72 h mean delay) look like background, and
    # the maximum-likelihood estimate itself runs ~0.03 low at this sample size (checked on data simulated
    # from SEPP's own discrete model, where EM's optimum has a higher likelihood than the true parameters).
    assert f.theta_ == pytest.approx(0.4, abs=0.08)
    assert f.mean_lag_shifts == pytest.approx(72 / 8 + 0.5, rel=0.3)
    assert f.n_iter_ < f.max_iter
    true_mu = city.background * 8
    assert np.corrcoef(f.mu_, true_mu)[0, 1] > 0.9
    assert f.mu_.sum() == pytest.approx(true_mu.sum(), rel=0.15)


@pytest.fixture(scope="module")
def toronto_panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.63, 43.69), (-79.43, -79.35), datetime(2018, 1, 1, tzinfo=UTC))[1]


def small_lgbm(**kw):
    return LightGBMForecaster(**(dict(train_days=240, valid_days=28, n_estimators=60, zero_rate=0.1, num_threads=1) | kw))


FORECASTERS = [
    lambda: Naive(), lambda: KDE(), lambda: ProspectiveHotspot(), lambda: SEPP(fit_days=180), lambda: small_lgbm(),
]


@pytest.mark.parametrize("make", FORECASTERS, ids=["naive", "kde", "prospective", "sepp", "lightgbm"])
def test_no_test_period_data_reaches_fit(toronto_panel, make):
    """Poison every shift at or after the cutoff: the fitted model (and its forecast for the cutoff) must not move."""
    panel = toronto_panel
    cutoff = panel.end_shift - 90
    poisoned_rows = panel.counts.with_columns(
        pl.when(pl.col("shift") >= cutoff).then(pl.col("count") * 50).otherwise(pl.col("count")).alias("count")
    )
    poisoned = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift, poisoned_rows)
    clean_pred = make().fit(panel, cutoff).predict(panel, cutoff)
    poisoned_pred = make().fit(poisoned, cutoff).predict(panel, cutoff)
    np.testing.assert_array_equal(clean_pred, poisoned_pred)
    assert clean_pred.shape == (1, panel.n_cells) and np.all(clean_pred >= 0) and clean_pred.sum() > 0


def test_a_leaking_forecaster_would_fail_that_test(toronto_panel):
    """Control: a model that peeks at the shifts after the cutoff changes under the same poisoning."""
    panel = toronto_panel
    cutoff = panel.end_shift - 90
    peek = lambda p: p.cell_totals(cutoff, p.end_shift)  # noqa: E731 - what a leaking fit would read
    poisoned_rows = panel.counts.with_columns(
        pl.when(pl.col("shift") >= cutoff).then(pl.col("count") * 50).otherwise(pl.col("count")).alias("count")
    )
    poisoned = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift, poisoned_rows)
    assert not np.array_equal(peek(panel), peek(poisoned))
    assert np.array_equal(peek(panel.until(cutoff)), peek(poisoned.until(cutoff)))  # what fit() is given


def test_predict_before_fit_raises(toronto_panel):
    with pytest.raises(NotFittedError):
        Naive().predict(toronto_panel, toronto_panel.end_shift - 1)


def test_lightgbm_is_deterministic_and_beats_a_constant(toronto_panel):
    panel = toronto_panel
    cutoff = panel.end_shift - 60
    origins = np.arange(cutoff, cutoff + 30)
    a = small_lgbm(seed=7).fit(panel, cutoff)
    b = small_lgbm(seed=7).fit(panel, cutoff)
    pa, pb = a.predict(panel, origins), b.predict(panel, origins)
    np.testing.assert_array_equal(pa, pb)
    from features.matrix import build_targets
    from forecasting.metrics import poisson_deviance

    y = build_targets(panel, origins).reshape(origins.size, -1)
    constant = np.full_like(pa, y.mean())
    assert poisson_deviance(pa, y) < poisson_deviance(constant, y)
    assert a.best_iteration_ > 0 and a.train_rows_ > 0
    top = list(a.feature_importance())[:5]
    assert all(isinstance(name, str) for name in top)
    contrib, names = a.contributions(panel, cutoff)
    assert contrib.shape == (panel.n_cells, len(names))
    np.testing.assert_allclose(np.exp(contrib.sum(axis=1)), a.predict(panel, cutoff)[0], rtol=1e-4)


def test_single_category_target(toronto_panel):
    panel = toronto_panel
    cutoff = panel.end_shift - 30
    all_cats = Naive().fit(panel, cutoff).predict(panel, cutoff)
    assault = Naive(category="assault").fit(panel, cutoff).predict(panel, cutoff)
    assert np.all(assault <= all_cats) and assault.sum() < all_cats.sum()


def test_lightgbm_hand_case_learns_a_constant_hotspot():
    """One cell has exactly one incident every shift, every other cell none: the expected count is 1 there
    and 0 elsewhere, and the Poisson model must say so."""
    panel, area = toy_panel({(CENTER, s): 1 for s in range(400)}, span=420)
    f = LightGBMForecaster(train_days=100, valid_days=14, n_estimators=300, zero_rate=0.5, min_child_samples=5, num_threads=1)
    pred = f.fit(panel, FIRST + 400).predict(panel, FIRST + 400)[0]
    c = idx(area, CENTER)
    assert pred[c] == pytest.approx(1.0, rel=0.05)
    assert np.delete(pred, c).max() < 0.02


@pytest.mark.parametrize("objective", ["rank_xendcg", "lambdarank"])
def test_ranking_objective_fits_and_predicts(toronto_panel, objective):
    """One query per origin shift: the forecast is a positive relevance (exp of the score) with the usual
    shape, explanations still add up on the log scale, and its top cells catch more than their area share."""
    panel = toronto_panel
    cutoff = panel.end_shift - 60
    origins = np.arange(cutoff, cutoff + 30)
    model = small_lgbm(objective=objective).fit(panel, cutoff)
    pred = model.predict(panel, origins)
    assert pred.shape == (origins.size, panel.n_cells) and np.isfinite(pred).all() and (pred > 0).all()
    assert model.fit_summary()["valid_ndcg"] > 0 and "valid_poisson" not in model.fit_summary()
    expected, explanation = model.predict_explained(panel, cutoff)
    np.testing.assert_allclose(expected, pred[0], rtol=1e-12)
    np.testing.assert_allclose(np.exp(explanation.rows(np.arange(5)).sum(axis=1)), expected[:5], rtol=1e-4)
    from features.matrix import build_targets
    from forecasting.metrics import pooled, shift_hits

    y = build_targets(panel, origins).reshape(origins.size, -1)
    hit = pooled(shift_hits(pred, y, panel.study_area.areas_km2, origins, (0.05,)))["hit_rate"][0]
    assert hit > 0.15  # 5% of the area; a random order catches about 5%


def test_recency_weighted_full_history(toronto_panel):
    """train_days=None trains on every origin since the panel starts; the half-life only reweights them.
    The panel here starts in March 2020 (about 650 days before the cutoff, still well over 1.5 x the 240-day
    window, and 3.6 half-lives): the module's panel from 2018 made each whole-history fit build 2.2x the rows."""
    full_panel = toronto_panel
    first = full_panel.calendar.shift_of(datetime(2020, 3, 1, 12, tzinfo=UTC))
    panel = CountPanel(full_panel.study_area, full_panel.calendar, full_panel.categories, first,
                       full_panel.end_shift, full_panel.counts.filter(pl.col("shift") >= first))
    cutoff = panel.end_shift - 60
    few = dict(n_estimators=12)  # the rows and weights are under test, not the trees
    windowed = small_lgbm(**few).fit(panel, cutoff)
    full = small_lgbm(train_days=None, recency_half_life_days=180.0, **few).fit(panel, cutoff)
    again = small_lgbm(train_days=None, recency_half_life_days=180.0, **few).fit(panel, cutoff)
    assert full.train_rows_ > 1.5 * windowed.train_rows_
    np.testing.assert_array_equal(full.predict(panel, cutoff), again.predict(panel, cutoff))
    unweighted = small_lgbm(train_days=None, **few).fit(panel, cutoff)
    assert unweighted.train_rows_ == full.train_rows_
    assert not np.array_equal(unweighted.predict(panel, cutoff), full.predict(panel, cutoff))
