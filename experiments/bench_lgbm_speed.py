"""LightGBM time-to-accuracy on a validation window (never the test year): old vs new settings.

Fits at a cutoff (default 2020-09-01, Toronto res 9, three 8-hour shifts) and scores the forecasts of every shift
until the end of the window (default 2021-01-01): hit rate at 1% and 5% of the area (random and pessimistic
ties) and the mean Poisson deviance. Each setting is timed interleaved with the others (``--runs`` rounds), so
every figure shares the machine's load, which is printed beside it.

    hotspots ingest toronto-mci && hotspots panel toronto-mci      # once: the data folder's resolution-9 panel
    python -m experiments.bench_lgbm_speed --runs 2               # or --panel FOLDER
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from features.matrix import build_targets
from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import HEADLINE_COVERAGES, poisson_deviance, pooled, shift_hits

# the settings before issue 15's speed work: the same forecaster with its former defaults
OLD = {"learning_rate": 0.05, "max_bin": 255, "zero_rate": 0.05, "early_stopping_rounds": 50, "chunk_shifts": 90}
SETTINGS: dict[str, dict] = {"old": OLD, "new": {}}


def validation_scores(panel: CountPanel, model: LightGBMForecaster, origins: np.ndarray) -> dict[str, float]:
    expected = model.predict(panel, origins)
    observed = build_targets(panel, origins).reshape(origins.size, panel.n_cells).astype(np.float64)
    areas = panel.study_area.areas_km2
    out = {"deviance": poisson_deviance(expected, observed)}
    for ties in ("random", "pessimistic"):
        rates = pooled(shift_hits(expected, observed, areas, origins, HEADLINE_COVERAGES, ties=ties))["hit_rate"]
        for c, r in zip(HEADLINE_COVERAGES, rates):
            out[f"hit_{c:g}_{ties}"] = float(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=Path, default=DataPaths(Settings()).panel("toronto-mci", 9),
                        help="a saved panel folder (default: the data folder's Toronto resolution-9 panel)")
    parser.add_argument("--cutoff", type=date.fromisoformat, default=date(2020, 9, 1))
    parser.add_argument("--end", type=date.fromisoformat, default=date(2021, 1, 1))
    parser.add_argument("--runs", type=int, default=1, help="interleaved rounds of every setting")
    parser.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:key=value,key=value",
                        help="an extra setting, e.g. lr1:learning_rate=0.1,max_bin=63")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    settings = dict(SETTINGS)
    for spec in args.set:
        name, _, pairs = spec.partition(":")
        settings[name] = {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs.split(",") if p)}
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only}

    panel = CountPanel.load(args.panel)
    zone = ZoneInfo(panel.calendar.timezone)
    to_dt = lambda d: datetime(d.year, d.month, d.day, tzinfo=zone)  # noqa: E731
    cutoff = panel.calendar.shift_of(to_dt(args.cutoff))
    origins = panel.calendar.shift_range(to_dt(args.cutoff), to_dt(args.end))
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    loads: dict[str, list[float]] = {name: [] for name in settings}
    scores: dict[str, dict] = {}
    for _ in range(args.runs):
        for name, params in settings.items():
            model = LightGBMForecaster(**params)
            loads[name].append(os.getloadavg()[0])
            started = time.perf_counter()
            model.fit(panel, cutoff)
            seconds[name].append(time.perf_counter() - started)
            found = validation_scores(panel, model, origins)
            if name in scores and scores[name]["hit_0.01_random"] != found["hit_0.01_random"]:
                raise RuntimeError(f"setting {name} is not deterministic across runs")
            scores[name] = {**found, "best_iteration": model.best_iteration_, "train_rows": model.train_rows_}
            print(f"  {name}: fit {seconds[name][-1]:.1f} s at load {loads[name][-1]:.1f}, {found}", flush=True)
    print(f"validation {args.cutoff}..{args.end}, {origins.size} shifts, {panel.n_cells} cells, runs {args.runs}")
    print(f"{'setting':<10}{'fit s':>8}{'load':>6}{'hit1%':>8}{'hit5%':>8}{'pess1%':>8}{'pess5%':>8}"
          f"{'deviance':>10}{'iters':>7}{'rows':>10}")
    figures = {}
    for name in settings:
        s = scores[name]
        fit = statistics.median(seconds[name])
        figures[name] = {"params": settings[name], "fit_seconds": seconds[name], "median_fit_seconds": fit,
                         "load_1min": loads[name], **s}
        print(f"{name:<10}{fit:>8.1f}{statistics.median(loads[name]):>6.1f}{s['hit_0.01_random']:>8.4f}"
              f"{s['hit_0.05_random']:>8.4f}{s['hit_0.01_pessimistic']:>8.4f}{s['hit_0.05_pessimistic']:>8.4f}"
              f"{s['deviance']:>10.5f}{s['best_iteration']:>7}{s['train_rows']:>10}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cutoff": str(args.cutoff), "end": str(args.end), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
