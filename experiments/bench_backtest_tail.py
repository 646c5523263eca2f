"""The serial tail of a tracked backtest (metrics, claims, saving, report, assessments, the winner's fit), timed
on a saved backtest's forecasts instead of re-running the refits.

    python -m experiments.bench_backtest_tail SAVED_DIR DATA_DIR OUT_DIR [--source toronto-mci] [--profile F]

SAVED_DIR is a backtest folder (its ``predictions.npz``, ``strongest.json`` and ``feature_importance.json`` are
read); DATA_DIR a writable data folder holding the panel and an MLflow store; the tail writes into OUT_DIR.
Prints wall and CPU seconds (every thread, children included) at each stage and in all, and the load average.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import time
from datetime import date
from pathlib import Path
from unittest import mock

import numpy as np

from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.backtest import BacktestResult, default_forecasters
from forecasting.saved import SavedBacktest
from forecasting.strongest import StrongestChoice


class _Importance:
    """Stands in for the candidate's last fitted model: the tail only asks it for its feature importance."""

    def __init__(self, importance: dict[str, float] | None) -> None:
        self.importance = importance

    def feature_importance(self) -> dict[str, float] | None:
        return self.importance


def saved_result(saved_dir: Path) -> BacktestResult:
    saved = SavedBacktest.load(saved_dir)
    strongest = StrongestChoice(**json.loads((saved_dir / "strongest.json").read_text()))
    candidate = saved.protocol.get("candidate") or "lightgbm"
    return BacktestResult(saved.origins, saved.observed, saved.predictions, saved.areas, saved.per_day, [],
                          {name: 0.0 for name in saved.predictions}, {name: 0.0 for name in saved.predictions},
                          {candidate: _Importance(saved.importance)}, strongest)  # type: ignore[dict-item]


def _cpu(since: os.times_result) -> float:
    """CPU seconds of this process (every thread) and its children since ``since``."""
    now = os.times()
    return (now.user - since.user) + (now.system - since.system) + (now.children_user - since.children_user) + (
        now.children_system - since.children_system)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("saved_dir", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", default="toronto-mci")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--no-register", action="store_true")
    args = parser.parse_args()
    from forecasting.reporting import runs

    settings = Settings(data_dir=args.data_dir)  # type: ignore[call-arg]
    panel = CountPanel.load(DataPaths(settings).panel(args.source))
    result = saved_result(args.saved_dir)
    protocol = SavedBacktest.load(args.saved_dir).protocol
    start, end = date.fromisoformat(protocol["test_start"]), date.fromisoformat(protocol["test_end"])
    profiler = cProfile.Profile() if args.profile else None
    wall, cpu = time.perf_counter(), os.times()
    with mock.patch.object(runs, "run_backtest", lambda *a, **k: result):
        if profiler:
            profiler.enable()
        runs.run_tracked_backtest(panel, args.source, settings, start, end, forecasters=default_forecasters(),
                                  out_dir=args.out_dir, register=not args.no_register,
                                  progress=lambda m: print(f"{time.perf_counter() - wall:7.1f} s {_cpu(cpu):7.1f} CPU-s  {m}",
                                                           flush=True))
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
    print(json.dumps({"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(_cpu(cpu), 1),
                      "load": os.getloadavg(), "n_cells": int(np.asarray(result.areas).size)}))


if __name__ == "__main__":
    main()
