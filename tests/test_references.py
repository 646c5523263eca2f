"""Clairvoyant reference maps and headroom shares: a hand-computed tiny case, then a tracked backtest on a small
synthetic city without "naive" (references kept apart from the forecasters everywhere, diagnostics of the
backtest's own winner), and `hotspots train --forecaster all_history`."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from service_support import isolated_mlflow_env
from test_baseline_champion import static_city
from typer.testing import CliRunner

from features.paths import DataPaths
from features.settings import Settings
from forecasting import registry
from forecasting.metrics import summarise
from forecasting.references import (
    CEILING,
    NO_HEADROOM,
    STATIC,
    clairvoyant_maps,
    headroom,
    headroom_share,
    score_references,
)
from forecasting.reporting.runs import assessed_pair, run_tracked_backtest
from forecasting.saved import SavedBacktest
from serving.cli import app

# 4 equal cells, 2 shifts a day, 2 days: cell 0 is busy in the first shift of the day, cell 1 in the second
OBSERVED = np.array([[3, 0, 1, 0],
                     [0, 3, 1, 0],
                     [3, 0, 1, 0],
                     [0, 2, 1, 1]], dtype=float)  # 16 crimes
ORIGINS = np.arange(100, 104)  # shift of day = id % 2: 0, 1, 0, 1
AREAS = np.ones(4)
COVERAGES = (0.25, 0.5)  # one cell, two cells


def summary(pred):
    return summarise(np.broadcast_to(pred, OBSERVED.shape), OBSERVED, AREAS, ORIGINS, 2, COVERAGES, n_boot=20)


def test_reference_maps_hand_computed():
    maps = clairvoyant_maps(OBSERVED, ORIGINS, 2)
    np.testing.assert_allclose(maps[STATIC], np.tile([1.5, 1.25, 1.0, 0.25], (4, 1)))
    np.testing.assert_allclose(maps[CEILING], [[3, 0, 1, 0], [0, 2.5, 1, 0.5], [3, 0, 1, 0], [0, 2.5, 1, 0.5]])
    refs = score_references(OBSERVED, AREAS, ORIGINS, 2, COVERAGES, n_boot=20)
    # static: cell 0 always (6 of 16), then cells 0 and 1 (11); shift of day: cell 0 / cell 1 (11), plus cell 2 (15)
    np.testing.assert_allclose(refs[STATIC].point["hit_rate"], [6 / 16, 11 / 16])
    np.testing.assert_allclose(refs[CEILING].point["hit_rate"], [11 / 16, 15 / 16])
    assert np.all(refs[STATIC].point["hit_rate"] <= refs[CEILING].point["hit_rate"])
    # the pessimistic bound is computed as for any forecaster (no ties at the top here: equal)
    np.testing.assert_allclose(refs[CEILING].pessimistic["hit_rate"], refs[CEILING].point["hit_rate"])

    forecasters = {"steady": summary(np.array([0.0, 0.0, 1.0, 0.0])),  # cell 2: 4 of 16, then cell 2 + 3 ...
                   "busy": summary(np.array([2.0, 1.0, 0.0, 0.0]))}  # cells 0, 1: the static map's choice
    for s in forecasters.values():  # the ceiling is at or above every forecaster
        assert np.all(s.point["hit_rate"] <= refs[CEILING].point["hit_rate"] + 1e-12)
    shares = {(h.forecaster, h.coverage, h.ties): h for h in headroom(forecasters, refs, "steady", COVERAGES)}
    busy = shares[("busy", 0.25, "random")]
    assert busy.strongest_hit_rate == pytest.approx(4 / 16) and busy.ceiling_hit_rate == pytest.approx(11 / 16)
    assert busy.share == pytest.approx((6 / 16 - 4 / 16) / (11 / 16 - 4 / 16))  # 2/7
    assert busy.text() == "29%"
    assert shares[("steady", 0.25, "random")].share == 0
    assert ("busy", 0.5, "pessimistic") in shares
    with pytest.raises(ValueError, match="strongest baseline 'naive' is not in the backtest"):
        headroom(forecasters, refs, "naive", COVERAGES)


def test_headroom_share_without_headroom():
    assert headroom_share(0.4, 0.3, 0.5) == pytest.approx(0.5)
    assert headroom_share(0.2, 0.3, 0.5) == pytest.approx(-0.5)
    assert headroom_share(0.3, 0.3, 0.3) is None  # ceiling = strongest: nothing to share, no division by zero
    assert headroom_share(0.3, 0.4, 0.35) is None
    refs = score_references(OBSERVED, AREAS, ORIGINS, 2, COVERAGES, n_boot=20)
    oracle = summary(clairvoyant_maps(OBSERVED, ORIGINS, 2)[CEILING])  # a "baseline" as good as the ceiling
    h = headroom({"oracle": oracle, "other": summary(np.arange(4.0))}, refs, "oracle", COVERAGES)
    assert all(x.share is None and x.text().startswith(NO_HEADROOM) for x in h)


def test_assessed_pair_follows_the_backtest():
    assert assessed_pair("lightgbm", "lightgbm", "sepp") == ("lightgbm", "sepp")
    assert assessed_pair("sepp", "lightgbm", "sepp") == ("lightgbm", "sepp")  # the baseline won: the candidate vs it
    assert assessed_pair("all_history", None, "all_history") == ("all_history", None)
    assert assessed_pair(None, None, None) is None


CITY = "static-city"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    with isolated_mlflow_env():
        settings = Settings(data_dir=root / "data")
        panel, _ = static_city(days=200)
        panel.save(DataPaths(settings).panel(CITY))
        result = run_tracked_backtest(panel, CITY, settings, date(2020, 7, 1), date(2020, 7, 15),
                                      forecasters=registry.factories(["kde", "last_year", "all_history"]), n_boot=50,
                                      strongest_days=14)
        yield result, settings, root


def test_backtest_reports_references_apart_from_forecasters(tracked):
    result, settings, _ = tracked
    names = {"kde", "last_year", "all_history"}
    assert set(result.references) == {STATIC, CEILING}
    for s in result.references.values():  # scored like a forecaster: bounded by the best possible hits
        assert np.all(s.point["pei"] <= 1 + 1e-12) and s.n_shifts == result.result.origins.size
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert set(summary["forecasters"]) == names and set(summary["references"]) == {STATIC, CEILING}
    assert "no forecaster can use" in summary["references"][CEILING]["label"]
    assert summary["headroom"]["strongest_baseline"] == result.strongest.name
    assert {s["forecaster"] for s in summary["headroom"]["shares"]} == names
    # never a forecaster: not in the Parquet forecasts, the saved predictions, the gate or the strongest choice
    forecasts = pl.read_parquet(result.out_dir / "forecasts.parquet")
    assert set(forecasts["forecaster"].cast(pl.Utf8).unique()) == names
    assert set(SavedBacktest.load(result.out_dir).predictions) == names
    assert set(result.decision.hit_rates) == names and set(result.strongest.hit_rates) == names
    report = (result.out_dir / "report.md").read_text()
    assert "## Clairvoyant references (not forecasters)" in report and "## Share of the headroom" in report
    assert f"{CEILING} (reference)" in report and "shift_of_day_clairvoyant (reference)" in (
        result.out_dir / "report.html").read_text()
    run = MlflowClient(tracking_uri=settings.tracking_uri).get_run(result.run_id)
    ceiling = run.data.metrics[f"reference.{CEILING}.hit_rate.1pct"]
    assert ceiling == pytest.approx(result.references[CEILING].point["hit_rate"][1])
    strongest = result.strongest.name
    key = f"headroom.{strongest}.1pct"
    assert run.data.metrics.get(key) == 0 or run.data.tags.get(key, "").startswith(NO_HEADROOM)
    assert not any(k.startswith(f"{STATIC}.") or k.startswith(f"{CEILING}.") for k in run.data.metrics)


def test_backtest_without_naive_diagnoses_its_winner(tracked):
    result, _, _ = tracked
    winner = result.decision.winner
    assert result.assessed == (winner, None)  # no learned candidate: the winning baseline alone
    diagnostics = json.loads((result.out_dir / "diagnostics.json").read_text())
    assert diagnostics["model"] == winner and diagnostics["gain"] is None
    saved = SavedBacktest.load(result.out_dir)
    assert saved.winner == winner and saved.strongest_baseline == result.strongest.name
    assert saved.assessed_pair() == (winner, None)  # the strongest baseline itself: assessed alone
    assert saved.importance_of(winner) is None


def test_train_any_registered_forecaster(tracked):
    _, settings, root = tracked
    runner = CliRunner()
    with isolated_mlflow_env():
        out = runner.invoke(app, ["train", CITY, "--forecaster", "all_history", "--data-dir", str(root / "data")])
    assert out.exit_code == 0, out.output
    assert "registered version" in out.output and "(all_history)" in out.output
    run_id = out.output.split("run ")[1].split(":")[0]
    run = MlflowClient(tracking_uri=settings.tracking_uri).get_run(run_id)
    assert run.data.tags["forecaster"] == "all_history" and run.data.params["all_history.window_days"] == "None"
    assert run.data.metrics["diagnostics.gini.1pct"] > 0  # the validation window, against the strongest baseline
    bad = runner.invoke(app, ["train", CITY, "--forecaster", "oracle", "--data-dir", str(root / "data")])
    assert bad.exit_code == 2 and "unknown forecaster 'oracle'" in bad.output
