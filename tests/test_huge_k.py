"""The bounds of a hotspots request per format, and what a huge one costs the others.

JSON and GeoJSON return up to every study-area cell but explain (top features) only the first EXPLAINED_CELLS;
the PNG numbers at most PNG_MAX_K cells. Explanations run on the model's own explanation booster and lock, so a
city-wide request does not hold up a cold forecast of another shift on the same model.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import toronto_box_panel
from service_support import CITY, PANEL_END, asgi_service, get, problem

from features.paths import DataPaths
from forecasting.lgbm import _explainer
from serving.checks import EXPLAINED_CELLS, PNG_MAX_K


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    """The test champion served on the whole of Toronto (about 6,000 cells, six months): city-sized requests."""

    def whole_city(city):
        _, panel = toronto_box_panel(toronto_incidents, (43.57, 43.86), (-79.65, -79.10),
                                     datetime(2019, 9, 1, tzinfo=UTC), PANEL_END)
        shutil.rmtree(DataPaths(city.settings).panel(CITY))
        panel.save(DataPaths(city.settings).panel(CITY))
        city.panel = panel

    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("huge_k"), before_start=whole_city) as service:
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


PAIRS = 7  # interleaved (alone, together) measurements of a cold forecast


def _slowdowns(svc, requests_per_cold: int | None) -> tuple[float, list, list]:
    """Median ratio of cold forecasts of fresh shifts timed with city-wide requests (every cell but a few, a body
    made anew each time, on an already computed forecast of the same model) running beside them to the same
    forecasts timed alone; ``requests_per_cold`` city-wide requests started with each cold forecast (one planner
    asking for the whole city), or None: back to back until it is done (a flood)."""
    n = svc.panel.n_cells
    warm_shift = "2020-02-26T14:00:00-05:00"
    # the forecast the city-wide requests select from is computed and its ranking serialised once per format
    # (the first city-wide request of a forecast does it); later city-wide requests are slices of it
    for path in ("/v1/hotspots", "/v1/hotspots.geojson"):
        assert get(svc, path, city=CITY, k=n, shift=warm_shift).status_code == 200
    # same shift of day, a fresh day each time (1 + PAIRS x 2 of them, each test its own): every forecast is cold
    days = iter(range(1, 16) if requests_per_cold is None else range(16, 31))

    def cold() -> float:
        shift = f"2020-01-{next(days):02d}T14:00:00-05:00"
        started = time.perf_counter()
        response = get(svc, "/v1/hotspots", city=CITY, k=10, shift=shift)
        assert response.status_code == 200 and response.headers["x-cache"] == "miss"
        return time.perf_counter() - started

    cold()  # the first cold forecast of the process pays one-off costs
    stop, huge = threading.Event(), []

    def city_wide() -> None:
        i = 0
        while not stop.is_set() and (requests_per_cold is None or i < requests_per_cold):
            path = ("/v1/hotspots", "/v1/hotspots.geojson")[i % 2]
            started = time.perf_counter()
            response = get(svc, path, city=CITY, k=n - 1 - len(huge) // 2, shift=warm_shift)  # a new body each time
            huge.append((response.status_code, time.perf_counter() - started))
            i += 1

    alone, together = [], []
    for _ in range(PAIRS):  # interleaved, so a change in the shared machine's load hits both alike
        alone.append(cold())
        stop.clear()
        thread = threading.Thread(target=city_wide, daemon=True)
        thread.start()
        together.append(cold())
        stop.set()
        thread.join(60)
    assert huge and all(status == 200 for status, _ in huge), huge
    # each pair is seconds apart, so its ratio sees one load; the median of the pairs ignores the odd pair that a
    # burst of another process's work lands on
    ratio = statistics.median(t / a for t, a in zip(together, alone))
    print(f"{requests_per_cold or 'flood of'} city-wide requests: cold forecast alone {alone}, with them {together}; "
          f"ratio {ratio:.2f}; city-wide requests {len(huge)}, median {statistics.median(s for _, s in huge):.3f} s")
    return ratio, alone, together


def test_a_huge_k_request_does_not_slow_a_concurrent_cold_forecast(svc):
    """The issue's case: a planner asks for every cell (as JSON and as GeoJSON) while another user's forecast is
    cold. A city-wide request is a slice of its forecast's ranking (body and audited ids, no per-cell work) made in
    one trip to the thread pool, so it costs that forecast at most the issue's 1.5x, or at most 50 ms.

    Why the 50 ms: the pair of city-wide requests adds 25-40 ms to the cold forecast (their share of the GIL), and
    that stayed the same when a cold forecast here became 1.7x faster (0.09 -> 0.055 s, with the feature rows
    built from the panel's sparse events, 2026-11-30); the ratio then rose to 1.45-1.7 although nothing got slower.
    The issue's case was 0.7 s -> 4 s. 50 ms is the service's own p99 target for a cached request."""
    ratio, alone, together = _slowdowns(svc, requests_per_cold=2)
    added = statistics.median(t - a for t, a in zip(together, alone))
    assert ratio <= 1.5 or added <= 0.050, \
        f"alone {alone}, with one city-wide JSON and GeoJSON request beside {together}: {added * 1000:.0f} ms added"


def test_a_flood_of_huge_k_requests_slows_a_cold_forecast_by_a_bounded_factor(svc):
    """City-wide requests back to back (about 60 a second, each ~11 ms of CPU) for as long as each cold forecast
    runs: they share the one GIL with it, so it slows (about 2.1x on the quiet machine, up to 3x inside the suite
    with the other worker busy, since a cold forecast takes only 0.1 s now). Per-cell work per request made this
    5x and more (the issue measured 0.7 s -> 4 s), which the bound catches."""
    ratio, alone, together = _slowdowns(svc, requests_per_cold=None)
    assert ratio <= 4.5, f"alone {alone}, with city-wide requests back to back {together}"
