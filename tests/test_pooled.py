"""The pooled LightGBM across cities on a real two-process LocalCluster, on small real slices: Toronto cut into
three "cities" by area (June-December 2020). Training runs with lightgbm.dask on rows the workers build from the
saved panels; it is deterministic, leakage-free, wrapped per city as an ordinary Forecaster that pickles and
takes parameters, and the pooled backtest writes a report with one row per city, smaller first."""

from __future__ import annotations

import json
import pickle
import shutil
from datetime import UTC, datetime

import mlflow
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel
from typer.testing import CliRunner

from features.panel import CountPanel
from features.settings import Settings
from forecasting.base import NotFittedError
from forecasting.claim import ClaimResult
from forecasting.pooled import PooledLightGBM, load_panel, train_pooled
from forecasting.pooled_backtest import CANNOT_TELL, HELPS, HURTS, pooling_verdict
from serving.cli import app

BOXES = {"downtown": ((43.640, 43.665), (-79.400, -79.370)),
         "east": ((43.660, 43.690), (-79.350, -79.310)),
         "north": ((43.750, 43.770), (-79.420, -79.390))}
SMALL = {"train_days": 90, "valid_days": 14, "n_estimators": 40, "checkpoint": 10}


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HOTSPOTS_DASK_SCHEDULER", raising=False)


@pytest.fixture(scope="module")
def cities(toronto_incidents, tmp_path_factory) -> dict[str, str]:
    """Three saved panels (the shared data folder's layout: one folder per city)."""
    root = tmp_path_factory.mktemp("pooled-panels")
    out = {}
    for name, (lat, lon) in BOXES.items():
        _, panel = toronto_box_panel(toronto_incidents, lat, lon, datetime(2020, 6, 1, tzinfo=UTC),
                                     datetime(2021, 1, 1, tzinfo=UTC))
        assert panel.counts["count"].sum() > 100, name
        panel.save(root / name)
        out[name] = str(root / name)
    return out


def trees(model: PooledLightGBM) -> str:
    """The booster's trees (its parameters section also records the network ports of that training)."""
    return model.booster_.model_to_string().split("end of trees")[0]


def cutoff_of(folder: str) -> int:
    panel = load_panel(folder)
    return panel.end_shift - 3 * 30  # 30 days before the panel's end


_BASE: dict[str, list[PooledLightGBM]] = {}


@pytest.fixture
def base(cities, client) -> list[PooledLightGBM]:
    """The three cities' pooled models at their cutoffs, trained once for the module (``client`` is a per-test
    fixture over the session's cluster, so this cannot be module-scoped): the determinism and the leakage tests
    both compare a second training against this one, which each used to train for itself."""
    if client.scheduler.address not in _BASE:
        folders = list(cities.values())
        _BASE[client.scheduler.address] = train_pooled(client, folders, [cutoff_of(f) for f in folders],
                                                       PooledLightGBM(**SMALL))
    return _BASE[client.scheduler.address]


def test_pooled_training_runs_on_the_cluster_and_is_deterministic(cities, client, base):
    folders = list(cities.values())
    cutoffs = [cutoff_of(f) for f in folders]
    first = base
    again = train_pooled(client, folders, cutoffs, PooledLightGBM(**SMALL))
    assert len(first) == 3 and all(m.fit_summary()["cities"] == 3 for m in first)
    assert trees(first[0]) == trees(again[0])
    rates = [m.rate_ for m in first]
    means = []
    for model, twin, folder, cutoff in zip(first, again, folders, cutoffs):
        panel = load_panel(folder)
        assert model.fitted_until_ == cutoff and model.columns_[-1] == "city_log_rate"
        assert not any(c.startswith("cat_") for c in model.columns_)
        pred = model.predict(panel, np.arange(cutoff, cutoff + 9))
        np.testing.assert_array_equal(pred, twin.predict(panel, np.arange(cutoff, cutoff + 9)))
        assert pred.shape == (9, panel.n_cells) and np.all(np.isfinite(pred)) and np.all(pred > 0)
        means.append(pred.mean())
    # one booster, each city's own scale: the busier city (per cell) gets the larger forecasts
    assert len(set(rates)) == 3
    assert np.argmax(means) == np.argmax(rates) and np.argmin(means) == np.argmin(rates)


def test_changing_incidents_at_or_after_the_cutoff_changes_nothing(cities, client, base, tmp_path):
    folders = list(cities.values())
    cutoffs = [cutoff_of(f) for f in folders]
    # the first city's future rewritten: every count at or after its cutoff tripled, plus a new incident per shift
    panel = load_panel(folders[0])
    counts = panel.counts
    later = pl.col("shift") >= cutoffs[0]
    extra = pl.DataFrame({"shift": np.arange(cutoffs[0], panel.end_shift), "cell": np.zeros(panel.end_shift - cutoffs[0]),
                          "category": np.zeros(panel.end_shift - cutoffs[0]), "count": np.ones(panel.end_shift - cutoffs[0])},
                         schema=counts.schema)
    changed = pl.concat([counts.with_columns(pl.when(later).then(pl.col("count") * 3).otherwise(pl.col("count"))), extra]) \
        .group_by("shift", "cell", "category").agg(pl.col("count").sum()).sort("shift", "cell", "category")
    assert changed["count"].sum() > counts["count"].sum()
    altered = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift, changed)
    altered.save(tmp_path / "downtown")
    other = train_pooled(client, [str(tmp_path / "downtown"), *folders[1:]], cutoffs, PooledLightGBM(**SMALL))
    assert trees(other[0]) == trees(base[0])
    assert [m.rate_ for m in other] == [m.rate_ for m in base]
    np.testing.assert_array_equal(other[0].predict(altered, cutoffs[0]), base[0].predict(panel, cutoffs[0]))


