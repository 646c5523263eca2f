"""Bias audit of the saved Chicago 2017 and Toronto 2021 backtests: LightGBM (the champion) against the naive
hotspot map, at 1% and 5% of the area, by race/ethnicity (Chicago) or visible-minority group (Toronto) and by
hardship (Chicago) or low-income (Toronto) quintile, with 95% day-block bootstrap intervals.

    python -m experiments.bias_audit [--city chicago-2017 --city toronto-2021] [--n-boot 1000]

Reads the backtests' ``predictions.npz`` and panels (read-only) and writes
``experiments/results/bias_audit/<city>/{audit.json, audit.html, audit.png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.panel import CountPanel
from forecasting.area_presets import get_preset
from forecasting.bias_audit import BiasAudit, audit, population_split, quantile_split
from forecasting.metrics import HEADLINE_COVERAGES
from forecasting.reporting.bias_audit_view import bias_audit_page, bias_audit_png

RUNS = Path(os.environ.get("HOTSPOTS_RUNS_DIR", "/work/runs"))
OUT = Path(__file__).resolve().parent / "results" / "bias_audit"


@dataclass(frozen=True)
class AuditCase:
    name: str
    predictions: Path
    panel: Path
    preset: str
    group_split: str
    quantile_split: str
    title: str


CASES = {
    "chicago-2017": AuditCase(
        "chicago-2017", RUNS / "chicago/backtests/chicago-r9-20170101-20180101/predictions.npz",
        RUNS / "chicago/panels/chicago-r9", "chicago-community-areas", "race_ethnicity", "hardship_quintile",
        "Bias audit: Chicago, test year 2017 (H3 res 9, 3 shifts a day)"),
    "toronto-2021": AuditCase(
        "toronto-2021", RUNS / "toronto/backtests/toronto-mci-r9-20210101-20220101/predictions.npz",
        RUNS / "toronto/panels/toronto-mci-r9", "toronto-neighbourhoods", "visible_minority_group", "low_income_quintile",
        "Bias audit: Toronto MCI, test year 2021 (H3 res 9, 3 shifts a day)"),
}


def run_case(case: AuditCase, *, forecasters=("lightgbm", "naive"), coverages=HEADLINE_COVERAGES, n_boot: int = 1000,
             out_root: Path = OUT) -> BiasAudit:
    saved = np.load(case.predictions)
    panel = CountPanel.load(case.panel)
    if saved["observed"].shape[1] != panel.n_cells:
        raise ValueError(f"{case.predictions} has {saved['observed'].shape[1]} cells, the panel {panel.n_cells}")
    spec = get_preset(case.preset)
    join = spec.join(panel.study_area)
    splits = [population_split(join, partition=spec.partition, name=case.group_split, label=spec.group_label),
              quantile_split(join, spec.split, name=case.quantile_split, label=spec.split_label)]
    notes = list(spec.notes)
    layer = join.summary()
    if layer["area_coverage"] < 0.999:
        notes.append(f"The study area covers {layer['area_coverage']:.1%} of the layer's area and "
                     f"{layer['coverage']['total']:.1%} of its residents; {layer['cells_outside_layer']} cells lie "
                     "outside the layer (no residents, no quintile).")
    notes.append("Intervals resample days of the test year (forecast and crime variation); they do not include "
                 "census sampling error or the error of spreading each area's residents evenly over its cells.")
    result = audit({f: saved[f"pred_{f}"] for f in forecasters}, saved["observed"], saved["areas"], saved["origins"],
                   panel.calendar.per_day, splits, coverages=coverages, baseline="naive", n_boot=n_boot,
                   meta={"title": case.title, "case": case.name, "preset": case.preset,
                         "description": spec.description, "source": spec.source, "layer": layer, "notes": notes,
                         "predictions": str(case.predictions), "panel": str(case.panel),
                         "data_fingerprint": panel.fingerprint()})
    out = out_root / case.name
    out.mkdir(parents=True, exist_ok=True)
    png = bias_audit_png(result)
    (out / "audit.png").write_bytes(png)
    (out / "audit.json").write_text(result.to_json())
    (out / "audit.html").write_text(bias_audit_page(result, png))
    return result


def headline(result: BiasAudit) -> pl.DataFrame:
    """The key rows: exposure ratios (and the model's difference from the naive map) per group and coverage."""
    keep = ("exposure_ratio", "exposure_ratio_minus_naive", "exposure_to_crime_ratio")
    return (result.frame.filter(pl.col("measure").is_in(keep) | pl.col("measure").is_in(["population_share", "crime_share"]))
            .sort("split", "measure", "forecaster", "coverage", "group", nulls_last=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--city", action="append", choices=sorted(CASES), help="default: both")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for name in args.city or sorted(CASES):
        t0 = time.perf_counter()
        result = run_case(CASES[name], n_boot=args.n_boot, out_root=args.out)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s -> {args.out / name}")
        print(json.dumps(result.meta["layer"]["coverage"], indent=None))
        with pl.Config(tbl_rows=400, tbl_width_chars=160, float_precision=3):
            print(headline(result).select("split", "group", "forecaster", "coverage", "measure", "value", "low", "high"))


if __name__ == "__main__":
    main()
