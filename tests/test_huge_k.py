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
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bulk_client import receive, send
from conftest import toronto_box_panel
from live_server import hotspots_serve
from service_support import (
    CITY,
    PANEL_END,
    asgi_service,
    free_port,
    get,
    isolated_mlflow_env,
    metric_samples,
    metric_value,
    problem,
    served_city,
)

from features.paths import DataPaths
from forecasting.lgbm import _explainer
from serving.checks import EXPLAINED_CELLS, PNG_MAX_K
from serving.keys import Role, create_key


@pytest.fixture(scope="module")
def whole_city(toronto_incidents):
    """The whole of Toronto (about 6,000 cells, six months): city-sized requests."""
    return toronto_box_panel(toronto_incidents, (43.57, 43.86), (-79.65, -79.10), datetime(2019, 9, 1, tzinfo=UTC),
                             PANEL_END)[1]


def _serve_whole_city(city, panel) -> None:
    """``city``'s data folder serves the whole-city panel."""
    shutil.rmtree(DataPaths(city.settings).panel(CITY))
    panel.save(DataPaths(city.settings).panel(CITY))
    city.panel = panel


@pytest.fixture(scope="module")
def svc(toronto_incidents, whole_city, tmp_path_factory):
    """The test champion served in process on the whole of Toronto."""
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("huge_k"),
                      before_start=lambda city: _serve_whole_city(city, whole_city)) as service:
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
    """While another request computes a cold forecast, city-wide JSON/GeoJSON bodies and a PNG still to be drawn
    wait (at most max_wait) and are then served in full; a request for the first cells, and a bulk body already
    made and small (a PNG drawn before), do not wait."""
    forecasts, n, shift = svc.app.state.forecasts, svc.panel.n_cells, "2020-02-27T06:00:00-05:00"
    monkeypatch.setattr(forecasts.cold, "max_wait", 0.3)
    for path, k in (("/v1/hotspots", n), ("/v1/hotspots.geojson", n), ("/v1/hotspots.png", 5)):
        assert get(svc, path, city=CITY, k=k, shift=shift).status_code == 200  # computed and made once
    metric = "hotspots_bulk_wait_seconds_count"
    waits_before = _metric(svc, metric)

    def timed(path: str, k: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        response = get(svc, path, city=CITY, k=k, shift=shift)
        return time.perf_counter() - started, response.status_code, len(response.content)

    with forecasts.cold.request() as other:  # another request's cold forecast, under way for longer than max_wait
        other.missed()
        waited = [timed(path, k) for path, k in (("/v1/hotspots", n - 1), ("/v1/hotspots.geojson", n - 1),
                                                 ("/v1/hotspots", n), ("/v1/hotspots.png", 6))]
        at_once = [timed("/v1/hotspots", EXPLAINED_CELLS), timed("/v1/hotspots.png", 5)]
    assert all(status == 200 and size > 10_000 and 0.3 <= seconds < 1.0 for seconds, status, size in waited), waited
    assert all(status == 200 and seconds < 0.3 for seconds, status, _ in at_once), at_once
    assert _metric(svc, metric) == waits_before + len(waited)

    # woken as soon as the other request's cold forecast (here in another thread) is done, not at max_wait
    monkeypatch.setattr(forecasts.cold, "max_wait", 3.0)
    started = threading.Event()

    def cold_forecast_of_a_tenth_of_a_second() -> None:
        with forecasts.cold.request() as share:
            share.missed()
            started.set()
            time.sleep(0.1)

    worker = threading.Thread(target=cold_forecast_of_a_tenth_of_a_second)
    worker.start()
    started.wait()
    seconds, status, _ = timed("/v1/hotspots", n - 2)
    worker.join()
    assert status == 200 and 0.09 <= seconds < 1.5 and forecasts.cold.under_way == 0


def test_a_bulk_request_never_waits_for_its_own_cold_forecast_and_errors_release_their_share(svc, monkeypatch):
    forecasts, n = svc.app.state.forecasts, svc.panel.n_cells
    monkeypatch.setattr(forecasts.cold, "max_wait", 30.0)  # a request waiting for itself would take that long
    for i, (path, k) in enumerate((("/v1/hotspots", n), ("/v1/hotspots.geojson", n), ("/v1/hotspots.png", 5))):
        started = time.perf_counter()
        response = get(svc, path, city=CITY, k=k, shift=f"2020-02-2{i}T06:00:00-05:00")  # a cold forecast each
        assert response.status_code == 200 and response.headers["x-cache"] == "miss"
        assert time.perf_counter() - started < 15 and forecasts.cold.under_way == 0
    started = time.perf_counter()
    assert svc.client.get("/v1/forecast", params=dict(city=CITY, shift="2020-02-23T06:00:00-05:00"),
                          headers={"X-API-Key": svc.keys[Role.planner]}).status_code == 200
    assert time.perf_counter() - started < 15 and forecasts.cold.under_way == 0
    # refused after the forecast was computed (a coverage selecting more cells than a PNG shows): released too
    problem(get(svc, "/v1/hotspots.png", city=CITY, coverage=0.9, shift="2020-02-24T06:00:00-05:00"), "coverage")
    assert forecasts.cold.under_way == 0


def _metric(svc, name: str) -> float:
    return metric_value(metric_samples(svc.client.get("/metrics").text), name)


@pytest.fixture(scope="module")
def live(toronto_incidents, whole_city, tmp_path_factory):
    """The same whole-city service as a real `hotspots serve` process, with a planner's city-wide client in a process
    of its own (tests/bulk_client.py): what a huge request costs another user's forecast on a deployed server,
    where the megabytes also go through a socket, and the clients are not in the server's process."""
    with isolated_mlflow_env():
        city = served_city(toronto_incidents, tmp_path_factory.mktemp("huge_k_live"))
        _serve_whole_city(city, whole_city)
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
                connection.close()
                bulk.kill()
                bulk.communicate()  # reaps it and closes its pipes


def _live_get(live, path: str, **params) -> http.client.HTTPResponse:
    send(live.connection, live.key, path, city=CITY, **params)
    return receive(live.connection)[0]


def _bulk_waits(live) -> tuple[float, float]:
    """The server's bulk bodies so far: (all, those that waited more than a millisecond for a cold forecast)."""
    samples = metric_samples(urllib.request.urlopen(f"{live.server.base_url}/metrics", timeout=10).read().decode())
    count = metric_value(samples, "hotspots_bulk_wait_seconds_count")
    return count, count - metric_value(samples, "hotspots_bulk_wait_seconds_bucket", le="0.001")


def _slowdowns(live, flood: bool, month: int) -> float:
    """Median ratio of cold forecasts of fresh shifts timed while the bulk client asks for the whole city (every
    cell but a few, a body made anew each time, on an already computed forecast of the same model) to the same
    forecasts timed alone: a JSON and a GeoJSON request started with each cold forecast (one planner asking for
    the whole city), or with ``flood`` requests back to back until it is done. In every other pair the city-wide
    client's first request is sent before the cold forecast's, so it is ahead of it (it does not wait)."""
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

    def command(line: str) -> None:
        live.bulk.stdin.write(f"{line}\n")
        live.bulk.stdin.flush()

    cold()  # the first cold forecast of the process pays one-off costs
    alone, together, huge = [], [], []
    for i in range(PAIRS):  # interleaved, so a change in the shared machine's load hits both alike
        alone.append(cold())
        # the pair's and the flood's k never meet (every body is made anew): pairs n-1, n-101, ...; floods from n-51
        command(f"flood {n - 51 - i * 100}" if flood else f"pair {n - 1 - i * 100}")
        bulk_first = i % 2 == 1
        if bulk_first:
            assert live.bulk.stdout.readline().strip() == "started"
        together.append(cold())
        if flood:
            command("stop")
        if not bulk_first:
            assert live.bulk.stdout.readline().strip() == "started"
        requests = [request.split(":") for request in live.bulk.stdout.readline().split()]
        assert len(requests) == 2 if not flood else len(requests) >= 1, requests
        huge += requests
    assert all(status == "200" and int(size) > 1_000_000 for status, size, _ in huge), huge
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
    body waits while another request computes a cold forecast (serving.priority), so the cold forecast is slowed
    only by the requests' parsing, key check and lookups, and by a city-wide body that arrived first: at most the
    issue's 1.5x.

    Without the wait (BULK_MAX_WAIT 0, 2026-12-01) this test failed at 1.55x and 1.59x (1.6-1.8x before the few
    flagged ids of a small request were encoded on their own); with it, 1.05-1.2x. The issue measured 0.7 s -> 4 s."""
    waits_before = _bulk_waits(live)
    ratio = _slowdowns(live, flood=False, month=1)
    waits = _bulk_waits(live)
    # every city-wide body took its turn, and in the pairs where the cold forecast came first some waited for it
    assert waits[0] >= waits_before[0] + PAIRS * 2 and waits[1] >= waits_before[1] + PAIRS // 3, (waits_before, waits)
    assert ratio <= 1.5, f"a pair of city-wide requests slowed a cold forecast {ratio:.2f}x"


def test_a_flood_of_huge_k_requests_does_not_slow_a_cold_forecast_either(live):
    """City-wide requests back to back for as long as each cold forecast runs: their bodies wait for it, so only
    their parsing, key checks and lookups share the GIL with it. Without the wait (BULK_MAX_WAIT 0, 2026-12-01)
    this test failed at 2.07x and 2.58x; with it, 1.05-1.2x. With per-cell work per request it was 5x and more."""
    waits_before = _bulk_waits(live)
    ratio = _slowdowns(live, flood=True, month=2)  # a month of its own: its forecasts are cold too
    assert _bulk_waits(live)[1] >= waits_before[1] + PAIRS // 2
    assert ratio <= 1.5, f"a flood of city-wide requests slowed a cold forecast {ratio:.2f}x"
