"""Moving the `champion` alias while requests run loses no request.

A real `hotspots serve` process re-reads the registry on every request (--reload-seconds 0) while client
threads hammer /v1/hotspots and the test moves `champion` between two versions several times. The server
swaps a whole city state (never mutates one), so a request keeps the model it started with.

What "champion during the request" can mean for a client: the alias moves at time s (registry time), and the
server serves the new version from some later moment, at the latest when /readyz first reports it (time c,
measured here after the answer arrived). So a version that became champion at s_i and was replaced by a move
confirmed at c_{i+1} may answer any request overlapping [s_i, c_{i+1}]; anything else (a version never
champion, or an old one after the swap was confirmed) is an error.
"""

from __future__ import annotations

import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import requests
from live_server import hotspots_serve
from mlflow.tracking import MlflowClient
from service_support import CITY, free_port, isolated_mlflow_env, quick_lgbm, register, served_city, set_champion

from forecasting.reporting.tracking import registered_name
from serving.keys import Role, create_key
from serving.models_store import _storage_uri

TRAINED = {"resolution": 9, "shift_starts": "06:00,14:00,22:00"}
SHIFTS = ("next", "2020-02-29T22:00:00-05:00", "2020-02-28T14:00:00-05:00")  # cached and cold forecasts alike
CLIENTS = 4
# moves of the alias under load: v2, v1 (a rollback to a version kept loaded), v2, v1 (was 6; each move keeps four
# clients and the server busy for its swap plus 0.7 s, and the fifth and sixth repeated what the third and fourth showed)
MOVES = 4
# answers before the first move (was 150): traffic is flowing, and they give the printed latency baseline
BASELINE_ANSWERS = 60


@dataclass(frozen=True)
class Answer:
    started: float
    finished: float
    status: int | None  # None: no HTTP answer at all
    version: str | None
    header_version: str | None
    error: str | None = None


