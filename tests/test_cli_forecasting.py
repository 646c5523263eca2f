"""The CLI's forecasting commands on Toronto at resolution 8 (fast): panel -> backtest -> claim."""

import json

import pytest
from typer.testing import CliRunner

from serving.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for args in (["ingest", "toronto-mci"], ["panel", "toronto-mci", "--resolution", "8"]):
        result = runner.invoke(app, [*args, "--data-dir", str(root)])
        assert result.exit_code == 0, result.output
    return root


def test_backtest_then_claim(data_dir, monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, [
        "backtest", "toronto-mci", "--resolution", "8", "--test-start", "2021-11-01", "--test-end", "2022-01-01",
        "--forecaster", "naive", "--forecaster", "kde", "--forecaster", "sepp", "--n-boot", "200",
        "--data-dir", str(data_dir),
    ])
    assert result.exit_code == 0, result.output
    assert "naive" in result.output and "sepp" in result.output and "report:" in result.output
    folder = next((data_dir / "backtests").glob("toronto-mci-r8-*"))
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["forecasters"]) == {"naive", "kde", "sepp"}
    assert (folder / "report.html").stat().st_size > 10_000

    claim = runner.invoke(app, ["claim", "toronto-mci", "--candidate", "sepp", "--baseline", "naive", "--ratio", "1.1",
                                "--coverage", "0.05", "--n-boot", "300", "--data-dir", str(data_dir)])
    assert claim.exit_code == 0, claim.output
    assert "sepp hit rate" in claim.output and "'At least 10% more effective' is" in claim.output
    assert any(word in claim.output for word in ("SUPPORTED", "REFUTED", "UNDETERMINED"))

    missing = runner.invoke(app, ["claim", "toronto-mci", "--candidate", "lightgbm", "--data-dir", str(data_dir)])
    assert missing.exit_code == 2 and "not in" in missing.output


def test_backtest_rejects_unknown_forecaster(data_dir):
    result = runner.invoke(app, ["backtest", "toronto-mci", "--resolution", "8", "--forecaster", "oracle", "--data-dir", str(data_dir)])
    assert result.exit_code == 2 and "unknown forecaster" in result.output


def test_backtest_without_panel_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["backtest", "chicago", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "hotspots panel chicago" in result.output
