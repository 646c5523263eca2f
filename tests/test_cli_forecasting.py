"""The CLI's forecasting commands on Toronto at resolution 8 (fast): panel -> backtest -> claim, and the
assessments (diagnose, audit) logged into the backtest's MLflow run."""

import json
import re
from datetime import UTC

import pytest
from conftest import require_shared, toronto_through_the_cli
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from features.settings import Settings
from forecasting.area_presets import default_layer
from serving.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return toronto_through_the_cli(tmp_path_factory, resolution=8)


# SEPP's EM on a year of shifts was half of this module's time (four fits: strongest-baseline choice, two refits,
# registration). The tests here are about the CLI flow (stage lines, claim, promotion, diagnose, audit) with SEPP
# as one of the compared forecasters, not about SEPP's estimates (test_forecasters.py and test_dask.py test those):
# a shorter fitting window, as test_dask.py and test_local_processes.py use, keeps every step.
SEPP_FIT_DAYS = 90


@pytest.fixture(scope="module")
def backtested(data_dir):
    mp = pytest.MonkeyPatch()
    mp.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, [
        "backtest", "toronto-mci", "--resolution", "8", "--test-start", "2021-11-01", "--test-end", "2022-01-01",
        "--forecaster", "naive", "--forecaster", "kde", "--forecaster", "sepp", "--n-boot", "200",
        "--param", f"sepp.fit_days={SEPP_FIT_DAYS}", "--data-dir", str(data_dir),
    ])
    mp.undo()
    assert result.exit_code == 0, result.output
    return result, next((data_dir / "backtests").glob("toronto-mci-r8-*"))


def test_backtest_then_claim(data_dir, backtested):
    result, folder = backtested
    assert "naive" in result.output and "sepp" in result.output and "report:" in result.output
    # not a terminal: one time-stamped line per stage and per refit, with elapsed times
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d start backtest toronto-mci 2021-11-01 to 2022-01-01$", result.output, re.M)
    assert re.search(r"refit 1/2 at 2021-11-01: \d+ shifts forecast \(naive [\d.]+ s, kde [\d.]+ s, sepp [\d.]+ s\) \(\d+ s\)$",
                     result.output, re.M)
    assert re.search(r"done  backtest toronto-mci 2021-11-01 to 2022-01-01 \([\d.]+ s\)$", result.output, re.M)
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["forecasters"]) == {"naive", "kde", "sepp"}
    # the strongest baseline is named, and without a learned forecaster that baseline is the champion
    protocol = json.loads((folder / "backtest.json").read_text())
    assert protocol["strongest_baseline"] in {"naive", "kde", "sepp"}
    assert f"Strongest baseline: {protocol['strongest_baseline']}" in result.output
    promotion = json.loads((folder / "promotion.json").read_text())
    assert promotion["promote"] and promotion["baseline"] == protocol["strongest_baseline"]
    assert (folder / "report.html").stat().st_size > 10_000
    assert _run(data_dir, folder)[0].data.params["sepp.fit_days"] == str(SEPP_FIT_DAYS)  # --param reached SEPP

    claim = runner.invoke(app, ["claim", "toronto-mci", "--candidate", "sepp", "--baseline", "naive", "--ratio", "1.1",
                                "--coverage", "0.05", "--n-boot", "300", "--data-dir", str(data_dir)])
    assert claim.exit_code == 0, claim.output
    assert "sepp hit rate" in claim.output and "'At least 10% more effective' is" in claim.output
    assert any(word in claim.output for word in ("SUPPORTED", "REFUTED", "UNDETERMINED"))
    assert "the shift-of-day clairvoyant ceiling" in claim.output  # the headroom share, or "no headroom"
    # the backtest ran its winner's diagnostics without a learned forecaster or "lightgbm" in it
    assert json.loads((folder / "diagnostics.json").read_text())["model"] == promotion["winner"]
    assert set(summary["references"]) == {"static_clairvoyant", "shift_of_day_clairvoyant"}
    # and its bias audit on the source's own area layer when that is on this machine (else it says it skipped it);
    # test_cli_training.py's backtest runs without one
    if default_layer("toronto-mci") is not None:
        audited = json.loads((folder / "bias_audit.json").read_text())
        assert promotion["winner"] in {r["forecaster"] for r in audited["rows"]}
    else:
        assert not (folder / "bias_audit.json").exists() and "the bias audit is skipped" in " ".join(result.output.split())

    missing = runner.invoke(app, ["claim", "toronto-mci", "--candidate", "lightgbm", "--data-dir", str(data_dir)])
    assert missing.exit_code == 2 and "no forecasts of ['lightgbm']" in missing.output


def test_backtest_rejects_unknown_forecaster(data_dir):
    result = runner.invoke(app, ["backtest", "toronto-mci", "--resolution", "8", "--forecaster", "oracle",
                                 "--data-dir", str(data_dir)])
    assert result.exit_code == 2 and "unknown forecaster" in result.output


