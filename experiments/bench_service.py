"""Load benchmark of the hotspot service on a real Toronto resolution-9 champion (the whole city).

1. From cache: `wrk` (2 threads, 10 connections, --duration seconds, several runs) against
   /v1/hotspots?city=toronto-mci&k=50 on `hotspots serve` with one worker, every request keyed (X-API-Key
   verified) and audited (one committed audit row per response), as in production; uvicorn's per-request
   access log line is off (--access-log to keep it). Requests/s and p50/p99 latency per run, median of runs.
2. Cold: the first request for each of several shifts not in the cache (features of the shift, LightGBM over
   every cell, explanations of the 50 cells returned), timed at the client.

Targets (2-core machine, one worker): >= 500 requests/s with p99 <= 50 ms from cache; a cold forecast <= 1 s.

The data folder: --data-dir names one with panels/toronto-mci-r9 and an MLflow registry whose champion
loads (default /work/runs/toronto, from `hotspots run`); it is only read: panel linked, registry read, and the
service's own files (keys, audit log, local model copy) go to --work-dir. Without a usable champion there (or
with --train) the script trains LightGBM on the whole panel with `hotspots train` into the work folder's own
registry and promotes it; without a panel it ingests Toronto and builds one first.

    python -m experiments.bench_service --runs 3
    python -m experiments.bench_service --runs 3 --swap-every 2   # the champion alias moved during the load
    python -m experiments.bench_service --runs 3 --swap-every 2 --swap-new   # to a new version each time
    python -m experiments.bench_service --runs 4 --swap-every 2 --interleave  # still and moving, alternated
prints the figures and writes experiments/results/bench_service.json (machine and load average included: the
machine is shared, so the load at the time is part of the result).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil
import requests

from features.settings import Settings

RESULTS = Path(__file__).parent / "results"
CITY = "toronto-mci"
PANEL = f"{CITY}-r9"
TARGETS = {"requests_per_second": 500, "p99_ms": 50, "cold_seconds": 1.0}
WRK = shutil.which("wrk") or "/usr/bin/wrk"
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


# --- the data folder ---------------------------------------------------------------------------------------


def _champion_ready(settings: Settings) -> str | None:
    """The champion version when the service can load it with these settings (this also puts its local copy
    into the work folder), else None."""
    from serving.models_store import ModelStore

    state = ModelStore(settings).refresh().get(CITY)
    if state is not None and state.ready and state.model.source == "registry":
        return state.model.version
    print(f"  champion not usable: {state.message if state else 'no panel'}", flush=True)
    return None


def hotspots(*args: str, work: Path) -> None:
    """A `hotspots` command on the work folder, as a user runs it."""
    subprocess.run([sys.executable, "-m", "serving.cli", *args, "--data-dir", str(work)], check=True, cwd=work)


def prepare(source: Path | None, work: Path, train: bool) -> tuple[dict[str, str], dict]:
    """(environment for the service, description of the setup)."""
    (work / "panels").mkdir(parents=True, exist_ok=True)
    link = work / "panels" / PANEL
    if source is not None and (source / "panels" / PANEL / "panel.json").is_file() and not link.exists():
        link.symlink_to((source / "panels" / PANEL).resolve(), target_is_directory=True)
    if source is not None and not train and link.exists():
        uri = Settings(data_dir=source).tracking_uri
        version = _champion_ready(Settings(data_dir=work, mlflow_tracking_uri=uri))
        if version is not None:
            return {"HOTSPOTS_MLFLOW_TRACKING_URI": uri}, {"model": f"champion version {version} of {source}",
                                                           "registry": uri, "panel": str(link.resolve())}
    if not link.exists():
        print("  no Toronto panel: ingesting and binning (a few minutes)", flush=True)
        hotspots("ingest", CITY, work=work)
        hotspots("panel", CITY, "--resolution", "9", work=work)
    print("  training LightGBM on the whole panel (`hotspots train`)", flush=True)
    hotspots("train", CITY, "--resolution", "9", work=work)
    settings = Settings(data_dir=work)
    from mlflow.tracking import MlflowClient

    from forecasting.reporting.tracking import CHAMPION, registered_name

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    latest = max(int(v.version) for v in client.search_model_versions(f"name = '{registered_name(CITY)}'"))
    client.set_registered_model_alias(registered_name(CITY), CHAMPION, str(latest))
    version = _champion_ready(settings)
    if version is None:
        raise SystemExit("the freshly trained champion does not load: see the messages above")
    return {}, {"model": f"version {version} trained here (hotspots train, whole panel)",
                "registry": settings.tracking_uri, "panel": str(link.resolve())}


# --- the server ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, port: int, env: dict[str, str], access_log: bool,
                 reload_seconds: float | None = None) -> subprocess.Popen:
    log = (work / "server.log").open("w")
    command = [sys.executable, "-m", "serving.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--data-dir", str(work)] + ([] if access_log else ["--no-access-log"])
    if reload_seconds is not None:
        command += ["--reload-seconds", repr(reload_seconds)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work, env={**os.environ, **env})
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}): see {work / 'server.log'}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server was not ready within 180 s: see {work / 'server.log'}")
        time.sleep(0.5)


def http_implementation() -> str:
    """What uvicorn picks with http='auto' / loop='auto' in this environment."""
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return f"{http} + {loop}"


# --- alias swaps during the load ---------------------------------------------------------------------------


def swap_versions(env: dict[str, str], work: Path) -> tuple[str, str, str, str | None]:
    """(champion version, a second registry version of the same model files, their source and run id) to move
    the alias between. A
    source folder's registry is only read: it is copied into the work folder first (its artifacts stay where
    they are, read from there) and ``env`` points the service at the copy."""
    from mlflow.tracking import MlflowClient

    from forecasting.reporting.tracking import CHAMPION, registered_name

    uri = env.get("HOTSPOTS_MLFLOW_TRACKING_URI") or Settings(data_dir=work).tracking_uri
    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None:
        raise SystemExit(f"--swap-every needs an SQLite registry it can copy, not {uri}")
    if not path.resolve().is_relative_to(work.resolve()):
        copy = work / "mlflow-swaps.db"
        shutil.copy2(path, copy)
        uri = env["HOTSPOTS_MLFLOW_TRACKING_URI"] = f"sqlite:///{copy}"
    import mlflow

    mlflow.set_tracking_uri(uri)  # MLflow resolves a models:/ source against the process-wide URIs
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(registered_name(CITY), CHAMPION)
    other = client.create_model_version(registered_name(CITY), champion.source, run_id=champion.run_id)
    return str(champion.version), str(other.version), champion.source, champion.run_id


class AliasSwapper(threading.Thread):
    """Moves the champion alias between two versions every ``every`` seconds until stopped; with ``new``, to a
    version registered anew each time (same files): every swap is then a download, an unpickling and a warm-up
    of the recently asked forecasts, as for a newly promoted champion, not a rollback to a version kept loaded."""

    def __init__(self, uri: str, versions: tuple[str, str, str, str | None], every: float, new: bool = False):
        super().__init__(daemon=True)
        self.uri, self.versions, self.every, self.new = uri, versions, every, new
        self.moves: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        from mlflow.tracking import MlflowClient

        from forecasting.reporting.tracking import CHAMPION, registered_name

        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        while not self.stopped.wait(self.every):
            version = self.versions[(len(self.moves) + 1) % 2]
            if self.new:
                version = str(client.create_model_version(registered_name(CITY), self.versions[2],
                                                          run_id=self.versions[3]).version)
            client.set_registered_model_alias(registered_name(CITY), CHAMPION, version)
            self.moves.append(version)

    def stop(self) -> list[str]:
        self.stopped.set()
        self.join(timeout=30)
        return self.moves


# --- measuring ----------------------------------------------------------------------------------------------


def run_wrk(url: str, key: str, threads: int, connections: int, seconds: int) -> dict:
    out = subprocess.run([WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-H",
                          f"X-API-Key: {key}", url], capture_output=True, text=True, check=True).stdout
    latency = {m.group(1): float(m.group(2)) * UNITS_MS[m.group(3)]
               for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)}
    requests_done = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": latency["50"], "p75_ms": latency["75"], "p90_ms": latency["90"], "p99_ms": latency["99"],
            "requests": requests_done, "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else None}


def cold_times(base: str, key: str, shifts: list[str]) -> list[dict]:
    out = []
    with requests.Session() as session:
        session.headers["X-API-Key"] = key
        for shift in shifts:
            started = time.perf_counter()
            response = session.get(f"{base}/v1/hotspots", params={"city": CITY, "k": 50, "shift": shift}, timeout=120)
            seconds = time.perf_counter() - started
            if response.status_code != 200 or response.headers.get("x-cache") != "miss":
                raise SystemExit(f"cold request for {shift} gave {response.status_code} "
                                 f"(cache {response.headers.get('x-cache')}): {response.text[:300]}")
            out.append({"shift": shift, "seconds": seconds})
    return out


def cold_shifts(panel_dir: Path, n: int, offset: int) -> list[str]:
    """ISO starts of n distinct shifts just before the end of the data (never asked before in this run)."""
    from features.panel import CountPanel
    from serving.shifts import shift_start_local

    panel = CountPanel.load(panel_dir)
    return [shift_start_local(panel, panel.end_shift - offset - j).isoformat() for j in range(1, n + 1)]


def measured_run(args, server: psutil.Process, url: str, base: str, key: str, env: dict[str, str], work: Path,
                 versions: tuple[str, str, str, str | None] | None, cold_offset: int) -> dict:
    """One wrk run (the alias moved during it when ``versions`` is given), the server's CPU per request, then
    cold forecasts of shifts not asked before."""
    cpu = sum(server.cpu_times()[:2])
    swapper = None
    if versions:
        swapper = AliasSwapper(env.get("HOTSPOTS_MLFLOW_TRACKING_URI") or Settings(data_dir=work).tracking_uri,
                               versions, args.swap_every, args.swap_new)
        swapper.start()
    result = run_wrk(url, key, args.threads, args.connections, args.duration)
    if swapper is not None:
        result["alias_moves"] = len(swapper.stop())
        served = requests.get(f"{base}/readyz", timeout=30).json()["cities"]
        result["served_version_after"] = {c["city"]: c["model_version"] for c in served}.get(CITY)
    result["server_cpu_ms_per_request"] = 1000 * (sum(server.cpu_times()[:2]) - cpu) / result["requests"]
    result["cold"] = cold_times(base, key, cold_shifts(work / "panels" / PANEL, args.cold, cold_offset))
    result["load_average_1m"] = os.getloadavg()[0]
    return result


def medians(runs: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in ("requests_per_second", "p50_ms", "p99_ms",
                                                               "server_cpu_ms_per_request")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("/work/runs/toronto"),
                        help="data folder of an earlier `hotspots run` (read only); missing: built here")
    parser.add_argument("--work-dir", type=Path, default=None, help="the service's folder (default: a temporary one)")
    parser.add_argument("--train", action="store_true", help="train a champion here even if --data-dir has one")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--cold", type=int, default=5, help="cold forecasts per run")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on")
    parser.add_argument("--swap-every", type=float, default=0.0,
                        help="move the champion alias between two versions of the model every this many seconds "
                             "during each wrk run (the service re-reads the registry every second); 0: no swaps")
    parser.add_argument("--swap-new", action="store_true",
                        help="with --swap-every: move the alias to a version registered anew each time (a new "
                             "champion to load and warm up), not back and forth between two (rollbacks)")
    parser.add_argument("--interleave", action="store_true",
                        help="with --swap-every: each round runs the load once with the alias still and once with it "
                             "moving (order alternating), on the same server refreshing every second, so the two "
                             "share the machine's state; medians per mode")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_service.json")
    args = parser.parse_args()
    if not Path(WRK).is_file():
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.interleave and args.swap_every <= 0:
        raise SystemExit("--interleave alternates still and moving runs: give --swap-every too")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="hotspots-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.data_dir if args.data_dir and args.data_dir.is_dir() else None
    print(f"preparing {work} from {source or 'scratch'}", flush=True)
    env, setup = prepare(source, work, args.train)
    versions = swap_versions(env, work) if args.swap_every > 0 else None
    from serving.keys import Role, create_key

    key = create_key(Role.planner, "load benchmark", Settings(data_dir=work))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/hotspots?city={CITY}&k=50"
    process = start_server(work, port, env, args.access_log, reload_seconds=1.0 if versions else None)
    server = psutil.Process(process.pid)
    load_before = os.getloadavg()
    runs: list[dict] = []
    try:
        warm = requests.get(url, headers={"X-API-Key": key}, timeout=120)
        if warm.status_code != 200:
            raise SystemExit(f"warm-up request gave {warm.status_code}: {warm.text[:300]}")
        n_cells = warm.json()["selection"]["study_area_cells"]
        run_wrk(url, key, args.threads, args.connections, 3)  # settle: connections, caches, allocator
        for i in range(args.runs):
            modes = [bool(versions)] if not args.interleave else ([False, True] if i % 2 == 0 else [True, False])
            for moving in modes:
                result = measured_run(args, server, url, base, key, env, work, versions if moving else None,
                                      cold_offset=len(runs) * args.cold)
                result["mode"] = "moves" if moving else "still"
                runs.append(result)
                print(f"run {i + 1}/{args.runs} ({result['mode']}): {result['requests_per_second']:.0f} req/s, "
                      f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                      f"{result['server_cpu_ms_per_request']:.2f} ms server CPU per request, non-2xx "
                      f"{result['non_2xx']}, alias moves {result.get('alias_moves', 0)}; cold "
                      + ", ".join(f"{c['seconds']:.2f}" for c in result["cold"]) + " s", flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    by_mode = {mode: medians([r for r in runs if r["mode"] == mode]) for mode in ("still", "moves")} \
        if args.interleave else None
    median = dict(by_mode["moves"]) if by_mode else medians(runs)  # interleaved: the targets are judged on the moves
    cold_all = [c["seconds"] for r in runs for c in r["cold"]]
    median["cold_seconds"] = statistics.median(cold_all)
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "note": "shared machine: other processes ran during the measurement (see load averages)"},
        "when": datetime.now().isoformat(timespec="seconds"),
        "setup": {**setup, "city": CITY, "resolution": 9, "cells": n_cells, "workers": 1,
                  "uvicorn": http_implementation(), "access_log": args.access_log, "url": url.replace(base, ""),
                  "wrk": {"threads": args.threads, "connections": args.connections, "seconds": args.duration},
                  "alias_swaps": ({"every_seconds": args.swap_every, "versions": list(versions[:2]),
                                   "new_version_each_move": args.swap_new,
                                   "service_reload_seconds": 1.0} if versions else None),
                  "path": "key verified (2 s cache), forecast and body from cache, audit row committed per response"},
        "runs": runs,
        "median": median,
        "median_by_mode": by_mode,
        "cold_max_seconds": max(cold_all),
        "targets": TARGETS,
        "meets_targets": {"requests_per_second": median["requests_per_second"] >= TARGETS["requests_per_second"],
                          "p99_ms": median["p99_ms"] <= TARGETS["p99_ms"],
                          "cold_seconds": median["cold_seconds"] <= TARGETS["cold_seconds"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\nmedian of {len(runs)} runs, {os.cpu_count()} cores, one worker ({summary['setup']['uvicorn']}):")
    which = " (the runs with the alias moving)" if by_mode else ""
    print(f"  from cache{which}: {median['requests_per_second']:.0f} requests/s (target >= 500), p50 {median['p50_ms']:.1f} ms, "
          f"p99 {median['p99_ms']:.1f} ms (target <= 50)")
    print(f"  cold forecast, {n_cells} cells at resolution 9: median {median['cold_seconds']:.2f} s (target <= 1), "
          f"max {summary['cold_max_seconds']:.2f} s over {len(cold_all)}")
    for mode, m in (by_mode or {}).items():
        print(f"  alias {mode}: {m['requests_per_second']:.0f} requests/s, p50 {m['p50_ms']:.1f} ms, "
              f"p99 {m['p99_ms']:.1f} ms, {m['server_cpu_ms_per_request']:.2f} ms server CPU per request")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