def test_the_pooled_forecaster_fits_through_the_contract_round_trips_and_takes_parameters(cities, client):
    folders = list(cities.values())
    panel, cutoff = load_panel(folders[0]), cutoff_of(folders[0])
    model = PooledLightGBM(others=tuple(folders[1:]), cluster=client.scheduler.address, **SMALL)
    with pytest.raises(NotFittedError):
        model.predict(panel, cutoff)
    model.fit(panel, cutoff)
    assert model.fitted_until_ == cutoff and model.fit_summary()["cities"] == 3
    expected = model.predict(panel, np.arange(cutoff, cutoff + 6))
    loaded = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(loaded.predict(panel, np.arange(cutoff, cutoff + 6)), expected)
    assert list(loaded.feature_importance()) and set(loaded.feature_importance()) == set(model.columns_)
    params = model.get_params()
    assert params["others"] == tuple(folders[1:]) and params["features__window_days"] == (1, 7, 28, 365)
    model.set_params(n_estimators=5, features__decay_days=(1.0,))
    assert model.n_estimators == 5 and model.features.decay_days == (1.0,)
    with pytest.raises(ValueError, match="has no parameter 'trees'"):
        model.set_params(trees=5)


def test_the_pooled_backtest_writes_a_row_per_city_smaller_first_and_logs_once(cities, client, tmp_path):
    out = tmp_path / "report"
    args = ["pooled", *[f"{name}={folder}" for name, folder in cities.items()], "--test-start", "2020-12-01",
            "--test-end", "2021-01-01", "--out", str(out), "--data-dir", str(tmp_path / "data"),
            "--cluster", client.scheduler.address, "--n-boot", "50", "--train-days", "90", "--n-estimators", "40"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "pooled.json").read_text())
    rows = report["cities"]
    assert sorted(r["city"] for r in rows) == sorted(cities) and report["refits"] == 1
    assert [r["history_incidents"] for r in rows] == sorted(r["history_incidents"] for r in rows)
    for row in rows:
        assert row["verdict"] in (HELPS, HURTS, CANNOT_TELL) and row["test_incidents"] > 0
        for tag in ("1pct", "5pct"):
            assert 0 <= row[f"pooled_hit_rate_{tag}"] <= 1 and 0 <= row[f"per_city_hit_rate_{tag}"] <= 1
            assert row[f"difference_low_{tag}"] <= row[f"difference_{tag}"] + 1e-12 <= row[f"difference_high_{tag}"] + 2e-12
    table = (out / "pooled.md").read_text()
    assert all(f"| {r['city']} |" in table for r in rows)
    forecasts = pl.read_parquet(out / "forecasts.parquet")
    assert set(forecasts["city"].unique()) == set(cities) and forecasts["pooled"].min() > 0
    mlflow.set_tracking_uri(Settings(data_dir=tmp_path / "data").tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'pooled'")
    assert len(runs) == 1 and runs.iloc[0][f"tags.verdict.{rows[0]['city']}"] == rows[0]["verdict"]


def test_bad_panels_are_one_line_naming_the_fix(cities, tmp_path):
    folder = next(iter(cities.values()))
    for args, message in ((["pooled", folder, str(tmp_path), "--test-start", "2020-12-01", "--test-end", "2021-01-01"],
                           "is not a saved panel folder"),
                          (["pooled", folder, "--test-start", "2020-12-01", "--test-end", "2021-01-01"],
                           "at least two panels"),
                          (["pooled", folder, f"x={folder}", "--test-start", "December", "--test-end", "2021-01-01"],
                           "give both as YYYY-MM-DD")):
        result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "data")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def test_the_verdict_reads_the_paired_intervals():
    def claim(low: float, high: float) -> ClaimResult:
        return ClaimResult("pooled", "lightgbm", 0.01, 1.0, 0.2, 0.2, 1.0, 0.9, 1.1, (low + high) / 2, low, high,
                           0.95, 100, 300, "undetermined")

    assert pooling_verdict([claim(0.01, 0.03), claim(-0.01, 0.02)]) == HELPS
    assert pooling_verdict([claim(-0.03, -0.01), claim(-0.01, 0.02)]) == HURTS
    assert pooling_verdict([claim(0.01, 0.03), claim(-0.03, -0.01)]) == CANNOT_TELL
    assert pooling_verdict([claim(-0.01, 0.01), claim(-0.02, 0.02)]) == CANNOT_TELL
