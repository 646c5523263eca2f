"""Benchmark of forecasting at H3 resolution 9, each figure the median of ``--runs`` runs with its peak memory
and the machine's load average beside it.

1. LightGBM single fit on Toronto (all data up to the end of 2020, the default 2-year training window) and on
   Chicago 2012-2017 (training window covering the six years).
2. The full Toronto 2021 backtest as a user runs it: ``hotspots backtest toronto-mci --test-start 2021-01-01
   --test-end 2022-01-01`` in a child process on a data folder ingested and binned once beforehand (every
   registered forecaster, monthly refits, 1,095 shifts, the strongest-baseline choice, metrics and intervals,
   the saved forecasts, the report, diagnostics and bias audit, the winner's final fit and its registration),
   with each forecaster's fit and predict seconds read from the run's report.
3. ``hotspots run toronto-mci --no-serve`` end to end in a fresh data folder (a child process: wall time and
   its peak RSS).

Targets (issue 15, 2-core machine): Toronto single fit <= 7 s, full backtest <= 4 min, ``hotspots run`` <= 5 min,
peak memory <= 8 GB.

    python -m experiments.bench_forecasting --runs 3
prints the figures and writes experiments/results/bench_forecasting.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path

import polars as pl
import psutil

from experiments.bench_foundation import PeakMemory
from features.paths import DataPaths
from features.pipeline import build_city_panel, ingest_file
from features.profile import load_profile
from features.settings import Settings
from features.sources.toronto import materialise
from features.store import IncidentStore
from forecasting.lgbm import LightGBMForecaster

RESULTS = Path(__file__).parent / "results"
SHIFTS = ("06:00", "14:00", "22:00")


def panel_for(incidents: pl.DataFrame, profile_name: str, resolution: int):
    return build_city_panel(incidents, load_profile(profile_name), resolution=resolution, shift_starts=SHIFTS).panel


def fit_fresh(panel, cutoff: int, **params) -> None:
    """Build and fit a new forecaster, so each timed run trains from scratch."""
    LightGBMForecaster(**params).fit(panel, cutoff)


def timed(fn, memory: PeakMemory) -> tuple[float, float]:
    memory.reset()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started, memory.peak / 1e9


def load() -> float:
    return round(os.getloadavg()[0], 2)


def figure(runs: list[tuple[float, float]], loads: list[float], **extra) -> dict:
    return {"seconds": [r[0] for r in runs], "median_seconds": statistics.median(r[0] for r in runs),
            "peak_rss_gb": max(r[1] for r in runs), "load_1min": loads, **extra}


def hotspots(args: list[str], folder: Path) -> None:
    """A ``hotspots`` command on ``folder``, as a user runs it (the installed console script, a child process)."""
    subprocess.run([str(Path(sys.executable).with_name("hotspots")), *args, "--data-dir", str(folder)], check=True,
                   stdout=subprocess.DEVNULL)


def hotspots_backtest(folder: Path, resolution: int, start: date, end: date) -> tuple[float, float, Path]:
    """``hotspots backtest`` end to end in a child process: (seconds, peak RSS of the largest child so far, the
    report it wrote)."""
    started = time.perf_counter()
    hotspots(["backtest", "toronto-mci", "--test-start", str(start), "--test-end", str(end)], folder)
    took = time.perf_counter() - started
    report = DataPaths(Settings(data_dir=folder)).backtest("toronto-mci", start, end, resolution) / "report.md"
    return took, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, report


def fit_and_predict_seconds(report: Path) -> dict[str, dict[str, float]]:
    """Each forecaster's fit and predict seconds, from the report's table that has "fit s" and "predict s" columns."""
    found: dict[str, dict[str, float]] = {}
    columns: list[str] | None = None
    for line in report.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            columns = None  # the table ended
        elif "fit s" in cells and "predict s" in cells:
            columns = cells
        elif columns is not None and not set(cells[0]) <= set("-: "):
            row = dict(zip(columns, cells))
            found[row[columns[0]]] = {"fit_seconds": float(row["fit s"]), "predict_seconds": float(row["predict s"])}
    return found


def hotspots_run() -> tuple[float, float]:
    """``hotspots run toronto-mci --no-serve`` in a fresh data folder; peak RSS of the largest child so far."""
    folder = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        started = time.perf_counter()
        hotspots(["run", "toronto-mci", "--no-serve"], folder)
        took = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return took, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("HOTSPOTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--chicago", type=Path, default=default / "chicago" / "chicago_crimes_2001_2018.parquet")
    parser.add_argument("--resolution", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3, help="runs of each training benchmark")
    parser.add_argument("--backtest-runs", type=int, default=None, help="runs of the backtest (default: --runs)")
    parser.add_argument("--run-runs", type=int, default=None, help="runs of `hotspots run` (default: --runs)")
    parser.add_argument("--skip-chicago", action="store_true")
    parser.add_argument("--test-start", type=date.fromisoformat, default=date(2021, 1, 1),
                        help="the backtest's test period (a shorter one is a quick check of the script)")
    parser.add_argument("--test-end", type=date.fromisoformat, default=date(2022, 1, 1))
    parser.add_argument("--keep-backtest", type=Path, default=None,
                        help="copy the last backtest's folder (report, forecasts, summaries) here")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_forecasting.json")
    args = parser.parse_args()
    backtest_runs = args.runs if args.backtest_runs is None else args.backtest_runs
    run_runs = args.runs if args.run_runs is None else args.run_runs

    memory = PeakMemory()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = IncidentStore(tmp)
        ingest_file(materialise(Path(tmp) / "toronto.csv"), load_profile("toronto-mci"), store, write_report=False)
        toronto = panel_for(store.read("toronto-mci"), "toronto-mci", args.resolution)
        cutoff = toronto.calendar.shift_of(datetime(2021, 1, 1, 5, tzinfo=UTC))
        loads = []
        runs = []
        for _ in range(args.runs):
            loads.append(load())
            runs.append(timed(partial(fit_fresh, toronto, cutoff), memory))
        figures["toronto_train"] = figure(runs, loads, cells=toronto.n_cells, train_days=730)
        print(f"Toronto single fit: median {figures['toronto_train']['median_seconds']:.1f} s, "
              f"peak {figures['toronto_train']['peak_rss_gb']:.2f} GB, load {loads}", flush=True)

        if backtest_runs:
            folder = Path(tmp) / "backtest-data"
            for step in (["ingest", "toronto-mci"], ["panel", "toronto-mci", "--resolution", str(args.resolution)]):
                hotspots(step, folder)
            loads, runs, per_forecaster = [], [], []
            for _ in range(backtest_runs):
                loads.append(load())
                took, peak, report = hotspots_backtest(folder, args.resolution, args.test_start, args.test_end)
                runs.append((took, peak))
                per_forecaster.append(fit_and_predict_seconds(report))
            if args.keep_backtest is not None:
                shutil.rmtree(args.keep_backtest, ignore_errors=True)
                shutil.copytree(report.parent, args.keep_backtest)
            figures["toronto_backtest_2021"] = figure(runs, loads, per_forecaster=per_forecaster,
                                                      command=f"hotspots backtest toronto-mci --test-start "
                                                              f"{args.test_start} --test-end {args.test_end}",
                                                      peak_rss_note="largest child process so far")
            print(f"Toronto backtest {args.test_start}..{args.test_end}: median "
                  f"{figures['toronto_backtest_2021']['median_seconds']:.1f} s, peak "
                  f"{figures['toronto_backtest_2021']['peak_rss_gb']:.2f} GB, load {loads}", flush=True)
            for name, took in per_forecaster[-1].items():
                print(f"  {name}: fit {took['fit_seconds']:.1f} s, predict {took['predict_seconds']:.1f} s")
        del toronto

        if not args.skip_chicago and args.chicago.is_file():
            ingest_file(args.chicago, load_profile("chicago"), store, write_report=False)
            incidents = store.read("chicago", start=datetime(2012, 1, 1, 6, tzinfo=UTC),
                                   end=datetime(2018, 1, 1, 6, tzinfo=UTC))
            chicago = panel_for(incidents, "chicago", args.resolution)
            del incidents
            years = (chicago.end_shift - chicago.first_shift) // (3 * 365)
            fit = partial(fit_fresh, chicago, chicago.end_shift, train_days=6 * 365 - 1)  # the whole 2012-2017 span
            runs = [timed(fit, memory) for _ in range(args.runs)]
            figures["chicago_2012_2017_train"] = {"seconds": [r[0] for r in runs],
                                                  "median_seconds": statistics.median(r[0] for r in runs),
                                                  "peak_rss_gb": max(r[1] for r in runs), "cells": chicago.n_cells,
                                                  "years": years}
            print(f"Chicago 2012-2017 train: median {figures['chicago_2012_2017_train']['median_seconds']:.1f} s, "
                  f"peak {figures['chicago_2012_2017_train']['peak_rss_gb']:.2f} GB", flush=True)
    if run_runs:
        loads, runs = [], []
        for _ in range(run_runs):
            loads.append(load())
            runs.append(hotspots_run())
        figures["hotspots_run"] = figure(runs, loads, command="hotspots run toronto-mci --no-serve")
        print(f"hotspots run: median {figures['hotspots_run']['median_seconds']:.1f} s, "
              f"peak {figures['hotspots_run']['peak_rss_gb']:.2f} GB, load {loads}", flush=True)
    memory.stop()
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)},
        "when": datetime.now().isoformat(timespec="seconds"), "resolution": args.resolution, "figures": figures,
        "targets": {"toronto_train_seconds": 7, "toronto_backtest_seconds": 240, "hotspots_run_seconds": 300,
                    "peak_rss_gb": 8},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
