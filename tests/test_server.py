"""The real server process: `hotspots serve` in a subprocess on a free loopback port, keys made and revoked with
`hotspots keys`, HTTP with requests, and a clean stop on SIGTERM."""

from __future__ import annotations

import inspect
import re
import time
from datetime import date
from types import SimpleNamespace

import pytest
import requests
from live_server import hotspots_serve
from service_support import CITY, free_port, isolated_mlflow_env, served_city
from typer.testing import CliRunner

import serving.cli.models as cli_models
import serving.cli.service as cli_service
from features.settings import Settings
from forecasting.reporting.tracking import registered_name
from serving.cli import app
from serving.cli.service import ensure_planner_key
from serving.keys import KeyStore, list_keys

runner = CliRunner()
KEY = re.compile(r"^(hsk_([0-9a-f]+)_[A-Za-z0-9_-]+)$", re.MULTILINE)


def keys_cli(data_dir, *args: str):
    return runner.invoke(app, ["keys", *args, "--data-dir", str(data_dir)], env={"COLUMNS": "160"})


def new_key(data_dir, role: str, name: str) -> tuple[str, str]:
    """(plaintext, key id) of a key made through the CLI."""
    result = keys_cli(data_dir, "create", "--role", role, "--name", name)
    assert result.exit_code == 0, result.output
    found = KEY.findall(result.output)
    assert len(found) == 1, result.output
    assert "shown only now" in result.output and "cannot be recovered" in result.output
    return found[0]


@pytest.fixture(scope="module")
def live(toronto_incidents, tmp_path_factory):
    with isolated_mlflow_env():
        city = served_city(toronto_incidents, tmp_path_factory.mktemp("server"))
        data_dir = city.settings.data_dir
        planner, planner_id = new_key(data_dir, "planner", "night desk")
        port = free_port()
        with hotspots_serve(data_dir, port) as server:
            yield SimpleNamespace(server=server, port=port, planner=planner, planner_id=planner_id, data_dir=data_dir,
                                  **vars(city))


def get(live, path: str, key: str | None = None, **params) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    return requests.get(f"{live.server.base_url}{path}", params=params, headers=headers, timeout=60)


def test_serve_prints_the_map_and_docs_urls(live):
    log = live.server.log()
    assert f"map:  http://127.0.0.1:{live.port}/map" in log and f"docs: http://127.0.0.1:{live.port}/docs" in log
    assert "1 worker(s)" in log and str(live.data_dir.resolve()) in log.replace("\n", "")
    # a log for a file, not a terminal: a forecast loads the champion, and MLflow's download draws no progress bar
    assert get(live, "/v1/hotspots", live.planner, city=CITY, k=5).status_code == 200
    log = live.server.log()
    assert "Downloading artifacts" not in log and "\r" not in log, log


def test_probes_and_forecasts_over_http(live):
    assert get(live, "/healthz").json() == {"status": "ok"}
    ready = get(live, "/readyz")
    assert ready.status_code == 200, ready.text
    city = {c["city"]: c for c in ready.json()["cities"]}[CITY]
    assert city["ready"] and city["model_version"] == live.version and city["model_name"] == registered_name(CITY)

    hotspots = get(live, "/v1/hotspots", live.planner, city=CITY, k=5)
    assert hotspots.status_code == 200, hotspots.text
    body = hotspots.json()
    assert [h["rank"] for h in body["hotspots"]] == [1, 2, 3, 4, 5]
    assert body["model"]["version"] == live.version == hotspots.headers["x-model-version"]
    assert body["shift"]["shift_id"] == live.panel.end_shift and body["shift"]["after_data"] is True
    expected = live.model.predict(live.panel, live.panel.end_shift)[0]
    assert body["hotspots"][0]["expected_count"] == pytest.approx(expected.max(), rel=1e-9)

    geojson = get(live, "/v1/hotspots.geojson", live.planner, city=CITY, k=5)
    assert geojson.status_code == 200 and geojson.headers["content-type"].startswith("application/geo+json")
    collection = geojson.json()
    assert collection["type"] == "FeatureCollection"
    assert [f["id"] for f in collection["features"]] == [h["h3"] for h in body["hotspots"]]
    assert all(f["geometry"]["type"] == "Polygon" for f in collection["features"])

    missing = get(live, "/v1/hotspots", None, city=CITY)
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    assert get(live, "/v1/hotspots", "hsk_000000000000_wrong", city=CITY).status_code == 401
    assert get(live, "/v1/hotspots", live.planner, city="atlantis").status_code == 404


