"""The bounds of a hotspots request per format, and what a huge one costs the others.

JSON and GeoJSON return up to every study-area cell but explain (top features) only the first EXPLAINED_CELLS;
the PNG numbers at most PNG_MAX_K cells. Explanations run on the model's own explanation booster and lock, so a
city-wide request does not hold up a cold forecast of another shift on the same model, and a bulk body waits
while cold forecasts are under way (serving.priority).
"""

from __future__ import annotations

import http.client
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import toronto_box_panel
from live_server import hotspots_serve
from service_support import CITY, PANEL_END, asgi_service, free_port, get, isolated_mlflow_env, problem, served_city

from features.paths import DataPaths
from forecasting.lgbm import _explainer
from serving.checks import EXPLAINED_CELLS, PNG_MAX_K
from serving.keys import Role, create_key

_WHOLE_CITY = {}


def _use_whole_city(incidents, city) -> None:
    """Serve the whole of Toronto (about 6,000 cells, six months) from ``city``'s data folder: city-sized requests.
    The panel is built once per process."""
    if "panel" not in _WHOLE_CITY:
        _WHOLE_CITY["panel"] = toronto_box_panel(incidents, (43.57, 43.86), (-79.65, -79.10),
                                                 datetime(2019, 9, 1, tzinfo=UTC), PANEL_END)[1]
    panel = _WHOLE_CITY["panel"]
    shutil.rmtree(DataPaths(city.settings).panel(CITY))
    panel.save(DataPaths(city.settings).panel(CITY))
    city.panel = panel


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    """The test champion served in process on the whole of Toronto."""
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("huge_k"),
                      before_start=lambda city: _use_whole_city(toronto_incidents, city)) as service:
        assert service.app.state.models.get(CITY).panel.n_cells == service.panel.n_cells > 5000
        yield service


def test_every_cell_as_json_and_geojson_with_the_first_ones_explained(svc):
    n = svc.panel.n_cells
    shift = "2020-02-27T22:00:00-05:00"
    body = get(svc, "/v1/hotspots", city=CITY, k=n, shift=shift).json()
    assert body["selection"]["n_cells"] == n == len(body["hotspots"]) and body["selection"]["explained_cells"] == EXPLAINED_CELLS
    assert [h["rank"] for h in body["hotspots"]] == list(range(1, n + 1))
    assert all(len(h["top_features"]) == 3 for h in body["hotspots"][:EXPLAINED_CELLS])
    assert all(h["top_features"] == [] for h in body["hotspots"][EXPLAINED_CELLS:])
    small = get(svc, "/v1/hotspots", city=CITY, k=7, shift=shift).json()
    assert small["selection"]["explained_cells"] == 7 and small["hotspots"] == body["hotspots"][:7]
    geo = get(svc, "/v1/hotspots.geojson", city=CITY, coverage=1.0, shift=shift).json()
    assert len(geo["features"]) == n and geo["hotspots"]["selection"]["explained_cells"] == EXPLAINED_CELLS
    assert [f["properties"]["top_features"] for f in geo["features"]] == [h["top_features"] for h in body["hotspots"]]
    # each audit row records the cells handed out, in rank order, as json.dumps writes them (a city-wide one is
    # sliced from the forecast's ranked ids, encoded once)
    near = get(svc, "/v1/hotspots", city=CITY, k=n - 3, shift=shift).json()
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw:
        rows = raw.execute("SELECT flagged FROM audit_log WHERE flagged IS NOT NULL ORDER BY id DESC LIMIT 4").fetchall()
    ranked = [h["h3"] for h in body["hotspots"]]
    assert [row[0] for row in rows] == [json.dumps(ranked[: n - 3]), json.dumps(ranked), json.dumps(ranked[:7]),
                                        json.dumps(ranked)]
    assert [h["h3"] for h in near["hotspots"]] == ranked[: n - 3]


def test_the_png_is_bounded_to_a_printable_number_of_cells(svc):
    shift = "2020-02-27T22:00:00-05:00"
    assert get(svc, "/v1/hotspots.png", city=CITY, k=PNG_MAX_K, shift=shift).headers["content-type"] == "image/png"
    message = problem(get(svc, "/v1/hotspots.png", city=CITY, k=PNG_MAX_K + 1, shift=shift), "k")
    assert f"at most {PNG_MAX_K}" in message and "/v1/hotspots.geojson" in message
    message = problem(get(svc, "/v1/hotspots.png", city=CITY, coverage=0.9, shift=shift), "coverage")
    assert f"at most {PNG_MAX_K}" in message and "smaller coverage" in message
    # documented where clients look: the OpenAPI description of k, and the README
    k = {p["name"]: p for p in svc.client.get("/openapi.json").json()["paths"]["/v1/hotspots"]["get"]["parameters"]}["k"]
    assert f"first {EXPLAINED_CELLS} with top features" in k["description"] and f"up to {PNG_MAX_K}" in k["description"]


