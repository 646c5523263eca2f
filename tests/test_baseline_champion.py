"""Any forecaster can be champion: on a synthetic city whose truth is a long-run rate per cell (so the
all-history count map is the true model's estimator), the gate promotes that baseline and the service serves
it: hotspots, GeoJSON, the briefing PNG and the model card, with explanations absent but not failing."""

from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import h3
import numpy as np
import polars as pl
import pytest
from service_support import get, isolated_mlflow_env

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.panel import build_panel
from features.paths import DataPaths
from features.settings import Settings
from forecasting import registry
from forecasting.reporting.runs import run_tracked_backtest
from serving.keys import Role

CITY = "static-city"
CAL = ShiftCalendar.from_strings("UTC", ["00:00", "08:00", "16:00"])
FIRST = CAL.shift_of(datetime(2020, 1, 1, tzinfo=UTC))


def static_city(days: int = 480, per_shift: float = 3.0, shape: float = 1.5, seed: int = 5):
    """Poisson counts from a fixed, heavy-tailed rate per cell: no trend, no season, no near repeats."""
    rng = np.random.default_rng(seed)
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(43.6532, -79.3832, 9), 5)], 9)
    rate = rng.gamma(shape, size=len(area))
    rate *= per_shift / rate.sum()
    n_shifts = days * CAL.per_day
    counts = rng.poisson(rate, size=(n_shifts, len(area)))
    shift, cell = np.nonzero(counts)
    repeat = counts[shift, cell]
    shift, cell = np.repeat(shift, repeat), np.repeat(cell, repeat)
    lat, lon = area.centroids
    starts = CAL.bounds(FIRST + np.arange(n_shifts))["start_utc"]
    incidents = pl.DataFrame({
        "incident_id": [f"i{k}" for k in range(shift.size)],
        "occurred_at": starts.gather(shift) + timedelta(minutes=30), "timezone": "UTC", "category": "x",
        "latitude": lat[cell], "longitude": lon[cell], "source": "synthetic"})
    panel, _ = build_panel(incidents, area, CAL, ["x"], first_shift=FIRST, end_shift=FIRST + n_shifts)
    return panel, rate


@pytest.fixture(scope="module")
def champion_service(tmp_path_factory):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    root = tmp_path_factory.mktemp("baseline-champion")
    with isolated_mlflow_env():
        settings = Settings(data_dir=root / "data")
        panel, rate = static_city()
        panel.save(DataPaths(settings).panel(CITY))
        tracked = run_tracked_backtest(
            panel, CITY, settings, date(2021, 3, 1), date(2021, 4, 1),
            forecasters=registry.factories(["naive", "kde", "all_history"]), n_boot=100, strongest_days=28)
        app = create_app(settings.model_copy(update=dict(model_refresh_seconds=3600)))
        keys = {role: app.state.keys.create_key(role, f"test {role.value}") for role in Role}
        with TestClient(app) as client:
            yield SimpleNamespace(client=client, keys=keys, tracked=tracked, panel=panel, rate=rate)


def test_the_gate_promotes_the_baseline_that_is_the_true_model(champion_service):
    tracked = champion_service.tracked
    assert tracked.strongest.name == "all_history"  # chosen on the 28 days before the test period
    decision = tracked.decision
    assert decision.promote and decision.winner == "all_history" and decision.baseline == "all_history"
    assert "no forecaster beats the strongest baseline, all_history" in decision.reason
    assert tracked.model_version is not None


def test_the_service_serves_the_baseline_champion(champion_service):
    svc = champion_service
    hot = get(svc, "/v1/hotspots", city=CITY, shift="next", k=5)
    assert hot.status_code == 200, hot.text
    body = hot.json()
    assert len(body["hotspots"]) == 5
    assert all(h["top_features"] == [] for h in body["hotspots"])  # a count map has no drivers: absent, not failing
    # the served forecast is the all-history map: the true hottest cells lead
    ids = [h["h3"] for h in body["hotspots"]]
    top_true = {svc.panel.study_area.h3_ids[i] for i in np.argsort(-svc.rate)[:10]}
    assert len(set(ids) & top_true) >= 3
    history = registry.make("all_history").fit(svc.panel).predict(svc.panel, svc.panel.end_shift)[0]
    by_cell = dict(zip(svc.panel.study_area.h3_ids, history))
    assert [h["expected_count"] for h in body["hotspots"]] == pytest.approx([by_cell[i] for i in ids])

    geo = get(svc, "/v1/hotspots.geojson", city=CITY, shift="next", coverage=0.05)
    assert geo.status_code == 200 and geo.json()["type"] == "FeatureCollection" and geo.json()["features"]
    png = get(svc, "/v1/hotspots.png", city=CITY, shift="next", k=5)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    card = get(svc, f"/v1/models/{CITY}", Role.analyst)
    assert card.status_code == 200, card.text
    models = card.json()
    assert models["champion_version"] == svc.tracked.model_version and models["loaded_version"] == svc.tracked.model_version
    champion = next(v for v in models["versions"] if v["is_champion"])
    assert champion["promotion"]["decision"] == "promoted" and champion["promotion"]["detail"]["winner"] == "all_history"
    backtest = models["card"]["backtest"]
    assert {s["forecaster"] for s in backtest["scores"]} == {"naive", "kde", "all_history"}
    assert set(backtest["best_by_coverage"].values()) == {"all_history"}