def test_backtest_without_panel_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["backtest", "chicago", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "hotspots panel chicago" in result.output


def _run(data_dir, folder):
    run_id = json.loads((folder / "run.json").read_text())["run_id"]
    uri = Settings(data_dir=data_dir).tracking_uri
    return MlflowClient(tracking_uri=uri).get_run(run_id), MlflowClient(tracking_uri=uri)


def test_diagnose_logs_into_the_backtest_run(data_dir, backtested):
    _, folder = backtested
    result = runner.invoke(app, ["diagnose", "toronto-mci", "--resolution", "8", "--model", "sepp",
                                 "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "Gini of flag counts" in result.output and "no patrol-dose analysis" in result.output
    payload = json.loads((folder / "diagnostics.json").read_text())
    strongest = json.loads((folder / "backtest.json").read_text())["strongest_baseline"]
    assert payload["model"] == "sepp" and payload["baseline"] == (strongest if strongest != "sepp" else None)
    run, client = _run(data_dir, folder)
    assert 0 < run.data.metrics["diagnostics.gini.1pct"] <= 1
    assert {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")} >= {
        "diagnostics/diagnostics.json", "diagnostics/diagnostics.html", "diagnostics/diagnostics.png"}

    # by default the backtest's own choice: its winner (here the strongest baseline itself, alone)
    default = runner.invoke(app, ["diagnose", "toronto-mci", "--resolution", "8", "--data-dir", str(data_dir)])
    assert default.exit_code == 0, default.output
    assert json.loads((folder / "diagnostics.json").read_text())["model"] == strongest
    missing = runner.invoke(app, ["diagnose", "toronto-mci", "--resolution", "8", "--model", "lightgbm",
                                  "--data-dir", str(data_dir)])
    assert missing.exit_code == 2 and "no forecasts of ['lightgbm']" in missing.output


def test_audit_logs_exposure_by_group(data_dir, backtested, monkeypatch):
    monkeypatch.setenv("HOTSPOTS_SHARED_DATA", str(require_shared("areas", "toronto.gpkg").parents[1]))
    _, folder = backtested
    result = runner.invoke(app, ["audit", "toronto-mci", "--resolution", "8", "--preset", "toronto-neighbourhoods",
                                 "--model", "sepp", "--n-boot", "100", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "most exposed" in result.output
    audit = json.loads((folder / "bias_audit.json").read_text())
    groups = {r["group"] for r in audit["rows"] if r["measure"] == "exposure_ratio" and r["forecaster"] == "sepp"}
    assert {"black", "visible_minority", "not_visible_minority"} <= groups
    run, _ = _run(data_dir, folder)
    key = "bias_audit.sepp.group.black.exposure_ratio.1pct"
    assert run.data.metrics[key] > 0 and run.data.metrics[key.replace("ratio.", "ratio_low.")] <= run.data.metrics[key]

    wrong = runner.invoke(app, ["audit", "toronto-mci", "--preset", "atlantis", "--data-dir", str(data_dir)])
    assert wrong.exit_code == 2 and "unknown area preset 'atlantis'" in wrong.output


def test_diagnose_analyses_recorded_patrols(data_dir, backtested):
    """Patrols recorded through the service's patrol log during the backtest's test period are analysed
    against the backtested forecasts and logged as the patrol_diagnostics assessment."""
    from datetime import datetime

    import numpy as np

    from features.panel import CountPanel
    from features.paths import DataPaths
    from serving.db import Database
    from serving.keys import Principal, Role
    from serving.patrols import PatrolLog, check_patrols
    from serving.schemas import PatrolRequest

    settings = Settings(data_dir=data_dir, h3_resolution=8)
    panel = CountPanel.load(DataPaths(settings).panel("toronto-mci"))
    cal, rng = panel.calendar, np.random.default_rng(3)
    db = Database.for_settings(settings)
    log = PatrolLog(db)
    december = cal.shift_range(datetime(2021, 12, 1, tzinfo=UTC), datetime(2021, 12, 29, tzinfo=UTC))
    for shift in december:
        start = cal.bounds([shift])["start_local"][0]
        cells = rng.choice(panel.study_area.h3_ids, size=12, replace=False).tolist()
        request = PatrolRequest(city="toronto-mci", shift=start,
                                patrols=[{"h3": c, "dose_minutes": float(rng.integers(10, 120))} for c in cells])
        batch = check_patrols(panel, request, now=datetime(2022, 1, 1, tzinfo=UTC))
        log.record(batch, Principal("k1", Role.planner), recorded_at=datetime.now(UTC))
    db.dispose()

    result = runner.invoke(app, ["diagnose", "toronto-mci", "--resolution", "8", "--model", "sepp",
                                 "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "backtest sepp forecasts as control" in result.output
    run, client = _run(data_dir, backtested[1])
    assert run.data.metrics["patrol_diagnostics.patrolled_cell_shifts"] == 12 * len(december)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "patrol_diagnostics")} >= {
        "patrol_diagnostics/patrol_diagnostics.json"}
