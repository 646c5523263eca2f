"""GET /metrics: request counters and latency by route template, forecast cache hits and misses, cold-forecast
seconds, the champion served per city, patrol rows recorded; per-app registries, and several worker processes
summed through PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from service_support import BARE, CITY, asgi_service, get, metric_samples
from service_support import metric_value as value

from features.settings import Settings
from serving.app import create_app
from serving.keys import Role
from serving.metrics import MetricsMiddleware, ServiceMetrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("metrics")) as service:
        yield service


def scrape(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return metric_samples(response.text)




def test_request_counters_and_latency_by_route_template(svc):
    before = scrape(svc.client)
    for _ in range(2):
        assert get(svc, f"/v1/models/{CITY}", Role.analyst).status_code == 200
    assert get(svc, "/v1/models/atlantis", Role.analyst).status_code == 404
    assert svc.client.get("/v1/cities").status_code == 401
    assert svc.client.get("/healthz").status_code == 200
    assert svc.client.get("/no/such/path/12345").status_code == 404
    after = scrape(svc.client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    template = {"route": "/v1/models/{city}", "method": "GET"}
    assert moved("hotspots_http_requests_total", **template, status="200") == 2
    assert moved("hotspots_http_requests_total", **template, status="404") == 1
    assert moved("hotspots_http_requests_total", route="/v1/cities", method="GET", status="401") == 1
    assert moved("hotspots_http_requests_total", route="/healthz", method="GET", status="200") == 1
    assert moved("hotspots_http_requests_total", route="<unmatched>", method="GET", status="404") == 1
    # the scrape before this one was counted too
    assert value(after, "hotspots_http_requests_total", route="/metrics", method="GET", status="200") >= 1
    # latency histogram: one observation per request, cumulative buckets
    assert moved("hotspots_http_request_duration_seconds_count", **template, status="200") == 2
    assert value(after, "hotspots_http_request_duration_seconds_bucket", **template, status="200", le="+Inf") == \
        value(after, "hotspots_http_request_duration_seconds_count", **template, status="200")
    assert value(after, "hotspots_http_request_duration_seconds_sum", **template, status="200") > 0
    # route labels are templates: no raw path (city names, ids) ever becomes a label value
    routes = {dict(labels).get("route") for (name, labels) in after if name == "hotspots_http_requests_total"}
    assert "/v1/models/toronto-mci" not in routes and "/v1/models/atlantis" not in routes
    assert not any("12345" in r for r in routes)


def test_forecast_cache_hits_misses_and_cold_compute_seconds(svc):
    shift = "2020-02-18T14:00:00-05:00"  # not asked for by any other test in this module
    before = scrape(svc.client)
    first = get(svc, "/v1/hotspots", city=CITY, k=5, shift=shift)
    second = get(svc, "/v1/forecast", city=CITY, shift=shift)  # same forecast, another endpoint
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    after = scrape(svc.client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("hotspots_forecast_cache_lookups_total", city=CITY, result="miss") == 1
    assert moved("hotspots_forecast_cache_lookups_total", city=CITY, result="hit") == 1
    assert moved("hotspots_forecast_compute_seconds_count", city=CITY) == 1  # the hit computed nothing
    assert 0 < moved("hotspots_forecast_compute_seconds_sum", city=CITY) < 60
    assert moved("hotspots_http_requests_total", route="/v1/hotspots", method="GET", status="200") == 1
    assert moved("hotspots_http_requests_total", route="/v1/forecast", method="GET", status="200") == 1


def test_champion_served_per_city_and_patrol_rows(svc):
    samples = scrape(svc.client)
    assert value(samples, "hotspots_champion_model_info", city=CITY, version=svc.version, source="registry",
                 model_name=f"hotspots-{CITY}") == 1
    assert value(samples, "hotspots_city_ready", city=CITY) == 1
    assert ("hotspots_city_ready", frozenset({("city", BARE)})) in samples
    assert value(samples, "hotspots_city_ready", city=BARE) == 0
    assert not any(name == "hotspots_champion_model_info" and ("city", BARE) in labels for name, labels in samples)

    cells = svc.panel.study_area.h3_ids[:3]
    before = value(samples, "hotspots_patrol_rows_recorded_total", city=CITY)
    response = svc.client.post("/v1/patrols", headers={"X-API-Key": svc.keys[Role.planner]}, json={
        "city": CITY, "shift": "2020-02-10T14:00:00-05:00", "patrols": [{"h3": h, "dose_minutes": 20} for h in cells]})
    assert response.status_code == 201, response.text
    after = scrape(svc.client)
    assert value(after, "hotspots_patrol_rows_recorded_total", city=CITY) == before + 3
    assert value(after, "hotspots_http_requests_total", route="/v1/patrols", method="POST", status="201") >= 1


def test_metrics_need_no_key_and_expose_nothing_personal(svc):
    get(svc, "/v1/hotspots", city=CITY, k=3)
    response = svc.client.get("/metrics")  # no X-API-Key
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    text = response.text
    key_ids = [key.split("_")[1] for key in svc.keys.values()]
    assert not any(k in text for k in key_ids) and "hsk_" not in text
    assert not any(h in text for h in svc.panel.study_area.h3_ids)  # no cells, so no forecast either
    assert "expected_count" not in text and "X-API-Key" not in text
    openmetrics = svc.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert "/metrics" in svc.client.get("/openapi.json").json()["paths"]


def test_each_app_has_its_own_registry(svc, tmp_path):
    other = create_app(Settings(data_dir=tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    client = TestClient(other)  # no lifespan: no registry look-up needed for this
    for _ in range(3):
        client.get("/healthz")
    mine = scrape(client)
    other.state.db.dispose()
    assert value(mine, "hotspots_http_requests_total", route="/healthz", method="GET", status="200") == 3
    assert value(mine, "hotspots_forecast_cache_lookups_total", city=CITY, result="hit") == 0
    assert not any(name == "hotspots_champion_model_info" for name, _ in mine)  # no cities in this one
    assert value(scrape(svc.client), "hotspots_champion_model_info", city=CITY, version=svc.version, source="registry",
                 model_name=f"hotspots-{CITY}") == 1


def test_route_templates_of_nested_routers_converters_and_mounts(tmp_path):
    """Templates keep every router prefix, whatever the convertor, and a mounted app is one template."""
    (tmp_path / "a.txt").write_text("a")
    app = FastAPI()
    inner = APIRouter(prefix="/items")

    @inner.get("/{item_id:int}/parts/{name}")
    def part(item_id: int, name: str) -> dict:
        return {"item": item_id, "name": name}

    outer = APIRouter(prefix="/v9")
    outer.include_router(inner)
    app.include_router(outer)
    app.mount("/files", StaticFiles(directory=tmp_path), name="files")
    metrics = ServiceMetrics(lambda: {})
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    client = TestClient(app)
    assert client.get("/v9/items/42/parts/wheel").json() == {"item": 42, "name": "wheel"}
    assert client.get("/v9/items/7/parts/42").status_code == 200
    assert client.post("/v9/items/7/parts/x").status_code == 405
    assert client.get("/files/a.txt").status_code == 200 and client.get("/files/b.txt").status_code == 404
    assert client.get("/v9/items/notanint/parts/x").status_code == 404
    body, _ = metrics.render()
    samples = metric_samples(body.decode())
    template = "/v9/items/{item_id}/parts/{name}"
    assert value(samples, "hotspots_http_requests_total", route=template, method="GET", status="200") == 2
    assert value(samples, "hotspots_http_requests_total", route=template, method="POST", status="405") == 1
    assert value(samples, "hotspots_http_requests_total", route="/files/{path}", method="GET", status="200") == 1
    assert value(samples, "hotspots_http_requests_total", route="/files/{path}", method="GET", status="404") == 1
    assert value(samples, "hotspots_http_requests_total", route="<unmatched>", method="GET", status="404") == 1


WORKERS = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    from fastapi.testclient import TestClient
    from features.settings import Settings
    from serving.app import create_app

    data = Path(sys.argv[1])

    def serve(n):
        app = create_app(Settings(data_dir=data, mlflow_tracking_uri=f"sqlite:///{data}/mlflow.db"))
        assert app.state.metrics.registry is None, "not in multiprocess mode"
        client = TestClient(app)
        for _ in range(n):
            assert client.get("/healthz").status_code == 200
        client.get("/no/such/route")
        return client

    for n in (3, 4):  # two worker processes (forked after the imports, as cheap as it gets)
        pid = os.fork()
        if pid == 0:
            serve(n)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    sys.stdout.write(serve(1).get("/metrics").text)  # a third one answers the scrape
""")


def test_worker_processes_are_summed_with_a_multiprocess_dir(tmp_path):
    """Three processes (as uvicorn workers would) write to one PROMETHEUS_MULTIPROC_DIR; the /metrics of any of
    them reports the sum of all."""
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTSPOTS_")}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(folder), PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", WORKERS, str(tmp_path / "data")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len({f.name.rsplit("_", 1)[-1] for f in folder.glob("*.db")}) == 3  # files of three pids
    samples = metric_samples(done.stdout)
    assert value(samples, "hotspots_http_requests_total", route="/healthz", method="GET", status="200") == 8
    assert value(samples, "hotspots_http_requests_total", route="<unmatched>", method="GET", status="404") == 3
    assert value(samples, "hotspots_http_request_duration_seconds_count", route="/healthz", method="GET", status="200") == 8
