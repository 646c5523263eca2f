"""Benchmark of forecasting at H3 resolution 9.

1. LightGBM training time and peak memory on Toronto (all data up to the end of 2020, the default 2-year
   training window) and on Chicago 2012-2017 (training window covering the six years).
2. Wall time of the full Toronto 2021 backtest: every forecaster, monthly refits, 1,095 shifts.

Targets (2-core machine): Toronto training <= 3 min, full backtest <= 15 min, peak memory <= 8 GB.

    python -m experiments.bench_forecasting --runs 3
prints the figures and writes experiments/results/bench_forecasting.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path

import polars as pl
import psutil

from experiments.bench_foundation import PeakMemory
from features.pipeline import build_city_panel, ingest_file
from features.profile import load_profile
from features.sources.toronto import materialise
from features.store import IncidentStore
from forecasting.backtest import run_backtest
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("HOTSPOTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--chicago", type=Path, default=default / "chicago" / "chicago_crimes_2001_2018.parquet")
    parser.add_argument("--resolution", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3, help="runs of each training benchmark")
    parser.add_argument("--backtest-runs", type=int, default=1)
    parser.add_argument("--skip-chicago", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_forecasting.json")
    args = parser.parse_args()

    memory = PeakMemory()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = IncidentStore(tmp)
        ingest_file(materialise(Path(tmp) / "toronto.csv"), load_profile("toronto-mci"), store, write_report=False)
        toronto = panel_for(store.read("toronto-mci"), "toronto-mci", args.resolution)
        cutoff = toronto.calendar.shift_of(datetime(2021, 1, 1, 5, tzinfo=UTC))
        runs = [timed(partial(fit_fresh, toronto, cutoff), memory) for _ in range(args.runs)]
        figures["toronto_train"] = {"seconds": [r[0] for r in runs], "median_seconds": statistics.median(r[0] for r in runs),
                                    "peak_rss_gb": max(r[1] for r in runs), "cells": toronto.n_cells, "train_days": 730}
        print(f"Toronto train: median {figures['toronto_train']['median_seconds']:.1f} s, "
              f"peak {figures['toronto_train']['peak_rss_gb']:.2f} GB", flush=True)

        if args.backtest_runs:
            backtest = partial(run_backtest, toronto, date(2021, 1, 1), date(2022, 1, 1))
            runs = [timed(backtest, memory) for _ in range(args.backtest_runs)]
            figures["toronto_backtest_2021"] = {"seconds": [r[0] for r in runs],
                                                "median_seconds": statistics.median(r[0] for r in runs),
                                                "peak_rss_gb": max(r[1] for r in runs), "shifts": 1095, "forecasters": 5}
            print(f"Toronto 2021 backtest: median {figures['toronto_backtest_2021']['median_seconds']:.1f} s, "
                  f"peak {figures['toronto_backtest_2021']['peak_rss_gb']:.2f} GB", flush=True)
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
    memory.stop()
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 1e9, 1)},
        "when": datetime.now().isoformat(timespec="seconds"), "resolution": args.resolution, "figures": figures,
        "targets": {"toronto_train_seconds": 180, "toronto_backtest_seconds": 900, "peak_rss_gb": 8},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
