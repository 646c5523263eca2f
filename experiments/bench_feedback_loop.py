"""Benchmark: one simulated year (1,095 shifts) of the closed loop for Chicago at H3 resolution 9 (6,044 cells)
with the LightGBM policy retrained monthly. Target: <= 15 minutes on the 2-core machine.

The world (ingest of the 2001-2018 file, 2016 panel, truth) is built once and timed apart; each run then
simulates the 91-day random warm-up and the 365-day loop (12 monthly refits, a forecast and a patrol plan every
shift). Wall time per run, the median over runs, peak resident memory (sampled every 10 ms) and the machine's
load average (the machine is shared, so timings move with it) go to experiments/results/bench_feedback_loop.json.

    python -m experiments.bench_feedback_loop --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime
from pathlib import Path

import psutil

from experiments.bench_foundation import PeakMemory
from experiments.feedback_loop import Policy, Recording, light_lightgbm, simulate
from experiments.run_feedback_loop import RESULTS, add_world_arguments, build_world, check_inputs, loop_config

TARGET_SECONDS = 15 * 60


def main() -> None:
    parser = add_world_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_feedback_loop.json")
    args = parser.parse_args()
    check_inputs(args)

    memory = PeakMemory()
    recording = Recording(args.report_prob, args.discover_prob)
    t0 = time.perf_counter()
    world = build_world(args, recording)
    setup = {"seconds": time.perf_counter() - t0, "peak_rss_gb": memory.peak / 1e9}
    print(f"world {world.name}: {world.n_cells:,} cells, {world.n_shifts:,} shifts, built in {setup['seconds']:.0f} s",
          flush=True)
    config = loop_config(args, recording, world.calendar.per_day)
    policy = Policy("lightgbm", lambda: light_lightgbm(args.num_threads, args.seed))
    runs = []
    for i in range(args.runs):
        memory.reset()
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        result = simulate(world, [policy], config)
        seconds = time.perf_counter() - t0
        runs.append({
            "seconds": seconds, "peak_rss_gb": memory.peak / 1e9, "fit_seconds": result.seconds["lightgbm"]["fit"],
            "predict_seconds": result.seconds["lightgbm"]["predict"], "refits": len(result.refits["lightgbm"]),
            "shifts": int(result.measures.height), "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        })
        print(f"run {i + 1}/{args.runs}: {seconds:.0f} s ({runs[-1]['refits']} refits, fit "
              f"{runs[-1]['fit_seconds']:.0f} s, predict {runs[-1]['predict_seconds']:.0f} s), "
              f"peak RSS {runs[-1]['peak_rss_gb']:.2f} GB, load {load_before[0]:.1f}", flush=True)
    memory.stop()
    median = statistics.median(r["seconds"] for r in runs)
    summary = {
        "what": "one simulated year of closed-loop shifts, Chicago H3 r9, LightGBM policy, monthly refits",
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "processor": platform.processor(),
            "note": "2 cores shared with other engineers' jobs; see the load averages per run",
        },
        "when": datetime.now().isoformat(timespec="seconds"),
        "world": {"name": world.name, "cells": world.n_cells, "shifts_total": world.n_shifts,
                  "warmup_shifts": config.warmup_shifts, "loop_shifts": world.n_shifts - config.warmup_shifts},
        "settings": {"patrols": args.patrols, "num_threads": args.num_threads,
                     "lightgbm": repr(light_lightgbm(args.num_threads, args.seed)),
                     "report_prob": args.report_prob, "discover_prob": args.discover_prob},
        "setup": setup,
        "runs": runs,
        "median_seconds": median,
        "peak_rss_gb": max([setup["peak_rss_gb"]] + [r["peak_rss_gb"] for r in runs]),
        "target_seconds": TARGET_SECONDS,
        "meets_target": median <= TARGET_SECONDS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"median of {args.runs} runs: {median:.0f} s (target {TARGET_SECONDS} s); "
          f"peak RSS {summary['peak_rss_gb']:.2f} GB; written to {args.out}")


if __name__ == "__main__":
    main()
