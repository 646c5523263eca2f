"""The long-history baselines against hand-computed cases, the half-life chosen before the cutoff, the
strongest baseline chosen on the validation window, and the pessimistic tie bound."""

import h3
import numpy as np
import polars as pl
import pytest
from test_forecasters import CENTER, FIRST, idx, toy_panel

from features.panel import CountPanel
from forecasting.baselines import ExpWeighted, HistoryCounts, Naive
from forecasting.metrics import pooled, shift_hits
from forecasting.strongest import choose_strongest

OTHER = h3.grid_ring(CENTER, 1)[0]


def test_all_history_is_the_mean_count_per_shift_since_the_first_shift():
    panel, area = toy_panel({(CENTER, 10): 4, (CENTER, 150): 2, (OTHER, 99): 1, (CENTER, 100): 7})
    f = HistoryCounts().fit(panel, FIRST + 100)
    pred = f.predict(panel, [FIRST + 100, FIRST + 160])
    assert pred[0, idx(area, CENTER)] == pytest.approx(4 / 100)  # shifts 0..99: the 7 at shift 100 is not history
    assert pred[0, idx(area, OTHER)] == pytest.approx(1 / 100)
    assert pred[1, idx(area, CENTER)] == pytest.approx((4 + 7 + 2) / 160)
    assert pred[0].sum() == pytest.approx(5 / 100)


def test_last_year_counts_only_the_trailing_window():
    # one day = 3 shifts; a 365-day window holds 1095 shifts, so use a long toy span
    panel, area = toy_panel({(CENTER, 5): 9, (CENTER, 1200): 3, (OTHER, 1190): 1}, span=1300)
    pred = HistoryCounts(window_days=365).fit(panel, FIRST + 1250).predict(panel, FIRST + 1250)[0]
    assert pred[idx(area, CENTER)] == pytest.approx(3 / 1095)  # the 9 at shift 5 is older than a year
    assert pred[idx(area, OTHER)] == pytest.approx(1 / 1095)
    early = HistoryCounts(window_days=365).fit(panel, FIRST + 30).predict(panel, FIRST + 30)[0]
    assert early[idx(area, CENTER)] == pytest.approx(9 / 30)  # less than a year of history: its own length


def test_exp_weighted_hand_computed():
    # half-life of one day = 3 shifts: d = 0.5 ** (1/3)
    panel, area = toy_panel({(CENTER, 96): 1, (CENTER, 99): 2, (OTHER, 90): 4})
    f = ExpWeighted(half_life_days=1.0).fit(panel, FIRST + 100)
    d = 0.5 ** (1 / 3)
    weight = (1 - d**100) / (1 - d)  # weights of shifts 0..99 at origin 100: d^0 .. d^99
    pred = f.predict(panel, [FIRST + 100, FIRST + 101])
    assert pred[0, idx(area, CENTER)] == pytest.approx((2 * d**0 + 1 * d**3) / weight)
    assert pred[0, idx(area, OTHER)] == pytest.approx(4 * d**9 / weight)
    weight1 = (1 - d**101) / (1 - d)
    assert pred[1, idx(area, CENTER)] == pytest.approx((2 * d + d**4) / weight1)  # the recursion across origins


def test_exp_weighted_chooses_its_half_life_before_the_cutoff():
    """A cell hot long ago and a cell hot recently: only the recent one is hot in the selection window, so a
    short half-life wins; poisoning everything after the cutoff changes nothing."""
    events = {(CENTER, s): 1 for s in range(0, 300, 2)}  # the old hotspot, every other shift until 300
    events |= {(OTHER, s): 1 for s in range(300, 500)}  # the new one, every shift from 300
    panel, area = toy_panel(events, span=700)
    f = ExpWeighted(half_lives=(1.0, 1000.0), select_days=30).fit(panel, FIRST + 500)
    assert f.half_life_ == 1.0 and f.selection_[1.0] > f.selection_[1000.0]
    poisoned = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift,
                          panel.counts.with_columns(pl.when(pl.col("shift") >= FIRST + 500).then(pl.col("count") * 9)
                                                    .otherwise(pl.col("count")).alias("count")))
    g = ExpWeighted(half_lives=(1.0, 1000.0), select_days=30).fit(poisoned, FIRST + 500)
    assert g.selection_ == f.selection_
    np.testing.assert_array_equal(f.predict(panel, FIRST + 500), g.predict(panel, FIRST + 500))


def test_strongest_baseline_is_chosen_before_the_test_period():
    """A stable hotspot with a short false alarm elsewhere in the validation window (which misleads the naive
    map), a new hotspot in the test period: the validation window picks the long history, and data from the
    test period cannot change the choice."""
    events = {(CENTER, s): 1 for s in range(0, 600, 3)} | {(OTHER, 580): 5}
    events |= {(OTHER, s): 3 for s in range(600, 700)}  # the test period
    panel, _ = toy_panel(events, span=700)
    makers = {"naive": lambda: Naive(window_days=1), "all_history": HistoryCounts}
    choice = choose_strongest(panel, FIRST + 600, makers, valid_days=30)
    assert choice.name == "all_history"
    assert choice.hit_rates["all_history"]["0.01"] > choice.hit_rates["naive"]["0.01"]
    assert "all_history" in choice.sentence() and "naive" in choice.sentence()
    cut = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift,
                     panel.counts.filter(pl.col("shift") < FIRST + 600))
    assert choose_strongest(cut, FIRST + 600, makers, valid_days=30).hit_rates == choice.hit_rates


def test_pessimistic_ties_rank_cells_with_fewer_incidents_first():
    expected = np.array([[1.0, 1.0, 1.0, 0.0]])
    observed = np.array([[0.0, 2.0, 1.0, 5.0]])
    areas = np.ones(4)
    # one cell of four (25% of the area): all three tied, the pessimistic order takes the cell with 0
    worst = shift_hits(expected, observed, areas, np.array([0]), coverages=(0.25, 0.5, 0.75), ties="pessimistic")
    np.testing.assert_array_equal(worst.hits[0], [0.0, 1.0, 3.0])
    random = np.array([pooled(shift_hits(expected, observed, areas, np.array([s]), coverages=(0.25,)))["hit_rate"][0]
                       for s in range(200)])
    assert random.min() >= 0.0 and random.max() == pytest.approx(2 / 8) and random.mean() > 0  # random ties do better
    distinct = np.array([[3.0, 2.0, 1.0, 0.0]])  # without ties both orders agree
    np.testing.assert_array_equal(shift_hits(distinct, observed, areas, np.array([0]), (0.5,), ties="pessimistic").hits,
                                  shift_hits(distinct, observed, areas, np.array([0]), (0.5,)).hits)
    with pytest.raises(ValueError, match="ties must be"):
        shift_hits(expected, observed, areas, np.array([0]), ties="optimistic")
