"""MLflow tracking (embedded SQLite), the model flavour, the promotion gate, and the tracked backtest."""

import json
from datetime import UTC, date, datetime

import mlflow
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel
from mlflow.tracking import MlflowClient

from features.settings import Settings
from forecasting.baselines import SEPP, HistoryCounts, Naive
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import MetricSummary
from forecasting.promotion import promotion_decision
from forecasting.reporting.runs import run_tracked_backtest
from forecasting.reporting.tracking import CHAMPION, apply_promotion, champion_version, configure, registered_name


def summary(rates):
    cov = np.array([0.01, 0.05])
    point = {"hit_rate": np.array(rates)}
    return MetricSummary(cov, point, point, point, 0.0, 10, 100.0)


def test_gate_needs_both_coverages():
    ok = promotion_decision({"lightgbm": summary([0.2, 0.4]), "naive": summary([0.1, 0.3])}, candidate="lightgbm")
    assert ok.promote and ok.winner == "lightgbm" and "beats the strongest baseline, naive" in ok.reason
    bad = promotion_decision({"lightgbm": summary([0.2, 0.3]), "naive": summary([0.1, 0.3])}, candidate="lightgbm")
    assert not bad.promote and bad.winner == "naive" and "5%: 0.300 vs 0.300" in bad.reason
    with pytest.raises(ValueError, match="no coverage"):
        promotion_decision({"lightgbm": summary([0.2, 0.4]), "naive": summary([0.1, 0.3])}, coverages=(0.02,))


def test_a_lead_the_paired_interval_cannot_tell_from_zero_is_not_a_win():
    rates = {"lightgbm": summary([0.169, 0.396]), "exp_weighted": summary([0.168, 0.394])}
    clear = promotion_decision(rates, strongest="exp_weighted", candidate="lightgbm",
                               leads={"lightgbm": {0.01: 0.0004, 0.05: 0.0011}})
    assert clear.promote and clear.winner == "lightgbm"
    # Toronto 2021's figures: ahead on points at both coverages, the interval of the lead includes zero at both
    unclear = promotion_decision(rates, strongest="exp_weighted", candidate="lightgbm",
                                 leads={"lightgbm": {0.01: -0.0011, 0.05: -0.0008}})
    assert not unclear.promote and unclear.winner == "exp_weighted"
    assert "includes zero at 1% (low -0.0011), 5% (low -0.0008)" in unclear.reason
    one = promotion_decision(rates, strongest="exp_weighted", leads={"lightgbm": {0.01: 0.001, 0.05: 0.0}})
    assert one.winner == "exp_weighted" and "includes zero at 5%" in one.reason  # every gate coverage must be clear
    # without intervals (a summary-only gate) points decide, as before
    assert promotion_decision(rates, strongest="exp_weighted").winner == "lightgbm"


def test_gate_compares_with_the_strongest_baseline_and_promotes_the_winner():
    rates = {"lightgbm": summary([0.2, 0.4]), "naive": summary([0.1, 0.3]), "all_history": summary([0.15, 0.42])}
    # lightgbm beats naive but not the strongest baseline at 5%: the strongest baseline wins and is promoted
    decision = promotion_decision(rates, strongest="all_history")
    assert decision.promote and decision.winner == decision.candidate == "all_history"
    assert decision.baseline == "all_history" and decision.baseline_hit_rates == {"0.01": 0.15, "0.05": 0.42}
    assert "no forecaster beats the strongest baseline, all_history" in decision.reason and "lightgbm" in decision.reason
    assert not promotion_decision(rates, strongest="all_history", candidate="lightgbm").promote
    # against a weaker reference several challengers win: the best mean hit rate is promoted
    decision = promotion_decision(rates, strongest="naive")
    assert decision.winner == "lightgbm" and set(decision.hit_rates) == set(rates)
    with pytest.raises(ValueError, match="strongest baseline 'kde' is not in the backtest"):
        promotion_decision(rates, strongest="kde")


@pytest.fixture(scope="module")
def small_panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 1, 1, tzinfo=UTC),
                             datetime(2020, 3, 1, tzinfo=UTC))[1]


def quick_lgbm():
    return LightGBMForecaster(train_days=240, valid_days=28, n_estimators=40, zero_rate=0.2, num_threads=1)