def test_explanations_come_from_a_copy_of_the_booster_with_the_same_contributions(svc):
    model = svc.app.state.models.get(CITY).model.forecaster
    explainer, lock = _explainer(model.booster_, model.best_iteration_)
    assert explainer is not model.booster_ and _explainer(model.booster_, model.best_iteration_)[0] is explainer
    X = np.random.default_rng(0).random((5, len(model.columns_)))
    assert np.allclose(explainer.predict(X, num_iteration=model.best_iteration_, pred_contrib=True),
                       model.booster_.predict(X, num_iteration=model.best_iteration_, pred_contrib=True))


WARM_SHIFT = "2020-02-26T14:00:00-05:00"  # the forecast city-wide requests select from
PAIRS = 9  # interleaved (alone, together) measurements of a cold forecast


def test_a_bulk_body_waits_for_the_cold_forecasts_under_way_and_at_most_max_wait(svc, monkeypatch):
    """While a cold forecast is being computed, city-wide JSON/GeoJSON and PNG bodies wait (at most the cold
    forecasts' max_wait) and are then served in full; a request for the first cells does not wait at all."""
    forecasts, n, shift = svc.app.state.forecasts, svc.panel.n_cells, "2020-02-27T06:00:00-05:00"
    monkeypatch.setattr(forecasts.cold, "max_wait", 0.3)
    for path, k in (("/v1/hotspots", n), ("/v1/hotspots.geojson", n), ("/v1/hotspots.png", 5)):
        assert get(svc, path, city=CITY, k=k, shift=shift).status_code == 200  # computed and made once
    metric = 'hotspots_bulk_wait_seconds_count'
    waits_before = _metric(svc, metric)

    def timed(path: str, k: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        response = get(svc, path, city=CITY, k=k, shift=shift)
        return time.perf_counter() - started, response.status_code, len(response.content)

    with forecasts.cold.computing():  # another user's cold forecast, under way for longer than max_wait
        waited = [timed(path, k) for path, k in (("/v1/hotspots", n - 1), ("/v1/hotspots.geojson", n - 1),
                                                 ("/v1/hotspots.png", 5))]
        small = timed("/v1/hotspots", EXPLAINED_CELLS)
    assert all(status == 200 and size > 10_000 and 0.3 <= seconds < 1.0 for seconds, status, size in waited), waited
    assert small[1] == 200 and small[0] < 0.3, small
    assert _metric(svc, metric) == waits_before + 3

    # woken as soon as the cold forecast (here in another thread) is done
    started = threading.Event()

    def cold_forecast_of_a_tenth_of_a_second() -> None:
        with forecasts.cold.computing():
            started.set()
            time.sleep(0.1)

    worker = threading.Thread(target=cold_forecast_of_a_tenth_of_a_second)
    worker.start()
    started.wait()
    seconds, status, _ = timed("/v1/hotspots", n - 2)
    worker.join()
    assert status == 200 and 0.09 <= seconds < 0.25 and forecasts.cold.under_way == 0


def test_a_bulk_request_never_waits_for_its_own_cold_forecast_and_errors_release_their_share(svc, monkeypatch):
    forecasts, n = svc.app.state.forecasts, svc.panel.n_cells
    monkeypatch.setattr(forecasts.cold, "max_wait", 5.0)
    for i, (path, k) in enumerate((("/v1/hotspots", n), ("/v1/hotspots.geojson", n), ("/v1/hotspots.png", 5))):
        started = time.perf_counter()
        response = get(svc, path, city=CITY, k=k, shift=f"2020-02-2{i}T06:00:00-05:00")  # a cold forecast each
        assert response.status_code == 200 and response.headers["x-cache"] == "miss"
        assert time.perf_counter() - started < 2.5 and forecasts.cold.under_way == 0
    started = time.perf_counter()
    assert svc.client.get("/v1/forecast", params=dict(city=CITY, shift="2020-02-23T06:00:00-05:00"),
                          headers={"X-API-Key": svc.keys[Role.planner]}).status_code == 200
    assert time.perf_counter() - started < 2.5 and forecasts.cold.under_way == 0
    # refused after the forecast was computed (a coverage selecting more cells than a PNG shows): released too
    problem(get(svc, "/v1/hotspots.png", city=CITY, coverage=0.9, shift="2020-02-24T06:00:00-05:00"), "coverage")
    assert forecasts.cold.under_way == 0


def _metric(svc, name: str) -> float:
    found = [line.split()[-1] for line in svc.client.get("/metrics").text.splitlines() if line.startswith(name)]
    assert len(found) == 1, found
    return float(found[0])


@pytest.fixture(scope="module")
def live(toronto_incidents, tmp_path_factory):
    """The same whole-city service as a real `hotspots serve` process, with a planner's city-wide client in a process
    of its own (tests/bulk_client.py): what a huge request costs another user's forecast on a deployed server,
    where the megabytes also go through a socket, and the clients are not in the server's process."""
    with isolated_mlflow_env():
        city = served_city(toronto_incidents, tmp_path_factory.mktemp("huge_k_live"))
        _use_whole_city(toronto_incidents, city)
        key = create_key(Role.planner, "city-wide desk", city.settings)
        port = free_port()
        with hotspots_serve(city.settings.data_dir, port, "--no-access-log") as server:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            bulk = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bulk_client.py")), server.base_url,
                                     key, CITY, WARM_SHIFT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert bulk.stdout.readline().strip() == "ready"
                yield SimpleNamespace(server=server, connection=connection, key=key, bulk=bulk, n=city.panel.n_cells)
            finally:
                bulk.kill()
                bulk.wait()


def _live_get(live, path: str, **params) -> http.client.HTTPResponse:
    live.connection.request("GET", f"{path}?{urllib.parse.urlencode(dict(city=CITY, **params))}",
                            headers={"X-API-Key": live.key})
    response = live.connection.getresponse()
    response.read()
    return response


def _slowdowns(live, flood: bool, month: int) -> float:
    """Median ratio of cold forecasts of fresh shifts timed while the bulk client asks for the whole city (every
    cell but a few, a body made anew each time, on an already computed forecast of the same model) to the same
    forecasts timed alone: a JSON and a GeoJSON request started with each cold forecast (one planner asking for
    the whole city), or with ``flood`` requests back to back until it is done."""
    n = live.n
    # the forecast the city-wide requests select from is computed and its ranking serialised once per format
    # (the first city-wide request of a forecast does it); later city-wide requests are slices of it
    for path in ("/v1/hotspots", "/v1/hotspots.geojson"):
        assert _live_get(live, path, k=n, shift=WARM_SHIFT).status == 200
    shifts = iter(f"2020-{month:02d}-{day:02d}T14:00:00-05:00" for day in range(1, 2 + PAIRS * 2))  # all cold

    def cold() -> float:
        started = time.perf_counter()
        response = _live_get(live, "/v1/hotspots", k=10, shift=next(shifts))
        assert response.status == 200 and response.getheader("x-cache") == "miss"
        return time.perf_counter() - started

    cold()  # the first cold forecast of the process pays one-off costs
    alone, together, huge = [], [], []
    for i in range(PAIRS):  # interleaved, so a change in the shared machine's load hits both alike
        alone.append(cold())
        live.bulk.stdin.write(f"{'flood' if flood else 'pair'} {n - 1 - i * 100}\n")
        live.bulk.stdin.flush()
        together.append(cold())
        if flood:
            live.bulk.stdin.write("stop\n")
            live.bulk.stdin.flush()
        huge += [request.split(":") for request in live.bulk.stdout.readline().split()]
    assert huge and all(status == "200" and int(size) > 1_000_000 for status, size, _ in huge), huge
    # each pair is seconds apart, so its ratio sees one load; the median of the pairs ignores the odd pair that a
    # burst of another process's work lands on
    ratio = statistics.median(t / a for t, a in zip(together, alone))
    print(f"{'flood of' if flood else 'a pair of'} city-wide requests: cold forecast alone "
          f"{[round(a * 1000, 1) for a in alone]} ms, with them {[round(t * 1000, 1) for t in together]} ms; "
          f"ratio {ratio:.2f}; {len(huge)} city-wide requests, median {statistics.median(float(s) for *_, s in huge):.3f} s")
    return ratio


def test_a_huge_k_request_does_not_slow_a_concurrent_cold_forecast(live):
    """The issue's case on a real server: a planner asks for every cell (as JSON and as GeoJSON) while another
    user's forecast is cold. A city-wide request is a slice of its forecast's ranking (no per-cell work), and its
    body waits while cold forecasts are under way (serving.priority), so the cold forecast is slowed only by the
    two requests' parsing, key check and lookups: at most the issue's 1.5x.

    Without the wait the ratio was 1.6-1.8 here (2026-12-01): the pair's ~9 ms of server CPU (slicing and writing
    8 MB, hashing the audit rows) shared the GIL with a 25 ms cold forecast. The issue measured 0.7 s -> 4 s."""
    ratio = _slowdowns(live, flood=False, month=1)
    assert ratio <= 1.5, f"a pair of city-wide requests slowed a cold forecast {ratio:.2f}x"


def test_a_flood_of_huge_k_requests_does_not_slow_a_cold_forecast_either(live):
    """City-wide requests back to back for as long as each cold forecast runs: their bodies wait for it, so only
    their parsing, key checks and lookups share the GIL with it. Without the wait this was 2.2-2.7x in process
    (4.5x was allowed), and per-cell work per request made it 5x and more."""
    ratio = _slowdowns(live, flood=True, month=2)  # a month of its own: its forecasts are cold too
    assert ratio <= 1.5, f"a flood of city-wide requests slowed a cold forecast {ratio:.2f}x"
