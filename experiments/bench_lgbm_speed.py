"""LightGBM time-to-accuracy on a validation window (never the test year): old vs new settings, or old vs new code.

Fits at a cutoff (default 2020-09-01, Toronto res 9, three 8-hour shifts) and scores the forecasts of every shift
until the end of the window (default 2021-01-01): hit rate at 1% and 5% of the area (random and pessimistic
ties) and the mean Poisson deviance. Each setting is timed interleaved with the others (``--runs`` rounds), so
every figure shares the machine's load, which is printed beside it, with the fit's CPU time (user + sys: what
the fit would take on one idle core, and about twice its idle wall time on two).

Every fit runs in a process of its own (LightGBM's OpenMP runtime reads its settings once per process), so
``--old-code CHECKOUT`` can time a setting (``old-code``) on another checkout's code, e.g. main before a change:

    hotspots ingest toronto-mci && hotspots panel toronto-mci      # once: the data folder's resolution-9 panel
    python -m experiments.bench_lgbm_speed --runs 2               # or --panel FOLDER
    python -m experiments.bench_lgbm_speed --runs 5 --only new --old-code ../main
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import numpy as np

from features.matrix import build_targets
from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.metrics import HEADLINE_COVERAGES, poisson_deviance, pooled, shift_hits

if TYPE_CHECKING:  # imported by the fit's own process only: this one must not load LightGBM's OpenMP runtime
    from forecasting.lgbm import LightGBMForecaster

# the settings before issue 15's speed work: the same forecaster with its former defaults
UNIFORM = {"zero_sampling": "uniform", "zero_rate": 0.05}  # every zero row kept at 5%: the default until 2026-11-30
OLD = {"learning_rate": 0.05, "max_bin": 255, **UNIFORM, "early_stopping_rounds": 50, "chunk_shifts": 90}
# es30: the defaults before the early-stopping patience went from 30 to 20 rounds; quiet: zeros of cells without
# an incident before their chunk's first origin kept at 1% instead of 5%, weight 100 (an option, not the default);
# uniform: the zero sampling before the by_rate default
SETTINGS: dict[str, dict] = {"old": OLD, "new": {}, "es30": {**UNIFORM, "early_stopping_rounds": 30},
                             "quiet": {**UNIFORM, "quiet_zero_rate": 0.01}, "uniform": UNIFORM}


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


def fit_once(panel_folder: str, cutoff: str, end: str, params: dict) -> dict:
    """One timed fit and its validation figures, in this process (the child's side of :func:`run_child`)."""
    panel = CountPanel.load(panel_folder)
    _ = panel.study_area.ring1, panel.study_area.ring2  # neighbour tables: built once per panel, as in a backtest
    zone = ZoneInfo(panel.calendar.timezone)
    to_dt = lambda d: datetime(d.year, d.month, d.day, tzinfo=zone)  # noqa: E731
    first, last = to_dt(date.fromisoformat(cutoff)), to_dt(date.fromisoformat(end))
    origins = panel.calendar.shift_range(first, last)
    from forecasting.lgbm import LightGBMForecaster

    model = LightGBMForecaster(**params)
    load, cpu, started = os.getloadavg()[0], os.times(), time.perf_counter()
    model.fit(panel, panel.calendar.shift_of(first))
    seconds, done = time.perf_counter() - started, os.times()
    return {"fit_seconds": seconds, "cpu_seconds": done.user - cpu.user + done.system - cpu.system, "load_1min": load,
            **validation_scores(panel, model, origins), "best_iteration": model.best_iteration_,
            "train_rows": model.train_rows_,  # every parameter the fit ran with (a setting lists only its changes)
            "resolved_params": {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
                                for k, v in model.get_params(deep=True).items() if k != "features"}}


CHILD = ("import importlib.util as u, json, sys; s = u.spec_from_file_location('bench', sys.argv[5]); "
         "m = u.module_from_spec(s); s.loader.exec_module(m); "
         "print('RESULT ' + json.dumps(m.fit_once(*sys.argv[1:4], json.loads(sys.argv[4]))))")


def run_child(args: argparse.Namespace, params: dict, code: Path | None) -> dict:
    """:func:`fit_once` in a fresh process, on this checkout or on ``code`` (another checkout's packages first on
    the path; this file's ``fit_once`` uses only what both have)."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", CHILD, str(args.panel.resolve()), str(args.cutoff), str(args.end),
                           json.dumps(params), str(Path(__file__).resolve())],
                          env=env, capture_output=True, text=True, cwd=code.resolve() if code else None)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the fit's process failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


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
    parser.add_argument("--old-code", type=Path, default=None,
                        help="another checkout (e.g. ../main): its code, with its defaults, runs as the setting old-code")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    if not (args.panel / "panel.json").exists():
        parser.error(f"no saved panel in {args.panel}: run `hotspots panel toronto-mci` or give --panel FOLDER")
    if args.old_code is not None and not (args.old_code / "forecasting" / "lgbm.py").exists():
        parser.error(f"--old-code {args.old_code} is not a hotspots checkout (no forecasting/lgbm.py); give e.g. ../main")

    settings = dict(SETTINGS)
    for spec in args.set:
        name, _, pairs = spec.partition(":")
        settings[name] = {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs.split(",") if p)}
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only}
    codes: dict[str, Path | None] = dict.fromkeys(settings, None)
    if args.old_code is not None:
        settings, codes = {"old-code": {}, **settings}, {"old-code": args.old_code, **codes}

    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.runs):
        for name, params in settings.items():
            found = run_child(args, params, codes[name])
            if runs[name] and runs[name][0]["hit_0.01_random"] != found["hit_0.01_random"]:
                raise RuntimeError(f"setting {name} is not deterministic across runs")
            runs[name].append(found)
            print(f"  {name}: fit {found['fit_seconds']:.1f} s, {found['cpu_seconds']:.1f} CPU-s at load "
                  f"{found['load_1min']:.1f}; hit 1% {found['hit_0.01_random']:.4f}, 5% {found['hit_0.05_random']:.4f}, "
                  f"deviance {found['deviance']:.5f}", flush=True)
    print(f"validation {args.cutoff}..{args.end}, runs {args.runs}")
    print(f"{'setting':<10}{'fit s':>8}{'CPU s':>8}{'load':>6}{'hit1%':>8}{'hit5%':>8}{'pess1%':>8}{'pess5%':>8}"
          f"{'deviance':>10}{'iters':>7}{'rows':>10}")
    figures = {}
    for name, found in runs.items():
        s = found[-1]
        fit = statistics.median(r["fit_seconds"] for r in found)
        cpu = statistics.median(r["cpu_seconds"] for r in found)
        figures[name] = {"params": settings[name], "code": str(codes[name] or "this checkout"),
                         "fit_seconds": [r["fit_seconds"] for r in found], "median_fit_seconds": fit,
                         "cpu_seconds": [r["cpu_seconds"] for r in found], "median_cpu_seconds": cpu,
                         "load_1min": [r["load_1min"] for r in found],
                         **{k: v for k, v in s.items() if k not in ("fit_seconds", "cpu_seconds", "load_1min")}}
        print(f"{name:<10}{fit:>8.1f}{cpu:>8.1f}{statistics.median(r['load_1min'] for r in found):>6.1f}"
              f"{s['hit_0.01_random']:>8.4f}{s['hit_0.05_random']:>8.4f}{s['hit_0.01_pessimistic']:>8.4f}"
              f"{s['hit_0.05_pessimistic']:>8.4f}{s['deviance']:>10.5f}{s['best_iteration']:>7}{s['train_rows']:>10}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cutoff": str(args.cutoff), "end": str(args.end), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
