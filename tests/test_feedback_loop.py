"""The closed-loop feedback simulator: measures against hand-computed values, the recording model, causality,
the truth derived from real history, and the known qualitative result (Ensign et al. 2018): a naive map fed
by discovered incidents runs away, the inverse-probability (thinning) correction holds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import h3
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel

from experiments.feedback_loop import (
    Policy,
    Recording,
    SimulationConfig,
    World,
    _record,
    draw_incidents,
    intensity_from_history,
    light_lightgbm,
    plot_measures,
    refit_shifts,
    run_policy,
    simulate,
    summarise,
    total_variation,
    trailing_sum,
)
from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.panel import CountPanel
from forecasting.base import Forecaster
from forecasting.baselines import Naive
from forecasting.measures import gini, jaccard, top_share

CAL = ShiftCalendar("America/Chicago")
FIRST = CAL.local_day(date(2020, 1, 1)) * CAL.per_day


def toy_area(rings: int = 5) -> StudyArea:
    """Real H3 cells (resolution 9) within ``rings`` of the Chicago Loop: 91 cells for 5 rings."""
    centre = h3.latlng_to_cell(41.88, -87.63, 9)
    return StudyArea(np.array([h3.str_to_int(c) for c in h3.grid_disk(centre, rings)], dtype=np.uint64), 9)


def toy_world(seed: int, days: int, rings: int = 5) -> World:
    """A known, nearly flat truth (0.24-0.36 incidents per cell and shift): the setting where Ensign et al. show
    that a feedback loop concentrates patrols although no cell deserves it."""
    area = toy_area(rings)
    lam = 0.3 * (0.8 + 0.4 * np.random.default_rng(100 + seed).random(len(area)))
    return World(area, CAL, FIRST, np.tile(lam, (days * CAL.per_day, 1)), name="toy")


# --- measures against hand-computed values --------------------------------------------------------
def test_gini_hand_computed():
    assert gini(np.full((1, 5), 3.0))[0] == pytest.approx(0.0)
    assert gini([[0, 0, 0, 1]])[0] == pytest.approx(0.75)  # (n - 1) / n: all in one of four cells
    # mean absolute difference / (2 mean): pairs 1+2+3+1+2+1 = 10, twice over 4^2 pairs, mean 2.5 -> 20 / 80
    assert gini([[4, 1, 3, 2]])[0] == pytest.approx(0.25)
    assert gini([[0, 0, 0]])[0] == 0.0  # no patrols at all: no concentration
    rows = gini(np.array([[1, 1, 1, 1], [0, 0, 0, 1]]))
    np.testing.assert_allclose(rows, [0.0, 0.75])


def test_total_variation_hand_computed():
    assert total_variation([[3, 1, 0]], [[3, 1, 0]])[0] == pytest.approx(0.0)
    assert total_variation([[3, 1, 0]], [[6, 2, 0]])[0] == pytest.approx(0.0)  # same distribution, other volume
    assert total_variation([[1, 0]], [[0, 1]])[0] == pytest.approx(1.0)
    # (0.5, 0.25, 0.25) vs (0.25, 0.25, 0.5): half of 0.25 + 0 + 0.25
    assert total_variation([[2, 1, 1]], [[1, 1, 2]])[0] == pytest.approx(0.25)
    assert np.isnan(total_variation([[0, 0]], [[1, 0]])[0])


def test_jaccard_topk_share_and_trailing_sum_hand_computed():
    a = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_allclose(jaccard(a, b), [2 / 4, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(top_share([[5, 3, 1, 1], [0, 0, 0, 2]], k=2), [0.8, 1.0])
    x = np.array([[1, 0], [2, 1], [3, 0], [4, 5]])
    np.testing.assert_array_equal(trailing_sum(x, 2), [[1, 0], [3, 1], [5, 1], [7, 5]])


def test_refits_fall_on_local_month_starts():
    start = CAL.local_day(date(2020, 1, 10)) * 3 + 1
    stop = CAL.local_day(date(2020, 3, 5)) * 3
    cuts = refit_shifts(CAL, start, stop, "monthly")
    assert cuts.tolist() == [start, CAL.local_day(date(2020, 2, 1)) * 3, CAL.local_day(date(2020, 3, 1)) * 3]
    assert refit_shifts(CAL, 0, 10, 4).tolist() == [0, 4, 8]


def test_bad_inputs_get_clear_errors():
    world = toy_world(0, 10, rings=1)
    with pytest.raises(ValueError, match="report_prob"):
        Recording(report_prob=1.5)
    with pytest.raises(ValueError, match="Ensign correction needs"):
        Policy("x", Naive, training="ensign")
    with pytest.raises(ValueError, match="patrols"):
        SimulationConfig(patrols=7).validate(world)
    with pytest.raises(ValueError, match="unique"):
        simulate(world, [Policy("a", Naive), Policy("a", Naive)], SimulationConfig(patrols=2, warmup_shifts=3))


# --- recording and the correction -----------------------------------------------------------------
def test_recording_streams_and_common_random_numbers():
    world = toy_world(0, 40)
    config = SimulationConfig(patrols=5, recording=Recording(0.3, 0.8), warmup_shifts=60, seed=3)
    incidents = draw_incidents(world, config.recording, config.seed)
    assert np.all(incidents.reported + incidents.discoverable <= incidents.true)
    runs = {p.name: run_policy(world, incidents, p, config) for p in [
        Policy("recorded", lambda: Naive(window_days=7)),
        Policy("reported", lambda: Naive(window_days=7), training="reported"),
    ]}
    for run in runs.values():
        assert np.all(run.patrolled.sum(axis=1) == 5)  # distinct cells, every shift
        discovered = run.recorded - incidents.reported
        assert np.all(discovered[~run.patrolled] == 0)  # discovery only where patrols are
        np.testing.assert_array_equal(discovered[run.patrolled], incidents.discoverable[run.patrolled])
    np.testing.assert_array_equal(runs["reported"].training, incidents.reported)
    np.testing.assert_array_equal(runs["recorded"].training, runs["recorded"].recorded)
    # the warm-up (random patrols) is the same for every policy
    np.testing.assert_array_equal(runs["recorded"].patrolled[:60], runs["reported"].patrolled[:60])


def test_thinning_makes_discovered_incidents_proportional_to_the_truth():
    """Patrolled for sure (pi = 1) or explored (pi = 0.1): after thinning by pi_min / pi both cells keep the
    same share of their discovered incidents, so the stream is unbiased up to one constant."""
    rng = np.random.default_rng(0)
    discovered = np.array([[200_000, 20_000]])  # what the patrols found: 10x more where they always are
    kept = _record("ensign", np.zeros((1, 2), np.int64), discovered, np.array([[1.0, 0.1]]), 0.1, rng)
    assert kept[0, 0] == pytest.approx(20_000, rel=0.03)
    assert kept[0, 1] == 20_000


@dataclass
class Spy(Forecaster):
    """Records what each call could see."""

    calls: list = field(default_factory=list)
    name: str = field(default="spy", init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        self.calls.append(("fit", until, panel.end_shift, int(panel.counts["shift"].max())))

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        self.calls.append(("predict", int(origins[0]), panel.end_shift, int(panel.counts["shift"].max())))
        return np.asarray(panel.cell_totals(panel.first_shift, panel.end_shift), dtype=float)[None]


def test_forecasts_see_only_shifts_before_the_one_they_forecast():
    world = toy_world(1, 50)
    spy = Spy()
    config = SimulationConfig(patrols=3, warmup_shifts=60, refit=30)
    run_policy(world, draw_incidents(world, config.recording, 0), Policy("spy", lambda: spy), config)
    predicts = [c for c in spy.calls if c[0] == "predict"]
    assert [c[1] for c in predicts] == list(range(FIRST + 60, FIRST + 150))
    for _, origin, end, last in spy.calls:
        assert end == origin and last < origin
    assert [c[1] for c in spy.calls if c[0] == "fit"] == list(range(FIRST + 60, FIRST + 150, 30))


# --- the truth from real history ------------------------------------------------------------------
def test_history_truth_keeps_each_cells_real_total(toronto_incidents):
    _, panel = toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.40, -79.37),
                                 datetime(2019, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, tzinfo=UTC))
    shifts = np.arange(panel.first_shift, panel.end_shift)
    lam = intensity_from_history(panel, panel.first_shift, panel.end_shift, shifts)
    assert lam.shape == (shifts.size, panel.n_cells) and np.all(lam >= 0)
    # smoothing moves counts between shifts of day and weekdays, never between cells or out of the total
    np.testing.assert_allclose(lam.sum(axis=0), panel.cell_totals(panel.first_shift, panel.end_shift), rtol=1e-9)
    # the truth repeats weekly and keeps the real busier-evening pattern of the city
    week = 7 * panel.calendar.per_day
    np.testing.assert_allclose(lam[:week], lam[week : 2 * week])
    real = panel.counts.group_by(pl.col("shift") % 3).agg(pl.col("count").sum()).sort("shift")["count"].to_numpy()
    assert real[1:].min() > real[0]  # Toronto: evenings and nights are busier than days
    # without shrinkage the city's totals per shift of day are the real ones; shrinking each cell's shares
    # towards the city's moves little
    exact = intensity_from_history(panel, panel.first_shift, panel.end_shift, shifts, shrink=0.0)
    np.testing.assert_allclose([exact[shifts % 3 == s].sum() for s in range(3)], real, rtol=1e-9)
    np.testing.assert_allclose([lam[shifts % 3 == s].sum() for s in range(3)], real, rtol=0.02)
    doubled = intensity_from_history(panel, panel.first_shift, panel.end_shift, shifts[:5], scale=2.0)
    np.testing.assert_allclose(doubled, 2 * lam[:5])


# --- the known qualitative result -----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_naive_runs_away_on_discovered_incidents_and_the_ensign_correction_holds(seed, tmp_path):
    world = toy_world(seed, 28 + 120)
    config = SimulationConfig(patrols=5, recording=Recording(report_prob=0.02, discover_prob=0.9),
                              warmup_shifts=84, window_shifts=84, seed=seed)
    naive = lambda: Naive(window_days=28)  # noqa: E731
    policies = [
        Policy("naive", naive),
        Policy("naive_explore", naive, explore_share=0.4, exploration="uniform"),  # same patrols, no correction
        Policy("naive_ensign", naive, training="ensign", explore_share=0.4, exploration="uniform"),
    ]
    result = simulate(world, policies, config)
    assert result.measures.height == 3 * 120 * 3
    s = summarise(result.measures, per_day=3)
    run, fix, explore = s["naive"], s["naive_ensign"], s["naive_explore"]
    # runaway: patrols lock onto a few cells, the record concentrates there and drifts from the truth
    assert run["patrol_gini"]["end"] - run["patrol_gini"]["start"] > 0.4
    assert run["recorded_topk_share"]["end"] - run["recorded_topk_share"]["start"] > 0.3
    assert run["tvd_training"]["end"] - run["tvd_training"]["start"] > 0.2
    assert run["churn"]["end"] < 0.05 and run["patrol_gini"]["trend_per_30_days"] > 0
    # the correction: the data it learns from stay as close to the truth as at the start...
    assert abs(fix["tvd_training"]["end"] - fix["tvd_training"]["start"]) < 0.1
    assert fix["tvd_training"]["end"] < run["tvd_training"]["end"] - 0.15
    # ...and patrols and the record stay well below the runaway's concentration
    assert fix["patrol_gini"]["end"] < run["patrol_gini"]["end"] - 0.15
    assert fix["recorded_topk_share"]["end"] < run["recorded_topk_share"]["end"] - 0.15
    # it is the thinning that holds it, not the exploring patrols alone
    assert fix["tvd_training"]["end"] < explore["tvd_training"]["end"] - 0.04
    png = plot_measures(result.measures, tmp_path / "curves.png", per_day=3)
    assert png.stat().st_size > 10_000


def test_lightgbm_policies_run_the_loop_with_monthly_refits():
    """The project's LightGBM forecaster inside the loop (small, one thread): retrained each month on its stream."""
    world = toy_world(2, 91 + 45, rings=4)
    config = SimulationConfig(patrols=4, recording=Recording(0.3, 0.7), warmup_shifts=91 * 3, seed=2)
    lgbm = lambda: light_lightgbm(num_threads=1, seed=0)  # noqa: E731
    policies = [Policy("lightgbm", lgbm),
                Policy("lightgbm_ensign", lgbm, training="ensign", explore_share=0.25, exploration="uniform")]
    result = simulate(world, policies, config)
    m = result.measures
    assert m.height == 2 * 45 * 3
    # the loop starts 2020-04-01 (leap year): refits then and on 1 May
    assert result.refits["lightgbm"] == [FIRST + 91 * 3, CAL.local_day(date(2020, 5, 1)) * 3]
    for column in ("patrol_gini", "tvd_recorded", "tvd_training", "outside_true_topk", "churn", "captured_expected"):
        values = m[column].to_numpy()
        assert np.all((values >= 0) & (values <= 1)), column
    assert result.totals["lightgbm_ensign"]["training"] < result.totals["lightgbm_ensign"]["recorded"]
