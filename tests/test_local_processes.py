"""A local backtest's refit series in two processes (both cores): the same forecasts as the run in one process,
to the bit, for a warm-started series (SEPP), a cut learned one (LightGBM) and a count map."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pytest
from conftest import synthetic_downtown_panel

from forecasting import registry
from forecasting.backtest import local_processes, run_backtest

START, END = date(2020, 1, 1), date(2020, 4, 1)  # three monthly refits


@pytest.fixture(scope="module")
def panel():
    return synthetic_downtown_panel(4, 30, 2, 7, datetime(2019, 3, 1, tzinfo=UTC))


def forecasters() -> dict:
    return registry.factories(["naive", "sepp", "lightgbm"], params={
        "sepp": {"fit_days": 90},
        "lightgbm": {"train_days": 120, "valid_days": 21, "n_estimators": 20, "zero_rate": 0.2, "num_threads": 1},
    })


def test_two_processes_equal_one(panel):
    one = run_backtest(panel, START, END, forecasters(), processes=1)
    messages: list[str] = []
    two = run_backtest(panel, START, END, forecasters(), processes=2, progress=messages.append)
    assert list(two.predictions) == list(one.predictions) == ["naive", "sepp", "lightgbm"]
    for name, pred in one.predictions.items():
        assert np.array_equal(two.predictions[name], pred), name
        assert (pred[-panel.n_cells:] != 0).any()  # the last block filled in, not left at zero
    assert np.array_equal(two.observed, one.observed)
    assert two.last_models["sepp"].n_iter_ == one.last_models["sepp"].n_iter_  # the warm-started series ran whole
    assert len(messages) == 5  # naive 2 pieces, sepp whole, lightgbm 2 pieces
    assert all(seconds > 0 for seconds in two.fit_seconds.values())


def test_small_backtests_stay_in_one_process(panel):
    assert local_processes(panel, 273) == 1  # a 61-cell test panel: a worker's start-up would not pay
