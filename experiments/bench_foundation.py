"""Benchmark of the foundation on the whole Chicago 2001-2018 file (6.7 M rows).

Stages, each timed with its peak resident memory (sampled every 10 ms):
  1. ingest + validate into a fresh store (read Parquet, parse local times, quarantine, write the store)
  2. H3 binning at resolution 9 (study area derived from the data, sparse cell x shift x category panel)
  3. features for one year of shifts (default 2017: 1,095 origins x every study-area cell)

Targets (2-core machine): stages 1+2 <= 30 s, stage 3 <= 60 s, peak memory <= 6 GB.

    python -m experiments.bench_foundation --runs 3
prints the figures and writes them to experiments/results/bench_foundation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import psutil

from features.matrix import build_features
from features.pipeline import build_city_panel, ingest_file
from features.profile import load_profile
from features.store import IncidentStore

RESULTS = Path(__file__).parent / "results"


class PeakMemory:
    """Samples this process's RSS in a thread; reports the peak seen since reset."""

    def __init__(self, interval: float = 0.01):
        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self.process.memory_info().rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def stage(name: str, record: dict, memory: PeakMemory):
    memory.reset()
    started = time.perf_counter()
    yield
    record[name] = {"seconds": time.perf_counter() - started, "peak_rss_gb": memory.peak / 1e9}
    print(f"  {name:<28} {record[name]['seconds']:7.2f} s   peak RSS {record[name]['peak_rss_gb']:.2f} GB", flush=True)


def one_run(source: Path, resolution: int, year: int, memory: PeakMemory) -> dict:
    record: dict = {}
    profile = load_profile("chicago")
    with tempfile.TemporaryDirectory() as tmp:
        store = IncidentStore(tmp)
        with stage("ingest_validate", record, memory):
            summary = ingest_file(source, profile, store, write_report=False)
            incidents = store.read("chicago")
        with stage("h3_binning", record, memory):
            built = build_city_panel(incidents, profile, resolution=resolution, shift_starts=("06:00", "14:00", "22:00"))
            panel, report, area, calendar = built.panel, built.report, built.panel.study_area, built.panel.calendar
        zone = ZoneInfo("America/Chicago")
        origins = calendar.shift_range(datetime(year, 1, 1, tzinfo=zone), datetime(year + 1, 1, 1, tzinfo=zone))
        with stage(f"features_{year}", record, memory):
            matrix = build_features(panel, origins)
    record["rows"] = {
        "input": summary.input_rows, "stored": summary.stored_new, "quarantined": summary.quarantined_total,
        "binned": report.binned, "cells": len(area), "origins": int(origins.size),
        "feature_rows": int(matrix.X.shape[0]), "features": len(matrix.columns),
        "feature_matrix_gb": matrix.X.nbytes / 1e9,
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("HOTSPOTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--source", type=Path, default=default / "chicago" / "chicago_crimes_2001_2018.parquet")
    parser.add_argument("--resolution", type=int, default=9)
    parser.add_argument("--year", type=int, default=2017)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_foundation.json")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"no input at {args.source}: set HOTSPOTS_SHARED_DATA or pass --source")

    memory = PeakMemory()
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        runs.append(one_run(args.source, args.resolution, args.year, memory))
    memory.stop()

    stages = [k for k in runs[0] if k != "rows"]
    median = {k: statistics.median(r[k]["seconds"] for r in runs) for k in stages}
    peak = max(r[k]["peak_rss_gb"] for r in runs for k in stages)
    summary = {
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "processor": platform.processor(),
        },
        "when": datetime.now().isoformat(timespec="seconds"),
        "source": str(args.source), "resolution": args.resolution, "year": args.year, "runs": runs,
        "median_seconds": median,
        "median_ingest_validate_bin_seconds": statistics.median(
            r["ingest_validate"]["seconds"] + r["h3_binning"]["seconds"] for r in runs
        ),
        "peak_rss_gb": peak,
        "targets": {"ingest_validate_bin_seconds": 30, "features_one_year_seconds": 60, "peak_rss_gb": 6},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\nmedian of {args.runs} runs on {os.cpu_count()} cores:")
    print(f"  ingest + validate + H3 binning {summary['median_ingest_validate_bin_seconds']:.1f} s (target 30)")
    print(f"  features for {args.year} ({runs[0]['rows']['origins']} shifts x {runs[0]['rows']['cells']} cells) "
          f"{median[f'features_{args.year}']:.1f} s (target 60)")
    print(f"  peak RSS {peak:.2f} GB (target 6)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
