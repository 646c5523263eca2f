"""``hotspots retrain`` on a synthetic city whose truth is a fixed rate per cell (the all-history count map is the
true model's estimator): the gate refuses a LightGBM that cannot beat it, promotes the baseline when it is the
candidate, and a dry run registers nothing and moves no alias. Everything lands in one MLflow run per retrain."""

from __future__ import annotations

from datetime import date

import pytest
from mlflow.tracking import MlflowClient
from service_support import isolated_mlflow_env
from test_baseline_champion import static_city
from typer.testing import CliRunner

from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting import registry
from forecasting.reporting.retrain import latest_months, retrain
from forecasting.reporting.tracking import registered_name

CITY = "static-city"
# One two-leaf tree: a two-level map that cannot beat the true model's estimator at either coverage (a full
# LightGBM may tie or edge past it on a short window by chance, which would make the refusal a coin toss).
LIGHT = {"train_days": 120, "valid_days": 28, "n_estimators": 1, "num_leaves": 2, "num_threads": 1}


def versions(settings: Settings) -> list[str]:
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{registered_name(CITY)}'"))


def tags(settings: Settings, run_id: str) -> dict[str, str]:
    return MlflowClient(tracking_uri=settings.tracking_uri).get_run(run_id).data.tags


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    settings = Settings(data_dir=root / "data")
    panel, _ = static_city()
    panel.save(DataPaths(settings).panel(CITY))
    with isolated_mlflow_env():
        yield settings, panel


def test_latest_months_are_complete_local_months(city):
    _, panel = city
    assert panel.calendar.local_date(panel.end_shift - 1) == date(2021, 4, 24)
    assert latest_months(panel, 1) == (date(2021, 3, 1), date(2021, 4, 1))
    assert latest_months(panel, 3) == (date(2021, 1, 1), date(2021, 4, 1))
    may = panel.calendar.local_day(date(2021, 5, 1)) * panel.calendar.per_day  # first shift of 1 May
    full = CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, may, panel.counts)
    assert latest_months(full, 1) == (date(2021, 4, 1), date(2021, 5, 1))  # ends exactly at a month's end
    with pytest.raises(ValueError, match="at least 1"):
        latest_months(panel, 0)


def test_dry_run_then_run_then_the_gate_refuses(city):
    settings, panel = city
    baselines = registry.factories(["naive", "all_history"])
    kwargs = dict(months=1, n_boot=50, strongest_days=28)

    dry = retrain(panel, CITY, settings, baselines, dry_run=True, **kwargs)
    assert dry.decision.promote and dry.decision.candidate == "all_history"  # the gate would pass ...
    assert dry.version is None and dry.champion_before is None and dry.champion_after is None  # ... nothing moved
    assert versions(settings) == [] and not DataPaths(settings).backtests_root.exists()
    assert tags(settings, dry.tracked.run_id)["retrain"] == "dry-run"
    assert "dry run" in dry.sentence() and "would promote all_history" in dry.sentence()

    real = retrain(panel, CITY, settings, baselines, **kwargs)
    assert real.decision.promote and real.version == "1" and real.champion_after == "1" and real.moved
    assert tags(settings, real.tracked.run_id)["promotion"] == "promoted"

    challenger = registry.factories(["lightgbm", "naive", "all_history"], params={"lightgbm": LIGHT})
    refused = retrain(panel, CITY, settings, challenger, **kwargs)
    assert refused.decision.candidate == "lightgbm" and refused.decision.baseline == "all_history"
    assert not refused.decision.promote and "no forecaster beats the strongest baseline" in refused.decision.reason
    assert refused.version is None and refused.champion_after == "1" and not refused.moved
    assert versions(settings) == ["1"]  # a refused candidate is not registered
    run = tags(settings, refused.tracked.run_id)
    assert run["kind"] == "retrain" and run["promotion"] == "rejected"
    assert "not promoted, the champion stays 1" in refused.sentence()


def test_cli_dry_run_changes_nothing(city):
    from serving.cli import app

    settings, _ = city
    before = versions(settings)
    result = CliRunner().invoke(app, ["retrain", CITY, "--dry-run", "--months", "1", "--forecaster", "naive",
                                      "--forecaster", "all_history", "--n-boot", "50",
                                      "--data-dir", str(settings.data_dir)])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "nothing registered" in result.output
    assert versions(settings) == before
    bad = CliRunner().invoke(app, ["retrain", CITY, "--forecaster", "nope", "--data-dir", str(settings.data_dir)])
    assert bad.exit_code == 2 and "unknown forecaster" in bad.output and "Traceback" not in bad.output
