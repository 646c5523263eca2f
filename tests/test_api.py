"""The hotspot service through FastAPI's TestClient, on a small real Toronto panel with a quickly trained
LightGBM registered in an embedded MLflow registry and promoted to champion."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import numpy as np
import pytest
import shapely
from fastapi.testclient import TestClient
from service_support import (
    BARE,
    CITY,
    asgi_service,
    closed_port,
    get,
    problem,
    quick_lgbm,
    register,
    set_champion,
)

from features.settings import Settings
from forecasting.metrics import rank_cells
from forecasting.reporting.tracking import registered_name
from serving.app import create_app
from serving.dependencies import get_now
from serving.keys import KeyStore, Role
from serving.models_store import KEEP_COPIES


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("api")) as service:
        yield service






# --- probes -------------------------------------------------------------------------------------------

def test_health_and_readiness(svc):
    assert svc.client.get("/healthz").json() == {"status": "ok"}
    ready = svc.client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["registry_reachable"] is True
    cities = {c["city"]: c for c in body["cities"]}
    assert cities[CITY]["ready"] and cities[CITY]["model_version"] == svc.version
    assert cities[CITY]["model_source"] == "registry" and cities[CITY]["model_name"] == registered_name(CITY)
    assert not cities[BARE]["ready"] and cities[BARE]["status"] == "no_champion"
    assert f"hotspots backtest {BARE}" in cities[BARE]["message"]


def test_not_ready_without_panels_and_openapi(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["cities"] == []
        assert client.get("/healthz").status_code == 200
        schema = client.get("/openapi.json").json()
        params = {p["name"] for p in schema["paths"]["/v1/hotspots"]["get"]["parameters"]}
        assert {"city", "shift", "category", "k", "coverage"} <= params
        assert {"/v1/cities", "/v1/hotspots.geojson", "/v1/forecast", "/v1/models/{city}", "/v1/audit"} <= set(schema["paths"])
        assert "APIKeyHeader" in schema["components"]["securitySchemes"]


# --- access control -----------------------------------------------------------------------------------

def test_keys_are_hashed_verified_and_revocable(svc):
    store: KeyStore = svc.app.state.keys
    plaintext = store.create_key("analyst", "temporary")
    key_id, role = store.verify(plaintext)
    assert role is Role.analyst and plaintext.startswith(f"hsk_{key_id}_")
    secret = plaintext.split("_", 2)[2]
    raw = sqlite3.connect(svc.settings.data_dir / "serving.db").execute("select * from api_keys").fetchall()
    assert not any(secret.encode() in bytes(str(row), "utf-8") for row in raw)
    assert store.verify(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert store.verify(f"hsk_{key_id}") is None and store.verify("nonsense") is None
    assert svc.client.get("/v1/models/" + CITY, headers={"X-API-Key": plaintext}).status_code == 200
    assert store.revoke_key(key_id) and not store.revoke_key(key_id)
    assert store.verify(plaintext) is None
    assert svc.client.get("/v1/cities", headers={"X-API-Key": plaintext}).status_code == 401


def test_401_and_403_by_role(svc):
    for path in ("/v1/cities", "/v1/hotspots", "/v1/forecast", f"/v1/models/{CITY}", "/v1/audit"):
        missing = get(svc, path, role=None, city=CITY)
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
        wrong = svc.client.get(path, params={"city": CITY}, headers={"X-API-Key": "hsk_0000_nope"})
        assert wrong.status_code == 401
    allowed = {  # path -> roles allowed
        "/v1/cities": set(Role),
        f"/v1/models/{CITY}": {Role.analyst, Role.auditor, Role.admin},
        "/v1/audit": {Role.auditor, Role.admin},
    }
    for path, roles in allowed.items():
        for role in Role:
            response = get(svc, path, role)
            assert response.status_code == (200 if role in roles else 403), (path, role, response.text)
            if response.status_code == 403:
                assert role.value in response.json()["detail"]
    assert get(svc, "/v1/hotspots", Role.planner, city=CITY, k=3).status_code == 200


# --- cities and forecasts -----------------------------------------------------------------------------

def test_cities(svc):
    cities = {c["city"]: c for c in get(svc, "/v1/cities").json()["cities"]}
    assert set(cities) == {CITY, BARE}
    toronto = cities[CITY]
    assert toronto["ready"] and toronto["model_version"] == svc.version and toronto["model_target"] == "all"
    assert toronto["n_cells"] == svc.panel.n_cells and toronto["timezone"] == "America/Toronto"
    assert toronto["shift_starts"] == ["06:00", "14:00", "22:00"] and "robbery" in toronto["categories"]
    assert toronto["data_end"].startswith("2020-03-01T06:00:00-05:00")
    assert not cities[BARE]["ready"] and cities[BARE]["model_version"] is None


def test_hotspots_next_shift_with_k(svc):
    response = get(svc, "/v1/hotspots", city=CITY, k=10)
    assert response.status_code == 200, response.text
    body = response.json()
    panel, model = svc.panel, svc.model
    # the panel ends in 2020, so "next" is the first shift after the data, and the response says so
    assert body["shift"]["shift_id"] == panel.end_shift and body["shift"]["after_data"] is True
    assert body["shift"]["requested"] == "next" and body["shift"]["hours"] == 8
    assert body["shift"]["start"] == "2020-03-01T06:00:00-05:00" and body["shift"]["end"] == "2020-03-01T14:00:00-05:00"
    assert body["model"] == {"name": registered_name(CITY), "version": svc.version, "source": "registry", "target": "all"}
    assert body["category"] == "all" and body["selection"]["k"] == 10 and body["selection"]["n_cells"] == 10
    hotspots = body["hotspots"]
    assert [h["rank"] for h in hotspots] == list(range(1, 11))
    counts = np.array([h["expected_count"] for h in hotspots])
    percentiles = np.array([h["risk_percentile"] for h in hotspots])
    assert np.all(np.diff(counts) <= 0) and np.all(np.diff(percentiles) <= 0) and percentiles[0] == 100
    assert np.all((percentiles > 0) & (percentiles <= 100))
    # same cells, counts and order as the forecaster and the project's ranking (tie rule included)
    expected = model.predict(panel, panel.end_shift)[0]
    order = rank_cells(expected, panel.end_shift)[0][:10]
    assert [h["h3"] for h in hotspots] == [panel.study_area.h3_ids[i] for i in order]
    np.testing.assert_allclose(counts, expected[order], rtol=1e-9)
    # explanations: the 3 largest pred_contrib terms of each cell
    contrib, names = model.contributions(panel, panel.end_shift)
    for h, i in zip(hotspots, order):
        assert len(h["top_features"]) == 3
        row = contrib[i, :-1]
        biggest = [names[j] for j in np.argsort(-np.abs(row), kind="stable")[:3]]
        assert [f["feature"] for f in h["top_features"]] == biggest
        np.testing.assert_allclose([f["contribution"] for f in h["top_features"]],
                                   row[np.argsort(-np.abs(row), kind="stable")[:3]])
        assert 43.63 < h["centroid"]["lat"] < 43.68 and -79.42 < h["centroid"]["lon"] < -79.36
    # no incident-level content anywhere
    assert not {"incidents", "occurred_at", "latitude", "id"} & set(body) and "occurred" not in response.text
    # default k is 20
    assert len(get(svc, "/v1/hotspots", city=CITY).json()["hotspots"]) == 20


def test_hotspots_with_coverage_reach_the_area_share(svc):
    areas = svc.panel.study_area.areas_km2
    for coverage in (0.01, 0.05, 0.2):
        body = get(svc, "/v1/hotspots", city=CITY, coverage=coverage).json()
        sel = body["selection"]
        assert sel["coverage"] == coverage and sel["k"] is None and sel["n_cells"] == len(body["hotspots"])
        assert sel["area_share"] >= coverage - 1e-12
        cells = [svc.panel.study_area.h3_ids.index(h["h3"]) for h in body["hotspots"]]
        assert abs(areas[cells].sum() / areas.sum() - sel["area_share"]) < 1e-9
        assert areas[cells[:-1]].sum() / areas.sum() < coverage  # the fewest cells that reach it
        assert body["hotspots"][-1]["cumulative_area_share"] == pytest.approx(sel["area_share"])


def test_next_shift_follows_the_clock_and_iso_shifts(svc):
    svc.app.dependency_overrides[get_now] = lambda: datetime(2020, 2, 10, 17, 30, tzinfo=UTC)  # 12:30 local
    try:
        body = get(svc, "/v1/hotspots", city=CITY, k=5).json()
    finally:
        svc.app.dependency_overrides.clear()
    assert body["shift"]["start"] == "2020-02-10T14:00:00-05:00" and body["shift"]["after_data"] is False
    for given in ("2020-02-10T14:00:00-05:00", "2020-02-10T19:00:00Z", "2020-02-10T14:00"):
        same = get(svc, "/v1/hotspots", city=CITY, k=5, shift=given).json()
        assert same["shift"]["shift_id"] == body["shift"]["shift_id"] and same["shift"]["requested"] == given
        assert same["hotspots"] == body["hotspots"]


def test_geojson_is_valid_rfc7946(svc):
    response = get(svc, "/v1/hotspots.geojson", city=CITY, k=8)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/geo+json")
    collection = response.json()
    plain = get(svc, "/v1/hotspots", city=CITY, k=8).json()
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 8
    assert collection["hotspots"]["model"]["version"] == svc.version
    for feature, hotspot in zip(collection["features"], plain["hotspots"]):
        assert feature["type"] == "Feature" and feature["id"] == hotspot["h3"]
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        ring = geometry["coordinates"][0]
        assert len(ring) == 7 and ring[0] == ring[-1]  # hexagon, closed
        lon, lat = np.array(ring).T
        assert np.all((-79.45 < lon) & (lon < -79.33)) and np.all((43.62 < lat) & (lat < 43.69))  # [lon, lat]
        assert shapely.Polygon(ring).exterior.is_ccw
        assert shapely.Polygon(ring).contains(shapely.Point(hotspot["centroid"]["lon"], hotspot["centroid"]["lat"]))
        props = feature["properties"]
        assert {k: props[k] for k in hotspot} == hotspot
        assert props["model_version"] == svc.version and props["shift_start"] == plain["shift"]["start"]


def test_forecast_covers_every_cell_and_matches_hotspots(svc):
    response = get(svc, "/v1/forecast", city=CITY)
    assert response.status_code == 200
    body = response.json()
    cells = {c["h3"]: c["expected_count"] for c in body["cells"]}
    assert body["n_cells"] == len(cells) == svc.panel.n_cells and set(cells) == set(svc.panel.study_area.h3_ids)
    assert body["expected_total"] == pytest.approx(sum(cells.values()))
    for h in get(svc, "/v1/hotspots", city=CITY, k=15).json()["hotspots"]:
        assert cells[h["h3"]] == h["expected_count"]
    assert max(cells.values()) == get(svc, "/v1/hotspots", city=CITY, k=1).json()["hotspots"][0]["expected_count"]


def test_bad_input_gives_404_422_503_never_500(svc):
    unknown = get(svc, "/v1/hotspots", city="atlantis")
    assert unknown.status_code == 404 and "atlantis" in unknown.json()["detail"] and CITY in unknown.json()["detail"]
    assert get(svc, "/v1/models/atlantis", Role.analyst).status_code == 404

    n = svc.panel.n_cells
    assert "neither 'next' nor an ISO 8601" in problem(get(svc, "/v1/hotspots", city=CITY, shift="tomorrow"), "shift")
    assert "not the start of a shift" in problem(get(svc, "/v1/hotspots", city=CITY, shift="2020-02-10T15:00:00-05:00"), "shift")
    assert "outside the shifts" in problem(get(svc, "/v1/forecast", city=CITY, shift="2010-01-01T06:00:00-05:00"), "shift")
    assert "outside the shifts" in problem(get(svc, "/v1/forecast", city=CITY, shift="2020-03-02T06:00:00-05:00"), "shift")
    assert problem(get(svc, "/v1/hotspots", city=CITY, shift="9999-99-99"), "shift")
    assert f"between 1 and {n}" in problem(get(svc, "/v1/hotspots", city=CITY, k=n + 1), "k")
    for bad_k in ("0", "-3", "abc", "2.5"):
        problem(get(svc, "/v1/hotspots", city=CITY, k=bad_k), "k")
    for bad_coverage in ("0", "1.5", "-0.1", "nan", "inf", "lots"):
        problem(get(svc, "/v1/hotspots.geojson", city=CITY, coverage=bad_coverage), "coverage")
    assert "mutually exclusive" in problem(get(svc, "/v1/hotspots", city=CITY, k=5, coverage=0.1), "coverage")
    assert "unknown category" in problem(get(svc, "/v1/hotspots", city=CITY, category="burglary"), "category")
    assert "no model for 'robbery'" in problem(get(svc, "/v1/forecast", city=CITY, category="robbery"), "category")
    assert get(svc, "/v1/hotspots", city=CITY, category="all", k=2).status_code == 200
    problem(get(svc, "/v1/hotspots", city=CITY, top=5), "top")  # unknown parameters are not ignored
    problem(get(svc, "/v1/hotspots"), "city")
    problem(get(svc, "/v1/audit", Role.auditor, limit=0), "limit")

    for path in ("/v1/hotspots", "/v1/hotspots.geojson", "/v1/forecast"):
        no_model = get(svc, path, city=BARE)
        assert no_model.status_code == 503 and f"hotspots backtest {BARE}" in no_model.json()["detail"]


def test_audit_log_records_forecasts_and_is_append_only(svc):
    def entries(role=Role.auditor, **params):
        return get(svc, "/v1/audit", role, **params).json()["entries"]

    before = entries(limit=1000)
    response = get(svc, "/v1/hotspots", city=CITY, k=4)
    geo = get(svc, "/v1/hotspots.geojson", city=CITY, coverage=0.05)
    full = get(svc, "/v1/forecast", city=CITY)
    assert get(svc, "/v1/hotspots", city="atlantis").status_code == 404  # no forecast, no entry
    get(svc, "/v1/cities")
    latest = entries(limit=3)
    everything = entries(limit=1000)
    new = everything[:len(everything) - len(before)]
    assert everything[len(new):] == before
    # the three forecasts, between the two audit reads before them and after them (a read is audited after it
    # is made, so it is not in its own page); the 404 and /v1/cities leave no entry
    assert [e["endpoint"] for e in new] == ["/v1/audit", "/v1/forecast", "/v1/hotspots.geojson", "/v1/hotspots",
                                            "/v1/audit"]
    auditor_id = svc.keys[Role.auditor].split("_")[1]
    assert [(e["key_id"], e["role"], e["params"], e["city"], e["model_version"], e["response_bytes"])
            for e in (new[0], new[4])] == [
        (auditor_id, "auditor", {"limit": 3, "before_id": None, "rows": 3}, None, None, 0),
        (auditor_id, "auditor", {"limit": 1000, "before_id": None, "rows": len(before)}, None, None, 0)]
    assert new[1:4] == latest
    assert [e["endpoint"] for e in latest] == ["/v1/forecast", "/v1/hotspots.geojson", "/v1/hotspots"]
    assert latest[0]["id"] > latest[1]["id"] > latest[2]["id"]
    planner_id = svc.keys[Role.planner].split("_")[1]
    for entry, resp in zip(latest, (full, geo, response)):
        assert entry["key_id"] == planner_id and entry["role"] == "planner" and entry["city"] == CITY
        assert entry["model_version"] == svc.version and entry["response_bytes"] == len(resp.content)
        assert entry["params"]["shift"] == "next" and entry["params"]["shift_id"] == svc.panel.end_shift
        assert entry["params"]["shift_start"] == "2020-03-01T06:00:00-05:00"
        assert datetime.fromisoformat(entry["at"]).tzinfo is not None
    assert latest[2]["params"]["k"] == 4 and latest[1]["params"]["coverage"] == 0.05
    assert svc.keys[Role.planner] not in str(entries(limit=1000))
    page = get(svc, "/v1/audit", Role.admin, limit=2, before_id=latest[0]["id"]).json()
    assert [e["id"] for e in page["entries"]] == [latest[1]["id"], latest[2]["id"]]
    for role in (Role.planner, Role.analyst):
        assert get(svc, "/v1/audit", role).status_code == 403
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw:
        for statement in ("update audit_log set role = 'admin'", "delete from audit_log"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                raw.execute(statement)


def test_cache_hit_returns_the_same_body(svc):
    shift = "2020-02-20T22:00:00-05:00"
    first = get(svc, "/v1/hotspots", city=CITY, k=7, shift=shift)
    second = get(svc, "/v1/hotspots", city=CITY, k=7, shift=shift)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.content == second.content
    other_k = get(svc, "/v1/hotspots", city=CITY, k=3, shift=shift)  # same forecast, another selection
    assert other_k.headers["x-cache"] == "hit" and other_k.json()["hotspots"] == first.json()["hotspots"][:3]
    assert first.headers["cache-control"] == "private, no-store"


def test_models_lists_versions_with_promotion_tags(svc):
    body = get(svc, f"/v1/models/{CITY}", Role.analyst).json()
    assert body["registered"] and body["champion_version"] == body["loaded_version"]
    champion = [v for v in body["versions"] if v["is_champion"]]
    assert len(champion) == 1 and champion[0]["aliases"] == ["champion"]
    assert champion[0]["promotion"]["decision"] == "promoted" and "beats naive" in champion[0]["promotion"]["reason"]
    assert champion[0]["promotion"]["detail"]["promote"] is True and champion[0]["tags"]["promotion_decision"] == "promoted"
    bare = get(svc, f"/v1/models/{BARE}", Role.analyst).json()
    assert bare["registered"] is False and bare["versions"] == [] and f"hotspots backtest {BARE}" in bare["hint"]


def test_local_fallback_when_the_registry_is_unreachable(svc):
    offline = svc.settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{closed_port()}"})
    app = create_app(offline.model_copy(update=dict(model_refresh_seconds=3600)))
    with TestClient(app) as client:
        ready = client.get("/readyz").json()
        assert ready["ready"] and ready["registry_reachable"] is False and ready["registry_error"]
        city = {c["city"]: c for c in ready["cities"]}[CITY]
        assert city["model_source"] == "local_fallback" and city["model_version"] == svc.version
        served = client.get("/v1/hotspots", params={"city": CITY, "k": 5}, headers={"X-API-Key": svc.keys[Role.planner]})
        assert served.status_code == 200 and served.json()["model"]["source"] == "local_fallback"
        assert served.json()["hotspots"] == get(svc, "/v1/hotspots", city=CITY, k=5).json()["hotspots"]
        models = client.get(f"/v1/models/{CITY}", headers={"X-API-Key": svc.keys[Role.analyst]})
        assert models.status_code == 503 and "unreachable" in models.json()["detail"]


def test_new_champion_is_picked_up_after_refresh(svc):
    """Last: it moves the alias (and moves it back)."""
    store = svc.app.state.models
    trained = {"resolution": 9, "shift_starts": "06:00,14:00,22:00"}  # as `hotspots backtest` logs them
    v2 = register(svc.settings, quick_lgbm(seed=1).fit(svc.panel), svc.panel, promote=False, params=trained)
    set_champion(svc.settings, v2)
    try:
        assert get(svc, "/v1/hotspots", city=CITY, k=3).json()["model"]["version"] == svc.version  # within the TTL
        store.refresh()
        ready = {c["city"]: c for c in svc.client.get("/readyz").json()["cities"]}[CITY]
        assert ready["model_version"] == v2 and ready["model_source"] == "registry"
        response = get(svc, "/v1/hotspots", city=CITY, k=3)
        # computed with v2 by the refresh, before the swap (the shift was asked just before): a cache hit
        assert response.json()["model"]["version"] == v2 and response.headers["x-cache"] == "hit"
        computed = svc.app.state.forecasts.cache
        assert any(key[0] == CITY and key[3] == v2 for key in computed._data)
        local = svc.settings.data_dir / "serving" / CITY
        # the new champion is the last-good copy; the previous one stays (swapping back needs no download)
        assert (local / f"v{v2}" / "MLmodel").is_file() and (local / f"v{svc.version}").exists()
        assert len([p for p in local.iterdir() if p.is_dir()]) <= KEEP_COPIES
        assert get(svc, "/v1/audit", Role.auditor, limit=1).json()["entries"][0]["model_version"] == v2
        # a champion trained on another grid is refused, with what to do
        v3 = register(svc.settings, svc.model, svc.panel, promote=False, params={**trained, "resolution": 8})
        set_champion(svc.settings, v3)
        store.refresh()
        ready = {c["city"]: c for c in svc.client.get("/readyz").json()["cities"]}[CITY]
        assert ready["status"] == "model_mismatch" and not ready["ready"] and ready["model_version"] == v3
        refused = get(svc, "/v1/hotspots", city=CITY)
        assert refused.status_code == 503 and "HOTSPOTS_H3_RESOLUTION=8" in refused.json()["detail"]
    finally:
        set_champion(svc.settings, svc.version)
        store.refresh()
    assert store.get(CITY).model.version == svc.version


def test_a_slow_cold_forecast_does_not_stall_other_requests(svc, monkeypatch):
    """The forecast work runs in the thread pool: while one request computes (a blocking call here, as the
    CPU-bound feature build and predict are), the event loop answers /healthz at once."""
    import threading
    import time

    service = svc.app.state.forecasts
    original = service._compute

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(service, "_compute", slow)
    shift, answer = "2020-02-17T14:00:00-05:00", {}
    worker = threading.Thread(target=lambda: answer.update(r=get(svc, "/v1/hotspots.png", city=CITY, shift=shift, k=3)))
    worker.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert svc.client.get("/healthz").status_code == 200
    elapsed = time.perf_counter() - started
    worker.join()
    assert worker.is_alive() is False and answer["r"].status_code == 200 and answer["r"].headers["x-cache"] == "miss"
    assert elapsed < 0.5, f"/healthz took {elapsed:.2f} s while a forecast was computed"
