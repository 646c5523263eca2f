"""MLflow tracking (embedded SQLite), the model flavour, the promotion gate, and the tracked backtest."""

import json
from datetime import date, datetime, timezone

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from conftest import toronto_box_panel
from mlflow.tracking import MlflowClient

from forecasting.reporting.runs import run_tracked_backtest
from features.settings import Settings
from forecasting.baselines import Naive, SEPP
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import MetricSummary
from forecasting.promotion import promotion_decision
from forecasting.reporting.tracking import CHAMPION, apply_promotion, champion_version, configure, registered_name


def summary(rates):
    cov = np.array([0.01, 0.05])
    point = {"hit_rate": np.array(rates)}
    return MetricSummary(cov, point, point, point, 0.0, 10, 100.0)


def test_gate_needs_both_coverages():
    ok = promotion_decision({"lightgbm": summary([0.2, 0.4]), "naive": summary([0.1, 0.3])})
    assert ok.promote and "beats naive" in ok.reason
    bad = promotion_decision({"lightgbm": summary([0.2, 0.3]), "naive": summary([0.1, 0.3])})
    assert not bad.promote and "5%" in bad.reason
    with pytest.raises(ValueError, match="no coverage"):
        promotion_decision({"lightgbm": summary([0.2, 0.4]), "naive": summary([0.1, 0.3])}, coverages=(0.02,))


@pytest.fixture(scope="module")
def small_panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 1, 1, tzinfo=timezone.utc),
                             datetime(2020, 3, 1, tzinfo=timezone.utc))[1]


def quick_lgbm():
    return LightGBMForecaster(train_days=240, valid_days=28, n_estimators=40, zero_rate=0.2, num_threads=1)


def test_tracked_backtest_logs_run_registers_and_gates(small_panel, tmp_path, monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(data_dir=tmp_path / "data")
    tracked = run_tracked_backtest(
        small_panel, "toronto-test", settings, date(2020, 1, 1), date(2020, 3, 1),
        forecasters={"lightgbm": quick_lgbm, "naive": Naive, "sepp": lambda: SEPP(fit_days=120)},
        n_boot=100, out_dir=tmp_path / "bt",
    )
    assert (tmp_path / "data" / "mlflow.db").is_file()  # embedded SQLite store by default
    run = mlflow.get_run(tracked.run_id)
    assert run.data.params["city"] == "toronto-test" and run.data.params["resolution"] == "9"
    assert len(run.data.params["data_fingerprint"]) == 24 and run.data.params["code_version"]
    assert "lightgbm.hit_rate.1pct" in run.data.metrics and "naive.pai.5pct" in run.data.metrics
    assert run.data.tags["claim.verdict.1pct"] in {"supported", "refuted", "undetermined"}
    artifacts = {a.path for a in MlflowClient().list_artifacts(tracked.run_id, "backtest")}
    assert {"backtest/report.html", "backtest/report.md", "backtest/results.parquet"} <= artifacts
    pairwise = json.loads((tracked.out_dir / "pairwise.json").read_text())
    assert {(p["baseline"], p["coverage"]) for p in pairwise} == {(b, c) for b in ("naive", "sepp") for c in (0.01, 0.05)}
    assert all(p["difference_low"] <= p["difference"] <= p["difference_high"] for p in pairwise)
    results = pl.read_parquet(tracked.out_dir / "results.parquet")
    assert set(results["forecaster"].unique()) == {"lightgbm", "naive", "sepp"}
    assert results.filter(pl.col("forecaster") == "naive")["shift_id"].n_unique() == tracked.result.origins.size

    # the registered version carries the decision; the alias follows the gate
    client = MlflowClient()
    version = client.get_model_version(registered_name("toronto-test"), tracked.model_version)
    assert version.tags["promotion_decision"] == ("promoted" if tracked.decision.promote else "rejected")
    assert champion_version("toronto-test") == (tracked.model_version if tracked.decision.promote else None)

    # the logged model is a pyfunc with a signature that predicts from feature rows
    loaded = mlflow.pyfunc.load_model(f"models:/{registered_name('toronto-test')}/{tracked.model_version}")
    columns = [c.name for c in loaded.metadata.get_input_schema().inputs]
    sample = pd.DataFrame(np.zeros((3, len(columns)), dtype=np.float32), columns=columns)
    assert np.all(np.asarray(loaded.predict(sample)) > 0)


def test_alias_moves_only_when_gate_passes(small_panel, tmp_path, monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    configure(Settings(data_dir=tmp_path))
    client = MlflowClient()
    name = registered_name("gate-city")
    client.create_registered_model(name)
    v1 = str(client.create_model_version(name, source=str(tmp_path), run_id=None).version)
    v2 = str(client.create_model_version(name, source=str(tmp_path), run_id=None).version)
    apply_promotion("gate-city", v1, promotion_decision({"lightgbm": summary([0.2, 0.4]), "naive": summary([0.1, 0.3])}))
    assert champion_version("gate-city") == v1
    apply_promotion("gate-city", v2, promotion_decision({"lightgbm": summary([0.05, 0.4]), "naive": summary([0.1, 0.3])}))
    assert champion_version("gate-city") == v1  # the losing version does not take the alias
    assert client.get_model_version(name, v2).tags["promotion_decision"] == "rejected"
    assert str(client.get_registered_model(name).aliases[CHAMPION]) == v1
