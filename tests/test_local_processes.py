"""A local backtest's refit series in two processes (both cores): the same forecasts as the run in one process,
to the bit, for a warm-started series (SEPP), a cut learned one (LightGBM) and a count map."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from conftest import synthetic_downtown_panel

from forecasting import registry
from forecasting.backtest import local_processes, run_backtest
from forecasting.strongest import choose_strongest

START, END = date(2020, 1, 1), date(2020, 4, 1)  # three monthly refits


@pytest.fixture(scope="module")
def panel():
    return synthetic_downtown_panel(4, 30, 2, 7, datetime(2019, 3, 1, tzinfo=UTC))


def forecasters() -> dict:
    return registry.factories(["naive", "sepp", "lightgbm"], params={
        "sepp": {"fit_days": 90},
        "lightgbm": {"train_days": 120, "valid_days": 21, "n_estimators": 20, "zero_rate": 0.2, "num_threads": 1},
    })


def test_two_processes_equal_one_with_the_strongest_choice_as_side_jobs(panel):
    """The refit series in a pool of two: the same forecasts as in one process, to the bit, for a warm-started
    series (SEPP), a cut learned one (LightGBM) and a count map; the strongest-baseline scores, run as side jobs
    of the same pool, make the same choice as ``choose_strongest`` in this process. (One pool for both: starting
    one costs two processes' imports.)"""
    baselines = registry.factories(["naive", "sepp", "all_history", "exp_weighted"], params={"sepp": {"fit_days": 90}})
    one = run_backtest(panel, START, END, forecasters(), processes=1, strongest_from=baselines, strongest_days=21)
    messages: list[str] = []
    two = run_backtest(panel, START, END, forecasters(), processes=2, progress=messages.append,
                       strongest_from=baselines, strongest_days=21)
    assert list(two.predictions) == list(one.predictions) == ["naive", "sepp", "lightgbm"]
    for name, pred in one.predictions.items():
        assert np.array_equal(two.predictions[name], pred), name
        assert (pred[-panel.n_cells:] != 0).any()  # the last block filled in, not left at zero
    assert np.array_equal(two.observed, one.observed)
    assert two.last_models["sepp"].n_iter_ == one.last_models["sepp"].n_iter_  # the warm-started series ran whole
    refits = [m for m in messages if "strongest baseline" not in m]
    assert len(refits) == 5  # naive 2 pieces, sepp whole, lightgbm 2 pieces
    assert sum("strongest baseline" in m for m in messages) == 4 and len(messages) == 4 + 5
    assert all(seconds > 0 for seconds in two.fit_seconds.values())

    zone = ZoneInfo(panel.calendar.timezone)
    first = int(panel.calendar.shift_range(datetime(2020, 1, 1, tzinfo=zone), datetime(2020, 1, 2, tzinfo=zone))[0])
    sequential = choose_strongest(panel, first, baselines, valid_days=21)
    assert two.strongest == one.strongest == sequential
    assert list(sequential.hit_rates) == list(baselines) and sequential.n_shifts == 21 * panel.calendar.per_day


def test_small_backtests_stay_in_one_process(panel):
    assert local_processes(panel, 273) == 1  # a 61-cell test panel: a worker's start-up would not pay


def test_the_strongest_is_chosen_only_when_asked(panel):
    refits = registry.factories(["naive", "sepp"], params={"sepp": {"fit_days": 90}})
    assert run_backtest(panel, START, END, refits, processes=1).strongest is None  # not asked: not chosen
