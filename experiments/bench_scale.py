"""Benchmark of the scale-out (issue 13): many cities made from Chicago 2001-2018, on a local Dask cluster.

City k is Chicago moved k x 0.5 degrees north and k x 28 days later (whole weeks: weekdays and local clock
times are kept), with its own source name (``chicago-s<k>``) and its profile's area moved with it.

Stages:
  1. out-of-core ingest + validation + H3 binning of every city into one shared data folder (the partitioned
     store): each city's export is cut into ``--chunk-rows`` chunks that ``--ingest-workers`` worker processes
     (``--memory-limit`` each) read, validate and spill by month as Dask tasks; the client commits month by month;
     then a worker bins the city month by month. The RSS of every worker process and of the client is sampled
     every 50 ms: the record has each one's peak, per city and overall.
  2. a backtest grid (``hotspots batch``'s code) over the first ``--grid-cities`` cities on 1 and on 2 worker
     processes: wall time of each and the speed-up; each point's own seconds feed the estimate.
  3. a written estimate, from the measured per-point cost, of 100 cities x 3 resolutions on a 16-node cluster.

Full run (the lead's):   python -m experiments.bench_scale
Small check:             python -m experiments.bench_scale --cities 2 --since 2017-06-01 --grid-cities 2 \\
                             --test-start 2018-09-01 --test-end 2018-10-01 --out /tmp/bench_scale_small.json
Ingest only (1 city):     python -m experiments.bench_scale --cities 1 --skip-grid --out /tmp/bench_ingest_1.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import psutil

from features.paths import DataPaths
from features.pipeline import build_city_panel_by_month, ingest_on_cluster
from features.profile import load_profile, profile_from_text
from features.settings import Settings
from features.store import IncidentStore

RESULTS = Path(__file__).parent / "results"
CHICAGO = "chicago/chicago_crimes_2001_2018.parquet"
COLUMNS = ["Case Number", "Date", "Primary Type", "Latitude", "Longitude"]
STEP_DEG, STEP_DAYS = 0.5, 28
DATE_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def make_city(source: Path, k: int, out: Path, since: date | None) -> tuple[Path, str]:
    """City k's export (Parquet, Chicago's column names) and its profile (TOML text), streamed, not in memory."""
    frame = pl.scan_parquet(source).select(COLUMNS)
    parsed = pl.col("Date").str.strptime(pl.Datetime("us"), DATE_FORMAT, strict=False)
    if since is not None:
        frame = frame.filter(parsed >= datetime(since.year, since.month, since.day))
    frame = frame.with_columns(
        (parsed + timedelta(days=STEP_DAYS * k)).dt.strftime(DATE_FORMAT).fill_null(pl.col("Date")).alias("Date"),
        (pl.col("Latitude") + STEP_DEG * k).alias("Latitude"))
    export = out / f"chicago-s{k}.parquet"
    frame.sink_parquet(export)
    base = load_profile("chicago")
    bbox = list(base.area.bbox) if base.area.bbox else None
    area = base.area.model_copy(update={"bbox": (bbox[0], bbox[1] + STEP_DEG * k, bbox[2], bbox[3] + STEP_DEG * k)}
                                if bbox else {})
    profile = base.model_copy(update={"name": f"chicago-s{k}", "path": None, "area": area})
    return export, profile.to_toml()


class PeakRss:
    """Peak resident memory of a set of processes (the Dask workers and this client), sampled every 50 ms."""

    def __init__(self, pids: dict[str, int]):
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peaks = {name: 0 for name in pids}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for name, process in self.processes.items():
                try:
                    self.peaks[name] = max(self.peaks[name], process.memory_info().rss)
                except psutil.Error:
                    pass  # a worker restarted by its nanny: its replacement is not followed
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def gb(self) -> dict[str, float]:
        return {name: round(peak / 1e9, 3) for name, peak in self.peaks.items()}


def bin_city(profile_toml: str, profile_path: str, data_dir: str, resolution: int) -> dict:
    """One city's panel, binned month by month from the store's partitions (a task)."""
    started = time.perf_counter()
    profile = profile_from_text(profile_toml, Path(profile_path))
    store = IncidentStore(data_dir)
    settings = Settings(data_dir=data_dir, h3_resolution=resolution)
    built = build_city_panel_by_month(store, profile, settings, name=profile.name)
    with store.writing(f"panel of {profile.name}"):
        built.panel.save(DataPaths(settings).panel(profile.name))
    return {"cells": built.panel.n_cells, "binned": built.report.binned, "seconds": time.perf_counter() - started}


def ingest_cities(client, cities: list[tuple[Path, str]], data: Path, args) -> dict:
    """Stage 1: every city ingested out of core (chunks as tasks) and binned by month, one city after another."""
    pids = {f"worker-{i}": pid for i, pid in enumerate(sorted(client.run(os.getpid).values()))}
    pids["client"] = os.getpid()
    rows, total = [], time.perf_counter()
    with PeakRss(pids) as overall:
        for export, toml in cities:
            profile_path = data / f"{export.stem}.toml"
            profile = profile_from_text(toml, profile_path)
            load = os.getloadavg()
            with PeakRss(pids) as peak:
                started = time.perf_counter()
                summary = ingest_on_cluster(export, profile, IncidentStore(data), client, chunk_rows=args.chunk_rows,
                                            write_report=False)
                ingested = time.perf_counter() - started
                binned = client.submit(bin_city, toml, str(profile_path), str(data), args.resolution, pure=False).result()
                seconds = time.perf_counter() - started
            row = {"city": profile.name, "input_rows": summary.input_rows, "stored": summary.stored_new,
                   "balanced": summary.balanced, "ingest_seconds": ingested, "bin_seconds": binned["seconds"],
                   "seconds": seconds, "cells": binned["cells"], "peak_rss_gb": peak.gb(), "load_before": load,
                   "load_after": os.getloadavg()}
            rows.append(row)
            print(f"  {row['city']:<12} {row['input_rows']:>10,} rows  ingest {ingested:6.1f} s  bin "
                  f"{binned['seconds']:5.1f} s  peak RSS GB {row['peak_rss_gb']}  load {load[0]:.1f}", flush=True)
    workers = {k: v for k, v in overall.gb().items() if k != "client"}
    return {"wall_seconds": time.perf_counter() - total, "workers": args.ingest_workers,
            "memory_limit": args.memory_limit, "chunk_rows": args.chunk_rows,
            "rows": sum(r["input_rows"] for r in rows), "max_peak_rss_gb_per_worker": max(workers.values()),
            "peak_rss_gb": overall.gb(), "load_after": os.getloadavg(), "cities": rows}


def grid_file(folder: Path, name: str, cities: list[str], args) -> Path:
    path = folder / f"{name}.toml"
    lines = [f'name = "{name}"', f"sources = {json.dumps(cities)}", f"resolutions = [{args.resolution}]",
             'shift_starts = ["06:00,14:00,22:00"]', f"forecasters = {json.dumps(args.forecasters)}",
             f"test_start = {args.test_start}", f"test_end = {args.test_end}", "n_boot = 100"]
    if "lightgbm" in args.forecasters:
        lines += ["[params.lightgbm]", f"n_estimators = {args.n_estimators}", "num_threads = 1"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cities", type=int, default=10)
    parser.add_argument("--since", type=date.fromisoformat, default=None, help="Keep Chicago from this date (default: all).")
    parser.add_argument("--resolution", type=int, default=9)
    parser.add_argument("--ingest-workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GB", help="Per worker (the issue's bound).")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="Rows per ingest chunk (a task).")
    parser.add_argument("--skip-grid", action="store_true", help="Stage 1 only (ingest and binning).")
    parser.add_argument("--grid-cities", type=int, default=4)
    parser.add_argument("--forecasters", nargs="+", default=["lightgbm", "naive", "all_history"])
    parser.add_argument("--n-estimators", type=int, default=100)
    parser.add_argument("--test-start", type=date.fromisoformat, default=date(2018, 1, 1))
    parser.add_argument("--test-end", type=date.fromisoformat, default=date(2018, 4, 1))
    parser.add_argument("--cores-per-node", type=int, default=8, help="For the 16-node estimate.")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_scale.json")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from forecasting.batch import load_grid
    from forecasting.reporting.batch_runs import run_tracked_batch

    shared = Path(os.environ.get("HOTSPOTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    record: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_before": os.getloadavg()}, "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work, data = Path(tmp), Path(tmp) / "data"
        data.mkdir()
        started = time.perf_counter()
        cities = [make_city(shared / CHICAGO, k, work, args.since) for k in range(args.cities)]
        print(f"made {len(cities)} cities in {time.perf_counter() - started:.1f} s", flush=True)

        with LocalCluster(n_workers=args.ingest_workers, threads_per_worker=1, processes=True,
                          memory_limit=args.memory_limit, dashboard_address=None) as cluster, Client(cluster) as client:
            record["ingest"] = ingest_cities(client, cities, data, args)
        ingests = record["ingest"]["cities"]
        print(f"ingest + binning: {record['ingest']['rows']:,} rows in {record['ingest']['wall_seconds']:.1f} s on "
              f"{args.ingest_workers} workers, max peak RSS per worker {record['ingest']['max_peak_rss_gb_per_worker']:.2f}"
              f" GB (client {record['ingest']['peak_rss_gb']['client']:.2f} GB)", flush=True)
        if args.skip_grid:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2, default=str))
            print(f"written to {args.out}")
            return

        names = [r["city"] for r in ingests][: args.grid_cities]
        settings = Settings(data_dir=data)
        record["grid"] = {}
        for workers in (1, 2):
            grid = load_grid(grid_file(work, f"grid-w{workers}", names, args), settings)
            load = os.getloadavg()
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                started = time.perf_counter()
                tracked = run_tracked_batch(grid, settings, cluster=client, progress=lambda m: print("  " + m, flush=True))
                wall = time.perf_counter() - started
            if tracked.failed:
                raise SystemExit(f"grid on {workers} worker(s) failed: {[r.error for r in tracked.failed]}")
            points = [r.summary["seconds"] for r in tracked.results if r.summary]
            record["grid"][f"workers_{workers}"] = {"wall_seconds": wall, "points": len(points),
                                                     "point_seconds": points, "load_before": load,
                                                     "load_after": os.getloadavg()}
            print(f"grid of {len(points)} points on {workers} worker(s): {wall:.1f} s", flush=True)
        one, two = record["grid"]["workers_1"], record["grid"]["workers_2"]
        record["grid"]["speed_up"] = one["wall_seconds"] / two["wall_seconds"]
        per_point = sum(one["point_seconds"]) / len(one["point_seconds"])
        ingest_per_city = sum(r["seconds"] for r in ingests) / len(ingests)
        slots = 16 * args.cores_per_node
        tasks = 100 * 3
        record["estimate_100_cities_3_resolutions_16_nodes"] = {
            "point_seconds_mean": per_point, "ingest_seconds_per_city": ingest_per_city, "slots": slots,
            "backtest_hours": tasks * per_point / slots / 3600,
            "ingest_hours": 100 * ingest_per_city * args.ingest_workers / slots / 3600,
            "assumptions": f"{tasks} points of the measured mean cost (resolution 9's; 8 and 10 taken as equal), "
                           f"{slots} one-thread slots (16 nodes x {args.cores_per_node} cores), perfect packing "
                           "(tasks >> slots), shared folder not the bottleneck",
        }
    print(f"speed-up 1 -> 2 workers: {record['grid']['speed_up']:.2f}x", flush=True)
    print(json.dumps(record["estimate_100_cities_3_resolutions_16_nodes"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