def test_keys_cli_lists_without_secrets_and_revocation_gives_401(live):
    analyst, analyst_id = new_key(live.data_dir, "analyst", "dispatch GIS")
    assert get(live, f"/v1/models/{CITY}", analyst).status_code == 200
    assert get(live, f"/v1/models/{CITY}", live.planner).status_code == 403  # roles hold across processes

    listed = keys_cli(live.data_dir, "list")
    assert listed.exit_code == 0, listed.output
    for key_id, name, role in ((live.planner_id, "night desk", "planner"), (analyst_id, "dispatch GIS", "analyst")):
        row = next(line for line in listed.output.splitlines() if key_id in line)
        assert name in row and role in row
    secrets = [key.split("_", 2)[2] for key in (live.planner, analyst)]
    assert not any(secret in listed.output for secret in secrets)

    revoked = keys_cli(live.data_dir, "revoke", analyst_id)
    assert revoked.exit_code == 0 and f"key {analyst_id} revoked" in revoked.output
    # the service trusts a verified key for KeyStore.cache_seconds: another process's revocation lands within that
    deadline = time.monotonic() + KeyStore.cache_seconds + 5
    while (status := get(live, "/v1/cities", analyst).status_code) == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 401
    assert "revoked" in get(live, "/v1/cities", analyst).json()["detail"]
    row = next(line for line in keys_cli(live.data_dir, "list").output.splitlines() if analyst_id in line)
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}.*\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", row)  # created, revoked
    assert get(live, "/v1/cities", live.planner).status_code == 200  # the other keys still work

    again = keys_cli(live.data_dir, "revoke", analyst_id)
    assert again.exit_code == 2 and "no active key" in again.output


def test_keys_cli_rejects_bad_roles_and_personal_names(live):
    bad_role = keys_cli(live.data_dir, "create", "--role", "chief", "--name", "night desk")
    assert bad_role.exit_code == 2 and "unknown role 'chief'" in bad_role.output and "planner" in bad_role.output
    email = keys_cli(live.data_dir, "create", "--role", "planner", "--name", "j.doe@police.example")
    assert email.exit_code == 2 and "no personal data" in email.output
    assert keys_cli(live.data_dir, "create", "--role", "planner", "--name", "  ").exit_code == 2
    assert not any("@" in k.name for k in list_keys(live.settings))


def test_run_makes_a_planner_key_only_when_there_is_none(tmp_path):
    """`hotspots run` (serving step) prints a planner key only when the data folder has no active one."""
    settings = Settings(data_dir=tmp_path / "data")
    first = ensure_planner_key(settings)
    assert first is not None and KEY.fullmatch(first)
    assert ensure_planner_key(settings) is None
    assert keys_cli(settings.data_dir, "revoke", first.split("_")[1]).exit_code == 0
    second = ensure_planner_key(settings)
    assert second is not None and second != first
    assert [k.role.value for k in list_keys(settings)] == ["planner", "planner"]


def test_run_passes_every_option_then_serves_with_a_planner_key(monkeypatch, tmp_path):
    """`hotspots run` wiring, with the heavy steps stubbed: each step gets every one of its parameters (a typer
    default left out would arrive as an OptionInfo object), then a planner key is printed once and the service
    starts on the given host and port; --no-serve stops after the registry."""
    calls, arguments = [], {}

    def stub(name):
        params = set(inspect.signature(getattr(cli_models, name)).parameters)

        def step(**kwargs):
            assert set(kwargs) == params, f"run calls {name} without {params - set(kwargs)}"
            calls.append(name)
            arguments[name] = kwargs

        return step

    for name in ("ingest", "panel", "backtest"):
        monkeypatch.setattr(cli_models, name, stub(name))
    monkeypatch.setattr(cli_service, "serve_forever", lambda settings, host, port, **kw: calls.append(
        ("serve", host, port, settings.data_dir)))
    data_dir = tmp_path / "data"
    first = runner.invoke(app, ["run", "--host", "0.0.0.0", "--port", "8123", "--data-dir", str(data_dir)],
                          env={"COLUMNS": "160"})
    assert first.exit_code == 0, first.output
    assert calls == ["ingest", "panel", "backtest", ("serve", "0.0.0.0", 8123, data_dir)]
    assert arguments["backtest"]["forecaster"] is None and arguments["backtest"]["test_start"] is None  # the full run
    assert len(KEY.findall(first.output)) == 1 and "new planner key" in first.output
    again = runner.invoke(app, ["run", "--data-dir", str(data_dir)], env={"COLUMNS": "160"})
    assert again.exit_code == 0 and not KEY.findall(again.output) and calls[-1][1:3] == ("127.0.0.1", 8000)
    calls.clear()
    assert runner.invoke(app, ["run", "--no-serve", "--data-dir", str(data_dir)]).exit_code == 0
    assert calls == ["ingest", "panel", "backtest"]

    # --quick: the last complete month as the test period; LightGBM, SEPP and the all-history map, and naive
    from features.calendar import ShiftCalendar

    calendar = ShiftCalendar("America/Toronto")
    ends_on_new_year = SimpleNamespace(calendar=calendar, end_shift=calendar.local_day(date(2022, 1, 1)) * 3)
    monkeypatch.setattr(cli_models, "load_panel", lambda settings, source: ends_on_new_year)
    calls.clear()
    assert runner.invoke(app, ["run", "--quick", "--no-serve", "--data-dir", str(data_dir)]).exit_code == 0
    quick = arguments["backtest"]
    assert calls == ["ingest", "panel", "backtest"]
    assert (quick["test_start"].date(), quick["test_end"].date()) == (date(2021, 12, 1), date(2022, 1, 1))
    assert quick["forecaster"] == ["lightgbm", "naive", "sepp", "all_history"] and "train_days=365" in quick["param"]


def test_sigterm_stops_the_server_cleanly(live):
    started = time.monotonic()
    assert live.server.stop(timeout=15) == 0
    assert time.monotonic() - started < 15
    log = live.server.log()
    assert "Shutting down" in log and "Finished server process" in log
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{live.server.base_url}/healthz", timeout=2)
