"""The planner's map page, its static files, the shift and study-area endpoints it reads, and the printable
briefing PNG, through FastAPI's TestClient on the small real Toronto panel with a registered champion."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime

import h3
import numpy as np
import pytest
import shapely
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from service_support import BARE, CITY, asgi_service, colour_stats, get, problem

from features.settings import Settings
from serving.app import create_app
from serving.briefing import feature_label, render_briefing, shift_window
from serving.dependencies import get_now
from serving.geometry import hexagon_ring
from serving.keys import Role
from serving.schemas import HotspotsResponse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OSM = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("map")) as service:
        yield service






def page_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/static/[^"]+)"', html)


def page_config(html: str) -> dict:
    return json.loads(re.search(r'<script id="map-config" type="application/json">(.*?)</script>', html, re.S).group(1))


# --- the page -----------------------------------------------------------------------------------------

def test_map_page_is_self_contained_and_needs_no_key(svc):
    response = svc.client.get("/map")  # no key: the page asks for one itself
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assets = page_assets(html)
    assert any(a.startswith("/static/map.js?v=") for a in assets) and any(a.startswith("/static/map.css?v=") for a in assets)
    for element in ('id="city"', 'id="shift"', 'id="category"', 'id="k"', 'id="print"', 'id="map"', 'id="ranked"',
                    'id="key-form"', 'id="after-data"'):
        assert element in html, element
    config = page_config(html)
    assert config == {"api": "/v1", "key_header": "X-API-Key", "default_k": 20, "png_max_k": 200, "shift_window": 9,
                      "tile_url": None, "tile_attribution": None}
    # no CDN, no external anything: not in the page, its script or its styles, and the browser is told so
    bodies = {"/map": html}
    for asset in assets:
        served = svc.client.get(asset)
        assert served.status_code == 200, asset
        kind = "javascript" if ".js" in asset else "css"
        assert kind in served.headers["content-type"], (asset, served.headers["content-type"])
        bodies[asset] = served.text
    for name, text in bodies.items():
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
    assert "@media print" in bodies[next(a for a in assets if ".css" in a)]
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert re.search(r"img-src 'self' data: blob:;", csp)  # no tile server allowed when none is configured
    assert svc.client.get("/static/map.js").text == bodies[next(a for a in assets if ".js" in a)]
    assert svc.client.get("/static/nothing-here.js").status_code == 404


def test_tile_url_setting_reaches_the_page_and_its_policy(svc, monkeypatch):
    monkeypatch.setenv("HOTSPOTS_MAP_TILE_URL", OSM)
    assert Settings().map_tile_url == OSM
    with pytest.raises(ValidationError, match="map_tile_url"):
        Settings(map_tile_url="tile.openstreetmap.org/{z}/{x}/{y}.png")
    app = create_app(svc.settings.model_copy(update=dict(model_refresh_seconds=3600, map_tile_url=OSM)))
    response = TestClient(app).get("/map")  # the page alone: no lifespan, no model loading needed
    config = page_config(response.text)
    assert config["tile_url"] == OSM and config["tile_attribution"] == "Base map © OpenStreetMap contributors"
    assert "img-src 'self' data: blob: https://tile.openstreetmap.org;" in response.headers["content-security-policy"]
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    subdomains = create_app(svc.settings.model_copy(update=dict(map_tile_url="https://{s}.tile.example.org/{z}/{x}/{y}.png")))
    policy = TestClient(subdomains).get("/map").headers["content-security-policy"]
    assert "https://*.tile.example.org;" in policy
    js = TestClient(app).get("/static/map.js").text
    assert "tile_url" in js and '"image"' in js  # slippy tiles drawn as SVG <image> elements


# --- what the page reads: shifts and the study area ---------------------------------------------------

def test_city_shifts_around_next_after_the_data(svc):
    response = get(svc, f"/v1/cities/{CITY}/shifts")
    assert response.status_code == 200, response.text
    body = response.json()
    panel = svc.panel
    # the panel ends in 2020: 'next' is the first shift after the data, and nothing later can be forecast
    assert body["centre_shift_id"] == panel.end_shift and body["after_data"] is True and body["around"] == "next"
    shifts = body["shifts"]
    assert [s["offset"] for s in shifts] == list(range(-6, 1))
    assert [s["shift_id"] for s in shifts] == list(range(panel.end_shift - 6, panel.end_shift + 1))
    assert shifts[-1]["shift"] == "next" and shifts[-1]["start"] == "2020-03-01T06:00:00-05:00"
    assert body["last_start"] == shifts[-1]["start"] and body["timezone"] == "America/Toronto"
    assert [s["label"] for s in shifts[-3:]] == ["14:00", "22:00", "06:00"]
    assert all(s["hours"] == 8 for s in shifts)
    assert all(a["end"] == b["start"] for a, b in zip(shifts, shifts[1:]))
    # every value offered is accepted by the forecast endpoints and means that shift
    for option in (shifts[0], shifts[-2]):
        forecast = get(svc, "/v1/hotspots", city=CITY, k=2, shift=option["shift"]).json()
        assert forecast["shift"]["shift_id"] == option["shift_id"] and forecast["shift"]["start"] == option["start"]


def test_city_shifts_follow_the_clock_and_stop_at_the_panel(svc):
    svc.app.dependency_overrides[get_now] = lambda: datetime(2020, 2, 10, 17, 30, tzinfo=UTC)  # 12:30 local
    try:
        body = get(svc, f"/v1/cities/{CITY}/shifts", n=2).json()
    finally:
        svc.app.dependency_overrides.clear()
    assert body["after_data"] is False
    assert [s["offset"] for s in body["shifts"]] == [-2, -1, 0, 1, 2]
    centre = body["shifts"][2]
    assert centre["shift"] == "next" and centre["start"] == "2020-02-10T14:00:00-05:00"
    assert body["shifts"][3]["shift"] == "2020-02-10T22:00:00-05:00"
    # around a given shift near the panel's start: nothing before the first forecastable shift
    early = get(svc, f"/v1/cities/{CITY}/shifts", around=body["first_start"], n=3).json()
    assert [s["offset"] for s in early["shifts"]] == [0, 1, 2, 3] and early["shifts"][0]["start"] == body["first_start"]
    assert early["shifts"][0]["shift"] == body["first_start"]


def test_city_shifts_and_area_reject_bad_input(svc):
    assert "neither 'next' nor an ISO 8601" in problem(get(svc, f"/v1/cities/{CITY}/shifts", around="soon"), "around")
    assert "not the start of a shift" in problem(get(svc, f"/v1/cities/{CITY}/shifts", around="2020-02-10T15:00"), "around")
    problem(get(svc, f"/v1/cities/{CITY}/shifts", n=43), "n")
    problem(get(svc, f"/v1/cities/{CITY}/shifts", n=-1), "n")
    problem(get(svc, f"/v1/cities/{CITY}/shifts", k=3), "k")  # unknown parameters are not ignored
    for path in ("/v1/cities/atlantis/shifts", "/v1/cities/atlantis/area"):
        missing = get(svc, path)
        assert missing.status_code == 404 and "atlantis" in missing.json()["detail"]
        assert get(svc, path.replace("atlantis", CITY), role=None).status_code == 401
    # a city without a model still has shifts and an area (the page shows the 503 when it asks for hotspots)
    assert get(svc, f"/v1/cities/{BARE}/shifts").status_code == 200
    assert get(svc, f"/v1/cities/{BARE}/area").status_code == 200


def test_city_area_is_the_union_of_the_study_area_cells(svc):
    response = get(svc, f"/v1/cities/{CITY}/area")
    assert response.status_code == 200
    body = response.json()
    area = svc.panel.study_area
    assert body["n_cells"] == len(area) and body["h3_resolution"] == 9
    assert body["area_km2"] == pytest.approx(area.areas_km2.sum())
    outline = shapely.MultiPolygon([(poly[0], poly[1:]) for poly in body["outline"]["coordinates"]])
    cells = shapely.union_all([shapely.Polygon(hexagon_ring(c)) for c in area.h3_ids])
    assert outline.is_valid and outline.symmetric_difference(cells).area < 1e-4 * cells.area  # up to rounding
    west, south, east, north = body["bbox"]
    assert (west, south, east, north) == pytest.approx(outline.bounds, abs=1e-6)
    lat, lon = area.centroids
    assert np.all((west < lon) & (lon < east) & (south < lat) & (lat < north))
    assert get(svc, f"/v1/cities/{CITY}/area").json() == body  # cached per panel, same answer


# --- the briefing PNG ---------------------------------------------------------------------------------

def decode(content: bytes) -> np.ndarray:
    assert content[:8] == PNG_MAGIC
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_briefing_png_is_a_real_printable_map(svc):
    response = get(svc, "/v1/hotspots.png", city=CITY, k=12)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-model-version"] == svc.version and response.headers["cache-control"] == "private, no-store"
    pixels = decode(response.content)
    height, width, _ = pixels.shape
    assert 1700 <= width <= 1800 and 1200 <= height <= 1280  # A4 landscape at 150 dpi
    distinct, inked = colour_stats(pixels)
    assert distinct > 200 and inked > 0.08, (distinct, inked)
    # the top cell is drawn in the darkest colour of the scale (YlOrRd at 1.0 = #800026) ...
    darkest = np.all(np.abs(pixels.astype(int) - (128, 0, 38)) <= 6, axis=2)
    assert darkest.sum() > 200
    # ... and the rest of the study area in light grey (#e4e6ea)
    assert np.all(pixels == (228, 230, 234), axis=2).sum() > 20_000
    # the same request for coverage and another (night) shift works too and draws a different map
    other = get(svc, "/v1/hotspots.png", city=CITY, coverage=0.1, shift="2020-02-29T22:00:00-05:00")
    assert other.status_code == 200 and decode(other.content).shape == pixels.shape
    assert other.content != response.content


def test_briefing_png_is_audited(svc):
    response = get(svc, "/v1/hotspots.png", city=CITY, k=5, shift="2020-02-28T14:00:00-05:00")
    assert response.status_code == 200
    entry = get(svc, "/v1/audit", Role.auditor, limit=1).json()["entries"][0]
    again = get(svc, "/v1/hotspots.png", city=CITY, k=5, shift="2020-02-28T14:00:00-05:00")
    assert again.content == response.content  # drawn once, served again: still one audit entry per request
    # the second drawing is the next forecast entry; between them, the auditor's read of the first
    between, second = reversed(get(svc, "/v1/audit", Role.auditor, limit=2).json()["entries"])
    assert (second["id"], second["endpoint"], second["response_bytes"]) == (entry["id"] + 2, "/v1/hotspots.png",
                                                                          len(response.content))
    assert (between["id"], between["endpoint"], between["role"], between["params"]) == (
        entry["id"] + 1, "/v1/audit", "auditor", {"limit": 1, "before_id": None, "rows": 1})
    assert entry["endpoint"] == "/v1/hotspots.png" and entry["role"] == "planner" and entry["city"] == CITY
    assert entry["model_version"] == svc.version and entry["response_bytes"] == len(response.content)
    assert entry["params"]["format"] == "png" and entry["params"]["k"] == 5
    assert entry["params"]["shift_start"] == "2020-02-28T14:00:00-05:00"
    assert entry["key_id"] == svc.keys[Role.planner].split("_")[1]


def test_briefing_png_errors_are_json_and_not_audited(svc):
    assert get(svc, "/v1/hotspots", city=CITY, k=1).status_code == 200  # an audited request, whatever ran before
    before = get(svc, "/v1/audit", Role.auditor, limit=1).json()["entries"][0]["id"]
    missing = get(svc, "/v1/hotspots.png", role=None, city=CITY)
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    wrong = svc.client.get("/v1/hotspots.png", params={"city": CITY}, headers={"X-API-Key": "hsk_0000_nope"})
    assert wrong.status_code == 401
    n = svc.panel.n_cells
    for bad_k in ("0", "-1", "abc"):
        problem(get(svc, "/v1/hotspots.png", city=CITY, k=bad_k), "k")
    assert f"between 1 and {n}" in problem(get(svc, "/v1/hotspots.png", city=CITY, k=n + 1), "k")
    problem(get(svc, "/v1/hotspots.png", city=CITY, shift="yesterday"), "shift")
    assert get(svc, "/v1/hotspots.png", city="atlantis").status_code == 404
    unready = get(svc, "/v1/hotspots.png", city=BARE)
    assert unready.status_code == 503 and f"hotspots backtest {BARE}" in unready.json()["detail"]
    # no forecast entry: only the auditor's read and the two refused keys (401s are audited, with the key id
    # claimed and never the secret); the 422s, the 404 and the 503 leave nothing
    after = get(svc, "/v1/audit", Role.auditor, limit=3).json()["entries"]
    assert [e["id"] for e in after] == [before + 3, before + 2, before + 1]
    assert [(e["endpoint"], e["role"], e["key_id"]) for e in after] == [
        ("/v1/hotspots.png", "refused", "0000"), ("/v1/hotspots.png", "refused", "none"),
        ("/v1/audit", "auditor", svc.keys[Role.auditor].split("_")[1])]
    assert [e["params"]["status"] for e in after[:2]] == [401, 401] and "nope" not in str(after)


def test_openapi_documents_the_new_endpoints(svc):
    paths = svc.client.get("/openapi.json").json()["paths"]
    png = paths["/v1/hotspots.png"]["get"]
    assert set(png["responses"]["200"]["content"]) == {"image/png"}
    assert {"401", "404", "422", "503"} <= set(png["responses"])
    assert {"city", "shift", "category", "k", "coverage"} <= {p["name"] for p in png["parameters"]}
    assert {"/v1/cities/{city}/shifts", "/v1/cities/{city}/area", "/map"} <= set(paths)
    assert "text/html" in paths["/map"]["get"]["responses"]["200"]["content"]


def test_briefing_renderer_long_lists_and_labels(svc):
    """More cells than the table holds, a night shift across midnight, and the words used for features."""
    body = HotspotsResponse.model_validate(get(svc, "/v1/hotspots", city=CITY, k=40, shift="2020-02-29T22:00").json())
    pixels = decode(render_briefing(svc.panel.study_area.cells, body, dpi=60))
    assert abs(pixels.shape[1] - 11.69 * 60) <= 1 and abs(pixels.shape[0] - 8.27 * 60) <= 1
    assert colour_stats(pixels)[0] > 50
    night = "Sat 29 Feb 2020, 22:00 – Sun 1 Mar 06:00 EST"
    assert shift_window(body.shift.start, body.shift.end, body.shift.timezone) == night
    summer = datetime(2019, 7, 1, 14, tzinfo=UTC)  # read back from JSON: a fixed offset, still named
    assert shift_window(summer, summer.replace(hour=22), "America/Toronto") == "Mon 1 Jul 2019, 10:00 – 18:00 EDT"
    assert feature_label("count_prev_shift") == "previous shift" and feature_label("count_28d") == "last 28 days"
    assert feature_label("same_weekday_shift_8w") == "same weekday+shift 8 wk"
    assert feature_label("near_repeat_ring1_7d") == "near-repeat nearby 7d"
    assert feature_label("cat_break_and_enter_28d") == "break and enter 28 days"
    assert feature_label("cell_lat") == "location" and feature_label("shift_of_day") == "shift of day"
    assert h3.get_resolution(body.hotspots[0].h3) == 9


def test_briefing_zooms_to_the_hotspots_of_a_large_area(svc):
    """A city-sized study area: the map zooms to the hotspots (hexes big enough for their rank numbers) and an
    inset shows the whole area with the zoomed window outlined."""
    body = HotspotsResponse.model_validate(get(svc, "/v1/hotspots", city=CITY, k=8).json())
    core = h3.str_to_int(body.hotspots[0].h3)
    city = np.union1d(svc.panel.study_area.cells,
                      np.array([h3.str_to_int(c) for c in h3.grid_disk(h3.int_to_str(core), 40)], dtype=np.uint64))
    assert city.size > 4000
    pixels = decode(render_briefing(city, body, dpi=100))
    window = np.all(np.abs(pixels.astype(int) - (163, 38, 42)) <= 10, axis=2)  # the inset's red window outline
    assert window[: pixels.shape[0] // 2].sum() > 40
    full = decode(render_briefing(svc.panel.study_area.cells, body, dpi=100))
    red = np.all(np.abs(full.astype(int) - (163, 38, 42)) <= 10, axis=2)
    assert red[: full.shape[0] // 2, : full.shape[1] // 2].sum() > 0  # the after-data flag, in red
    hot = lambda img: np.all(np.abs(img.astype(int) - (128, 0, 38)) <= 6, axis=2).sum()  # noqa: E731
    assert hot(pixels) > 1.3 * hot(full) > 0  # zoomed in: the top cell is drawn larger than on the whole-area map
