"""Backtests as Dask tasks on a real two-process LocalCluster: the same numbers as the local run, to the bit,
and a worker killed mid-batch costs a retry, never a lost or duplicated result or a second MLflow run."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial

import cloudpickle
import mlflow
import numpy as np
import polars as pl
import pytest
from conftest import synthetic_downtown_panel
from distributed import get_worker

from features.settings import Settings
from forecasting import registry
from forecasting.backtest import run_backtest
from forecasting.baselines import Naive
from forecasting.cluster import connect
from forecasting.refits import plan_groups
from forecasting.reporting.runs import run_tracked_backtest

# workers import the product from the install; this module's helpers travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

START, END = date(2020, 1, 1), date(2020, 4, 1)  # three monthly refits


@pytest.fixture(scope="module")
def panel():
    return synthetic_downtown_panel(5, 40, 1, 5, datetime(2019, 1, 1, tzinfo=UTC))


@pytest.fixture(scope="module")
def local(panel):
    return run_backtest(panel, START, END, forecasters())


def forecasters(**replace) -> dict:
    made = registry.factories(["naive", "sepp", "lightgbm"], params={
        "sepp": {"fit_days": 120},
        "lightgbm": {"train_days": 150, "valid_days": 28, "n_estimators": 25, "zero_rate": 0.2, "num_threads": 1},
    })
    return {**made, **replace}


def test_plan_keeps_warm_started_series_whole_and_cuts_the_others():
    groups = plan_groups(forecasters(), n_refits=3, pieces=2)
    assert [(g.forecaster, g.first, g.stop) for g in groups] == [
        ("naive", 0, 2), ("naive", 2, 3), ("sepp", 0, 3), ("lightgbm", 0, 2), ("lightgbm", 2, 3)]
    assert len({g.key for g in groups}) == len(groups)


def test_backtest_on_the_cluster_equals_the_local_run(panel, client, local):
    messages: list[str] = []
    remote = run_backtest(panel, START, END, forecasters(), cluster=client, pieces=2, progress=messages.append)
    assert list(remote.predictions) == list(local.predictions) == ["naive", "sepp", "lightgbm"]
    for name, pred in local.predictions.items():
        assert np.array_equal(remote.predictions[name], pred), name
        assert pred.any()  # every shift filled in, not left at zero
    assert np.array_equal(remote.observed, local.observed)
    assert remote.cutoffs == local.cutoffs
    # the last refit's model comes back: SEPP warm-started through the whole series, as locally
    assert np.array_equal(remote.last_models["sepp"].mu_, local.last_models["sepp"].mu_)
    assert remote.last_models["lightgbm"].best_iteration_ == local.last_models["lightgbm"].best_iteration_
    assert len(messages) == 5 and all(m.startswith("task ") for m in messages)  # naive x2, sepp, lightgbm x2


@dataclass
class KillsItsWorkerOnce(Naive):
    """The naive map, except that the first fit on a worker ends that worker's process (a lost node)."""

    marker: str = ""

    def _fit(self, panel, until):
        if on_a_worker():
            try:  # O_EXCL: exactly one fit, on one worker, ever wins the marker and dies
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        super()._fit(panel, until)


def on_a_worker() -> bool:
    try:
        get_worker()
    except ValueError:
        return False
    return True


def test_a_worker_killed_mid_batch_is_recomputed_without_duplicates(panel, client, local, tmp_path):
    marker = tmp_path / "killed"
    chosen = {"naive": partial(KillsItsWorkerOnce, window_days=28, marker=str(marker)),
              "sepp": forecasters()["sepp"]}
    workers_before = set(client.scheduler_info()["workers"])
    settings = Settings(data_dir=tmp_path / "data")
    tracked = run_tracked_backtest(panel, "synthetic", settings, START, END, forecasters=chosen, n_boot=20,
                                   register=False, cluster=client, strongest_days=28)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    client.wait_for_workers(2, timeout=30)
    assert set(client.scheduler_info()["workers"]) != workers_before  # the nanny replaced the lost worker
    for name in chosen:
        assert np.array_equal(tracked.result.predictions[name], local.predictions[name]), name
    # one MLflow run, one row per (forecaster, shift, coverage) in the saved results
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs["tags.dask_scheduler"].iloc[0] == client.scheduler.address
    tidy = pl.read_parquet(tracked.out_dir / "results.parquet")
    assert tidy.height == tidy.unique(["forecaster", "shift_id", "coverage"]).height
    assert tidy.group_by("forecaster").len()["len"].to_list() == [tidy.height // 2] * 2


def test_an_unreachable_scheduler_is_one_line_naming_the_fix():
    with pytest.raises(ValueError, match=r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:1'.*dask scheduler") as err:
        with connect("tcp://127.0.0.1:1", timeout="1s"):
            pass
    assert "\n" not in str(err.value)


def test_the_backtest_command_runs_on_the_scheduler_named_by_the_setting(panel, client, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from features.paths import DataPaths
    from serving.cli import app

    panel.save(DataPaths(Settings(data_dir=tmp_path, h3_resolution=8)).panel("synthetic"))
    monkeypatch.setenv("HOTSPOTS_DASK_SCHEDULER", client.scheduler.address)
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, [
        "backtest", "synthetic", "--resolution", "8", "--test-start", "2020-03-01", "--test-end", "2020-04-01",
        "--forecaster", "naive", "--n-boot", "20", "--no-register", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "task 1/1: naive refits 1-1 of 1" in result.output and "refit 1/1" not in result.output  # ran as a task
