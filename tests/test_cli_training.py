"""The CLI's training and re-scorable backtest commands on Toronto at resolution 8, apart from
test_cli_forecasting.py so that the two heavy modules run on different test workers."""

import json

import pytest
from conftest import require_shared, toronto_through_the_cli
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from features.settings import Settings
from serving.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return toronto_through_the_cli(tmp_path_factory, resolution=8)


def test_backtest_takes_shift_starts_and_writes_per_cell_forecasts(data_dir, monkeypatch, tmp_path):
    """One 24-hour shift a day, re-binned from the store on the saved panel's cells: a protocol anyone can
    re-score from forecasts.parquet; nothing is registered (the service serves the saved panel's shifts).
    Without an area layer (HOTSPOTS_SHARED_DATA names an empty folder) the backtest says the bias audit is
    skipped instead of running it: the audit after a backtest is test_cli_forecasting.py's, and here it was a
    fifth of the test's CPU."""
    import h3
    import numpy as np
    import polars as pl

    from forecasting.metrics import HEADLINE_COVERAGES, pooled, shift_hits

    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOTSPOTS_SHARED_DATA", str(tmp_path))
    result = runner.invoke(app, [
        "backtest", "toronto-mci", "--resolution", "8", "--shift-starts", "00:00", "--test-start", "2021-12-01",
        "--test-end", "2022-01-01", "--forecaster", "naive", "--forecaster", "all_history", "--n-boot", "100",
        "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "nothing will be registered" in result.output and "model version" not in result.output
    assert "no area layer for toronto-mci: the bias audit is skipped" in " ".join(result.output.split())
    folder = next((data_dir / "backtests").glob("toronto-mci-r8-20211201-20220101-shifts-0000"))
    assert json.loads((folder / "backtest.json").read_text())["shift_starts"] == "00:00"
    forecasts = pl.read_parquet(folder / "forecasts.parquet")
    assert forecasts["shift_id"].n_unique() == 31
    assert set(forecasts["forecaster"].cast(pl.Utf8).unique()) == {"naive", "all_history"}
    # an outside scorer re-computes the summary's hit rates from the Parquet file alone
    summary = json.loads((folder / "summary.json").read_text())
    rows = forecasts.filter(pl.col("forecaster") == "all_history").sort("shift_id", maintain_order=True)
    n_cells = rows["cell"].n_unique()
    areas = np.array([h3.cell_area(c, "km^2") for c in rows["cell"].cast(pl.Utf8)[:n_cells]])
    score = rows["score"].to_numpy().reshape(31, n_cells)
    observed = rows["observed"].to_numpy().reshape(31, n_cells)
    shifts = rows["shift_id"].unique(maintain_order=True).to_numpy()
    rescored = pooled(shift_hits(score, observed, areas, shifts, HEADLINE_COVERAGES))["hit_rate"]
    reported = [c["hit_rate"]["point"] for c in summary["forecasters"]["all_history"]["coverages"]
                if c["coverage"] in HEADLINE_COVERAGES]
    np.testing.assert_allclose(rescored, reported, rtol=1e-9)

    bad = runner.invoke(app, ["backtest", "toronto-mci", "--resolution", "8", "--shift-starts", "25:00",
                              "--data-dir", str(data_dir)])
    assert bad.exit_code == 2 and "--shift-starts '25:00'" in bad.output and "HH:MM" in bad.output


def test_train_logs_model_with_validation_window_assessments(data_dir, monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOTSPOTS_SHARED_DATA", str(require_shared("areas", "toronto.gpkg").parents[1]))
    # a small model on a short window (30 trees, 150 days, a 28-day validation window): the run's logging and its
    # validation-window assessments are under test, not the model's skill (80 trees on 240 days and the default
    # 56-day window cost twice the CPU and prove the same)
    small = ["--param", "n_estimators=30", "--param", "train_days=150", "--param", "valid_days=28",
             "--param", "learning_rate=0.15"]
    result = runner.invoke(app, ["train", "toronto-mci", "--resolution", "8", "--until", "2020-01-01", *small,
                                 "--audit-preset", "toronto-neighbourhoods", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    run_id = result.output.split("run ")[1].split(":")[0]
    client = MlflowClient(tracking_uri=Settings(data_dir=data_dir).tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["kind"] == "train" and "validation window" in run.data.tags["assessment.window"]
    assert run.data.params["lightgbm.n_estimators"] == "30" and run.data.params["lightgbm.train_days"] == "150"
    assert run.data.params["lightgbm.valid_days"] == "28"
    assert 0.5 < run.data.metrics["diagnostics.gain_lagged_share"] <= 1
    assert run.data.metrics["bias_audit.lightgbm.group.black.exposure_ratio.5pct"] > 0
    assert {a.path for a in client.list_artifacts(run_id, "bias_audit")} >= {"bias_audit/bias_audit.json"}


def test_train_rejects_unknown_or_mistyped_params(data_dir):
    unknown = runner.invoke(app, ["train", "toronto-mci", "--resolution", "8", "--param", "depth=3", "--data-dir", str(data_dir)])
    assert unknown.exit_code == 2 and "--param 'depth=3'" in unknown.output and "n_estimators" in unknown.output
    mistyped = runner.invoke(app, ["train", "toronto-mci", "--resolution", "8", "--param", "n_estimators=many",
                                   "--data-dir", str(data_dir)])
    assert mistyped.exit_code == 2 and "n_estimators must be of type int" in mistyped.output
