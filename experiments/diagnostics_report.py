"""Feedback-loop diagnostics of the saved real backtests: LightGBM against the naive map at 1% and 5% of the
area, Toronto 2021 and Chicago 2017.

Reads each backtest's ``predictions.npz`` and ``feature_importance.json`` and the city's panel (nothing is
refitted), and writes ``experiments/results/diagnostics/{city}/diagnostics.{json,html,png}``. No patrol log
exists for these cities, so the dose analysis is reported as not run.

    python -m experiments.diagnostics_report [--runs ../runs] [--city toronto --city chicago]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from features.panel import CountPanel
from forecasting.diagnostics import diagnose
from forecasting.metrics import HEADLINE_COVERAGES
from forecasting.reporting.diagnostics_view import diagnostics_figure, diagnostics_page

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "experiments" / "results" / "diagnostics"
CITIES = {
    "toronto": ("toronto/backtests/toronto-mci-r9-20210101-20220101", "toronto/panels/toronto-mci-r9", "2021"),
    "chicago": ("chicago/backtests/chicago-r9-20170101-20180101", "chicago/panels/chicago-r9", "2017"),
}


def run_city(city: str, runs: Path, out: Path) -> dict:
    backtest, panel_dir, year = CITIES[city]
    folder = runs / backtest
    t0 = time.perf_counter()
    panel = CountPanel.load(runs / panel_dir)
    with np.load(folder / "predictions.npz") as z:  # only the arrays needed (the file holds every forecaster)
        origins, observed, areas = z["origins"], z["observed"], z["areas"]
        predictions = {name: z[f"pred_{name}"] for name in ("lightgbm", "naive")}
    if areas.size != panel.n_cells:
        raise ValueError(f"{city}: the backtest has {areas.size} cells but the panel {panel.n_cells}")
    importance = json.loads((folder / "feature_importance.json").read_text())
    diag = diagnose(predictions, observed, areas, origins, panel.calendar.per_day, model="lightgbm",
                    baseline="naive", coverages=HEADLINE_COVERAGES, importance=importance, panel=panel)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Feedback-loop diagnostics: {city}, test year {year} (H3 res {panel.study_area.resolution}, {panel.n_cells} cells)"
    payload = {"city": city, "test_year": year, "backtest": str(folder), "panel": str(runs / panel_dir),
               "n_shifts": int(origins.size), "n_cells": int(panel.n_cells), **diag.payload()}
    (out / "diagnostics.json").write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    fig = diagnostics_figure(diag)
    fig.suptitle(title, fontsize=12)
    fig.savefig(out / "diagnostics.png", dpi=90, facecolor="white")
    (out / "diagnostics.html").write_text(diagnostics_page(diag, title), encoding="utf-8")
    print(f"{city}: {time.perf_counter() - t0:.1f} s -> {out}")
    return diag.to_dict()


def summary_lines(city: str, m: dict) -> list[str]:
    lines = [f"== {city}: gain from lagged counts {m['diag.gain_lagged_share']:.1%} "
             f"(own {m['diag.gain_share.own_lagged']:.1%}, neighbours {m['diag.gain_share.neighbour_lagged']:.1%})"]
    head = (f"{'':9}{'rule':6}{'Gini':>7}{'static':>8}{'top1%':>7}{'ever':>6}{'rot':>6}{'ties':>6}"
            f"{'J shift':>8}{'J day':>7}{'run':>6}{'runD':>6}")
    lines.append(head)
    for who, pre in (("lightgbm", "diag."), ("naive", "diag.baseline.")):
        for tag in ("1pct", "5pct"):
            def g(k: str, pre: str = pre, tag: str = tag) -> float:
                return m[f"{pre}{k}.{tag}"]
            lines.append(f"{who:9}{tag:6}{g('gini'):7.3f}{g('gini_static'):8.3f}{g('top1pct_share'):7.2f}"
                         f"{g('cells_ever_flagged'):6.0f}{g('rotation'):6.1f}{g('tie_share'):6.2f}"
                         f"{g('jaccard_mean'):8.3f}{g('jaccard_day_mean'):7.3f}{g('run_mean'):6.1f}{g('run_days_mean'):6.1f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path(os.environ.get("HOTSPOTS_RUNS", REPO_ROOT.parent / "runs")),
                        help="folder holding {city}/backtests and {city}/panels (default ../runs)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--city", action="append", choices=sorted(CITIES))
    args = parser.parse_args(argv)
    for city in args.city or list(CITIES):
        metrics = run_city(city, args.runs, args.out / city)
        print("\n".join(summary_lines(city, metrics)))


if __name__ == "__main__":
    main()