class Hammer:
    """Client threads sending keyed /v1/hotspots requests back to back until stopped."""

    def __init__(self, base_url: str, key: str):
        self.base_url, self.key = base_url, key
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, worker: int) -> None:
        session = requests.Session()
        session.headers["X-API-Key"] = self.key
        n = worker
        while not self._stop.is_set():
            params = {"city": CITY, "k": 10, "shift": SHIFTS[n % len(SHIFTS)]}
            n += 1
            started = time.monotonic()
            try:
                response = session.get(f"{self.base_url}/v1/hotspots", params=params, timeout=60)
                finished = time.monotonic()
                version = response.json()["model"]["version"] if response.status_code == 200 else None
                answer = Answer(started, finished, response.status_code, version,
                                response.headers.get("x-model-version"), None if version else response.text[:300])
            except (requests.RequestException, ValueError, KeyError) as exc:
                answer = Answer(started, time.monotonic(), None, None, None, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.answers.append(answer)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


def readiness(base_url: str) -> dict:
    return {c["city"]: c for c in requests.get(f"{base_url}/readyz", timeout=30).json()["cities"]}[CITY]


def move_champion(settings, base_url: str, version: str, timeout: float = 60.0) -> tuple[float, float]:
    """(time the alias moved, time /readyz first reported the new version)."""
    moved = time.monotonic()
    set_champion(settings, version)
    deadline = moved + timeout
    while readiness(base_url)["model_version"] != version:
        assert time.monotonic() < deadline, f"the server did not pick up version {version} within {timeout} s"
        time.sleep(0.05)
    return moved, time.monotonic()


@pytest.fixture(scope="module")
def swap(toronto_incidents, tmp_path_factory):
    with isolated_mlflow_env():
        city = served_city(toronto_incidents, tmp_path_factory.mktemp("swap"))
        v2 = register(city.settings, quick_lgbm(seed=1).fit(city.panel), city.panel, promote=False, params=TRAINED)
        key = create_key(Role.planner, "hot swap test", city.settings)
        with hotspots_serve(city.settings.data_dir, free_port(), "--reload-seconds", "0", "--no-access-log") as server:
            yield SimpleNamespace(server=server, key=key, v1=city.version, v2=v2, **vars(city))


def test_moving_the_champion_under_load_loses_no_request(swap):
    base = swap.server.base_url
    assert readiness(base)["model_version"] == swap.v1 and swap.v1 != swap.v2
    periods = [(swap.v1, float("-inf"))]  # (version, alias moved to it at)
    confirmed: list[float] = []  # when /readyz reported each move
    for shift in SHIFTS:  # computed once, so the baseline below is cached traffic like the rest
        assert requests.get(f"{base}/v1/hotspots", params={"city": CITY, "k": 10, "shift": shift},
                            headers={"X-API-Key": swap.key}, timeout=60).status_code == 200
    with Hammer(base, swap.key) as hammer:
        while hammer.count() < BASELINE_ANSWERS:  # traffic is flowing before the first move: the latency baseline
            time.sleep(0.05)
        first_move = time.monotonic()
        for move in range(MOVES):
            version = swap.v2 if move % 2 == 0 else swap.v1
            moved, seen = move_champion(swap.settings, base, version)
            periods.append((version, moved))
            confirmed.append(seen)
            served_before = hammer.count()
            time.sleep(0.7)  # steady traffic on the new champion
            assert hammer.count() > served_before, "no request completed after the move"
    answers = hammer.answers

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert len(answers) >= 100
    # the new champion is loaded and warmed in the background: no request waits for it. A swap (registry read,
    # download, load, warm) takes the time between the move and /readyz reporting it; had requests waited for
    # it, the ~4 in flight at each move (several % of the answers after the first move) would have taken up to that long.
    # (The absolute p99 <= 50 ms is asserted in process below; on a shared, loaded 2-core machine this server's
    # p99 is already 50-100 ms without any swap.)
    def p50_p99(seconds: list[float]) -> tuple[float, float]:
        seconds = sorted(seconds)
        return seconds[len(seconds) // 2], seconds[int(0.99 * (len(seconds) - 1))]

    swap_seconds = [seen - moved for (_, moved), seen in zip(periods[1:], confirmed)]
    before = p50_p99([a.finished - a.started for a in answers if a.finished < first_move])
    during = p50_p99([a.finished - a.started for a in answers if a.started >= first_move])
    print(f"swaps took {min(swap_seconds):.2f}-{max(swap_seconds):.2f} s; p50/p99 before the moves "
          f"{before[0] * 1000:.1f}/{before[1] * 1000:.1f} ms, during the {MOVES} swaps {during[0] * 1000:.1f}/"
          f"{during[1] * 1000:.1f} ms")
    assert during[1] < statistics.median(swap_seconds), f"p99 {during[1]:.2f} s during swaps of {swap_seconds}"
    assert {a.version for a in answers} == {swap.v1, swap.v2}
    assert all(a.version == a.header_version for a in answers)

    windows = [(version, start, confirmed[i] if i < len(confirmed) else float("inf"))
               for i, (version, start) in enumerate(periods)]
    stray = [a for a in answers if not any(v == a.version and a.started <= end and a.finished >= start
                                           for v, start, end in windows)]
    assert not stray, f"{len(stray)} answers came from a version that was not champion then, e.g. {stray[:3]}"
    # and after each confirmed move, requests that started later carry the new version
    for (version, _), seen, (_, next_move) in zip(periods[1:], confirmed, periods[2:] + [(None, float("inf"))]):
        later = [a for a in answers if seen < a.started and a.finished < next_move]
        assert later and all(a.version == version for a in later)


def test_a_champion_that_fails_to_load_keeps_the_old_one_serving(swap):
    base = swap.server.base_url
    move_champion(swap.settings, base, swap.v1)
    # a new version of the champion's fitted model (its files are deleted below, so it is never loaded: no need to
    # train a third model for it)
    broken = register(swap.settings, swap.model, swap.panel, promote=False, params=TRAINED)
    uri = swap.settings.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    artifacts = Path(url2pathname(urlparse(_storage_uri(client, registered_name(CITY), broken)).path))
    assert (artifacts / "MLmodel").is_file()
    shutil.rmtree(artifacts)  # the registry names a version whose files are gone

    with Hammer(base, swap.key) as hammer:
        while hammer.count() < 10:
            time.sleep(0.05)
        set_champion(swap.settings, broken)
        deadline = time.monotonic() + 60
        while (ready := readiness(base))["status"] != "load_failed":
            assert time.monotonic() < deadline, ready
            time.sleep(0.05)
        after_failure = hammer.count()
        time.sleep(1.0)
        assert hammer.count() > after_failure
    assert ready["ready"] and ready["model_version"] == swap.v1
    assert f"version {broken}" in ready["message"] and f"still serving version {swap.v1}" in ready["message"]
    failed = [a for a in hammer.answers if a.status != 200]
    assert not failed, failed[:3]
    assert {a.version for a in hammer.answers} == {swap.v1}

    move_champion(swap.settings, base, swap.v2)  # a loadable champion is picked up again
    assert readiness(base)["status"] == "ready"


LOAD_SECONDS = 1.5  # an artificially slow model load: any request that waited for one would take at least this


def test_a_new_champion_loads_in_the_background_and_no_request_waits_for_it(swap, monkeypatch):
    """In-process: the store re-reads the registry on every request (refresh_seconds=0), every model load takes
    LOAD_SECONDS, and threads ask for forecasts back to back while the alias moves. The first swap takes at least
    the load time (the later ones move back to versions kept loaded), yet no request takes that long: the load
    runs in the background and the new champion is swapped in with the recently asked forecasts already computed
    (every request is a cache hit)."""
    import numpy as np

    import serving.models_store as models_store
    from serving.forecasts import ForecastService
    from serving.models_store import ModelStore

    real_load = models_store._load_forecaster
    loads = []

    def slow_load(path):
        loads.append(path.name)
        time.sleep(LOAD_SECONDS)
        return real_load(path)

    monkeypatch.setattr(models_store, "_load_forecaster", slow_load)
    move_champion(swap.settings, swap.server.base_url, swap.v1)  # the live server follows too; it is not asked
    store, forecasts = ModelStore(swap.settings, refresh_seconds=0), ForecastService(16)
    store.warm = forecasts.warm
    store.refresh()
    loads.clear()
    shifts = [swap.panel.end_shift - 1, swap.panel.end_shift - 5, swap.panel.end_shift - 9]
    for shift in shifts:  # traffic before the moves: these are the forecasts a new champion warms
        forecasts.forecast(store.get(CITY), shift, "all")

    answers: list[tuple[float, str, bool]] = []  # (seconds, version, cache hit)
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        n = worker
        while not stop.is_set():
            started = time.perf_counter()
            try:
                store.maybe_refresh()  # what every request's dependency does
                state = store.get(CITY)
                forecast, hit = forecasts.forecast(state, shifts[n % len(shifts)], "all")
                forecast.top_features(forecast.order[:10])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            answers.append((time.perf_counter() - started, forecast.model.version, hit))
            n += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    swaps = []
    try:
        for version in (swap.v2, swap.v1, swap.v2):
            moved = time.monotonic()
            set_champion(swap.settings, version)
            while store.get(CITY).model.version != version:
                assert time.monotonic() - moved < 60, f"version {version} was not swapped in within 60 s"
                time.sleep(0.01)
            swaps.append(time.monotonic() - moved)
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert not errors, errors[:3]
    # the first swap really waited for a (slow) load; moving back to a version loaded before (a rollback) reuses
    # it from memory: one load in all
    assert swaps[0] >= LOAD_SECONDS and loads == [f"v{swap.v2}"], (swaps, loads)
    seconds = np.array([s for s, _, _ in answers])
    assert len(answers) >= 200 and {v for _, v, _ in answers} == {swap.v1, swap.v2}
    assert seconds.max() < LOAD_SECONDS / 3, f"a request took {seconds.max():.2f} s: it waited for a model load"
    assert np.percentile(seconds, 99) <= 0.050, f"p99 {np.percentile(seconds, 99) * 1000:.0f} ms"
    assert all(hit for _, _, hit in answers), "a new champion was swapped in before its forecasts were computed"


def test_a_background_refresh_runs_niced_on_its_own_thread_only():
    """Linux applies nice per thread: the refresh thread yields the CPU to request threads, which keep theirs."""
    import os

    from serving.models_store import REFRESH_NICE, _lower_priority

    before, seen = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), []

    def refresh() -> None:
        _lower_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=refresh)
    thread.start()
    thread.join()
    assert seen == [min(before + REFRESH_NICE, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