def test_tracked_backtest_logs_run_registers_and_gates(small_panel, tmp_path, monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(data_dir=tmp_path / "data")
    tracked = run_tracked_backtest(
        small_panel, "toronto-test", settings, date(2020, 1, 1), date(2020, 3, 1),
        forecasters={"lightgbm": quick_lgbm, "naive": Naive, "sepp": lambda: SEPP(fit_days=120),
                     "all_history": HistoryCounts},
        n_boot=100, out_dir=tmp_path / "bt", strongest_days=28,
    )
    assert (tmp_path / "data" / "mlflow.db").is_file()  # embedded SQLite store by default
    run = mlflow.get_run(tracked.run_id)
    assert run.data.params["city"] == "toronto-test" and run.data.params["resolution"] == "9"
    assert len(run.data.params["data_fingerprint"]) == 24 and run.data.params["code_version"]
    assert "lightgbm.hit_rate.1pct" in run.data.metrics and "naive.pai.5pct" in run.data.metrics
    assert run.data.tags["claim.verdict.1pct"] in {"supported", "refuted", "undetermined"}
    # the strongest baseline is chosen on the 28 days before the test period, and every claim names it first
    strongest = tracked.strongest
    assert strongest.name in {"naive", "sepp", "all_history"} and strongest.window_end == "2020-01-01"
    assert run.data.tags["strongest_baseline"] == run.data.tags["claim.baseline"] == strongest.name
    assert f"validation.{strongest.name}.hit_rate.1pct" in run.data.metrics
    assert all(c.baseline == strongest.name and c.candidate == "lightgbm" for c in tracked.claims)
    others = {"naive", "sepp", "all_history"} - {strongest.name}
    assert {f"claim.{b}.ratio.5pct" for b in others} <= set(run.data.metrics)
    assert "lightgbm.hit_rate_pessimistic.1pct" in run.data.metrics
    assert run.data.metrics["naive.hit_rate_pessimistic.1pct"] <= run.data.metrics["naive.hit_rate.1pct"]
    assert run.data.params["lightgbm.features__window_days"] == "(1, 7, 28, 365)"  # nested params logged in full
    report = (tracked.out_dir / "report.md").read_text()
    assert "Strongest baseline" in report and "pessimistic" in report
    # the clairvoyant references and the headroom shares, logged apart from the forecasters
    assert "Clairvoyant references (not forecasters)" in report and "Share of the headroom" in report
    assert "reference.shift_of_day_clairvoyant.hit_rate.5pct" in run.data.metrics
    assert "headroom.lightgbm.5pct" in run.data.metrics or "headroom.lightgbm.5pct" in run.data.tags
    # diagnostics of the backtest's own pair: the winner (or the candidate) against the strongest baseline, with
    # the gain shares only for a forecaster whose contract gives importances
    model, baseline = tracked.assessed
    assert baseline == strongest.name and model in {"lightgbm", tracked.decision.winner}
    diagnostics = json.loads((tracked.out_dir / "diagnostics.json").read_text())
    assert diagnostics["model"] == model and diagnostics["baseline"] == strongest.name
    assert (diagnostics["gain"] is not None) == (model == "lightgbm")
    # per-cell forecasts anyone can re-score
    forecasts = pl.read_parquet(tracked.out_dir / "forecasts.parquet")
    assert forecasts.columns == ["cell", "shift_start_utc", "shift_id", "forecaster", "score", "observed"]
    assert forecasts.height == 4 * tracked.result.origins.size * small_panel.n_cells
    lgbm_rows = forecasts.filter(pl.col("forecaster") == "lightgbm").sort("shift_id", maintain_order=True)
    np.testing.assert_array_equal(lgbm_rows["score"].to_numpy(), tracked.result.predictions["lightgbm"].ravel())
    assert lgbm_rows["observed"].sum() == tracked.result.observed.sum()
    assert lgbm_rows["cell"].cast(pl.Utf8)[: small_panel.n_cells].to_list() == small_panel.study_area.h3_ids
    artifacts = {a.path for a in MlflowClient().list_artifacts(tracked.run_id, "backtest")}
    assert {"backtest/report.html", "backtest/report.md", "backtest/results.parquet"} <= artifacts
    pairwise = json.loads((tracked.out_dir / "pairwise.json").read_text())
    assert {(p["baseline"], p["coverage"]) for p in pairwise} == {(b, c) for b in ("naive", "sepp", "all_history")
                                                                  for c in (0.01, 0.05)}
    assert all(p["difference_low"] <= p["difference"] <= p["difference_high"] for p in pairwise)
    results = pl.read_parquet(tracked.out_dir / "results.parquet")
    assert set(results["forecaster"].unique()) == {"lightgbm", "naive", "sepp", "all_history"}
    assert results.filter(pl.col("forecaster") == "naive")["shift_id"].n_unique() == tracked.result.origins.size

    # the registered version carries the decision; the alias follows the gate
    client = MlflowClient()
    version = client.get_model_version(registered_name("toronto-test"), tracked.model_version)
    assert version.tags["promotion_decision"] == ("promoted" if tracked.decision.promote else "rejected")
    assert champion_version("toronto-test") == (tracked.model_version if tracked.decision.promote else None)

    # the winner is registered and promoted; it is a pyfunc with a signature that predicts from its input rows
    assert tracked.decision.promote and tracked.decision.baseline == strongest.name
    assert version.tags["promotion_decision"] == "promoted" and run.data.tags["champion_forecaster"] == tracked.decision.winner
    # logged as code with the forecaster beside it: it loads where MLflow refuses cloudpickled models
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = mlflow.pyfunc.load_model(f"models:/{registered_name('toronto-test')}/{tracked.model_version}")
    assert "model_code_path" in loaded.metadata.flavors["python_function"]
    forecaster = loaded.unwrap_python_model().forecaster
    assert forecaster.name == tracked.decision.winner
    columns = [c.name for c in loaded.metadata.get_input_schema().inputs]
    sample = forecaster.model_inputs(small_panel, small_panel.end_shift - 1)
    assert list(sample.columns) == columns
    np.testing.assert_allclose(np.asarray(loaded.predict(sample)), forecaster.predict(small_panel, small_panel.end_shift - 1)[0],
                               rtol=1e-6)


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
    apply_promotion("gate-city", v2, promotion_decision({"lightgbm": summary([0.05, 0.4]), "naive": summary([0.1, 0.3])},
                                                             candidate="lightgbm"))
    assert champion_version("gate-city") == v1  # the losing version does not take the alias
    assert client.get_model_version(name, v2).tags["promotion_decision"] == "rejected"
    assert str(client.get_registered_model(name).aliases[CHAMPION]) == v1
