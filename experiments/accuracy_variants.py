"""Validation study of the accuracy variants of issue 15 (resolution 9, three 8-hour shifts 06/14/22).

Every variant is fitted ONCE at the validation cutoff (no monthly refits, to save time) and forecasts every shift
of the validation window from the history before that shift: Toronto cutoff 2020-09-01, window Sep 1 - Dec 31
2020; Chicago cutoff 2016-09-01, window Sep - Dec 2016 (history from 2012). The test years are never read.

For each variant: hit rate at 1% and 5% of the area (random and pessimistic ties), the same for the baselines the
strongest is chosen from (exp_weighted, last_year, sepp, all_history; "strongest" is the best of them at each
coverage and tie rule, on this same window: the toughest reference), the shift-of-day clairvoyant ceiling (each
cell's validation-period total in the origin's shift of day, used as the score: a reference no forecaster can
use), the headroom share (model - strongest) / (ceiling - strongest), and the fit seconds (with the load average).

LightGBM runs with light settings so each fit stays short on a loaded machine: learning_rate 0.1 (then the default
was 0.05; h15speed has since made 0.1, 30 early-stopping rounds and max_bin 63 the defaults); every variant of a
round uses the same ones. Round 1 (accuracy_variants-<city>.json) ran before those speed defaults, round 2
(accuracy_variants-toronto-round2.json) after them; compare variants within a round only.

    python -m experiments.accuracy_variants toronto [--variants default,multiscale,...]
    python -m experiments.accuracy_variants chicago --variants default,both
writes experiments/results/accuracy_variants-<city>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl

from features.matrix import FeatureConfig
from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.base import Forecaster
from forecasting.baselines import SEPP, ExpWeighted, HistoryCounts
from forecasting.blend import Blend
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import HEADLINE_COVERAGES, pooled, shift_hits

RESULTS = Path(__file__).parent / "results"
SHIFTS = ("06:00", "14:00", "22:00")
LIGHT = dict(learning_rate=0.1)
MULTISCALE = dict(parent_resolutions=(8, 7), spatial_all_history=True)
SEASONAL = dict(seasonal=True)
BOTH = MULTISCALE | SEASONAL
CITIES = {"toronto": (date(2020, 9, 1), date(2021, 1, 1)), "chicago": (date(2016, 9, 1), date(2017, 1, 1))}


def lgbm(features: dict | None = None, **params) -> Callable[[], Forecaster]:
    return lambda: LightGBMForecaster(**(LIGHT | params), features=replace(FeatureConfig(), **(features or {})))


VARIANTS: dict[str, Callable[[], Forecaster]] = {
    "default": lgbm(),
    "multiscale": lgbm(MULTISCALE),
    "seasonal": lgbm(SEASONAL),
    "both": lgbm(BOTH),
    "rank_xendcg": lgbm(BOTH, objective="rank_xendcg"),
    "lambdarank": lgbm(BOTH, objective="lambdarank"),
    "recency_all": lgbm(BOTH, train_days=None, recency_half_life_days=365.0),
    "blend": lambda: Blend(model=lgbm(BOTH)()),
    "blend_sepp": lambda: Blend(model=lgbm(BOTH)(), baseline=SEPP(warm_start=True)),
}
BASELINES: dict[str, Callable[[], Forecaster]] = {
    "exp_weighted": ExpWeighted, "last_year": lambda: HistoryCounts(window_days=365), "sepp": lambda: SEPP(warm_start=True),
    "all_history": HistoryCounts,
}


def toronto_panel() -> CountPanel:
    """The data folder's Toronto resolution-9 panel (``hotspots ingest toronto-mci && hotspots panel toronto-mci``)."""
    return CountPanel.load(DataPaths(Settings()).panel("toronto-mci", 9))


def chicago_panel(cache: Path) -> CountPanel:
    """Chicago 2012-2016 (the test year 2017 is never read), binned once and cached outside the repository."""
    folder = cache / "chicago-2012-2016-r9"
    if (folder / "panel.json").exists():
        return CountPanel.load(folder)
    from features.pipeline import build_city_panel, ingest_file
    from features.profile import load_profile
    from features.store import IncidentStore

    shared = Path(os.environ.get("HOTSPOTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    raw = cache / "chicago_2012_2016.parquet"
    year = pl.col("Date").str.slice(6, 4).cast(pl.Int32, strict=False)
    pl.scan_parquet(shared / "chicago" / "chicago_crimes_2001_2018.parquet").filter(year.is_between(2012, 2016)) \
        .collect().write_parquet(raw)
    store = IncidentStore(cache / "store")
    profile = load_profile("chicago")
    ingest_file(raw, profile, store, write_report=False)
    incidents = store.read("chicago", start=datetime(2012, 1, 1, 6, tzinfo=UTC), end=datetime(2017, 1, 1, 6, tzinfo=UTC))
    panel = build_city_panel(incidents, profile, resolution=9, shift_starts=SHIFTS).panel
    panel.save(folder)
    return panel


def rates(pred: np.ndarray, observed: np.ndarray, areas: np.ndarray, origins: np.ndarray) -> dict[str, list[float]]:
    out = {}
    for ties in ("random", "pessimistic"):
        hits = shift_hits(pred, observed, areas, origins, HEADLINE_COVERAGES, ties=ties)
        out[ties] = [float(v) for v in pooled(hits)["hit_rate"]]
    return out


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("city", choices=sorted(CITIES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hotspots-accuracy"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-references", action="store_true",
                        help="variants only (a parallel run); --merge adds them to the main results")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="variant results of parallel runs to merge")
    args = parser.parse_args()
    out = args.out or RESULTS / f"accuracy_variants-{args.city}.json"
    if args.merge:
        result = json.loads(out.read_text())
        for part in args.merge:
            result["variants"].update(json.loads(part.read_text())["variants"])
        out.write_text(json.dumps(with_shares(result), indent=2))
        print(table(result))
        return
    panel = toronto_panel() if args.city == "toronto" else chicago_panel(args.cache)
    start, end = CITIES[args.city]
    per_day = panel.calendar.per_day
    cutoff, stop = panel.calendar.local_day(start) * per_day, panel.calendar.local_day(end) * per_day
    known = panel.until(stop)  # nothing after the validation window exists for this study
    origins = np.arange(cutoff, stop, dtype=np.int64)
    observed = known.dense(cutoff, stop, dtype=np.float64)
    areas = known.study_area.areas_km2

    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"city": args.city, "cutoff": str(start), "window_end": str(end), "shifts": int(origins.size),
                   "cells": known.n_cells, "light_lightgbm": LIGHT, "protocol": "one fit at the cutoff, no refits"})
    refs = result.setdefault("references", {})
    if "ceiling_shift_of_day" not in refs and not args.no_references:
        by_sod = np.stack([observed[origins % per_day == k].sum(axis=0) for k in range(per_day)])
        refs["ceiling_shift_of_day"] = rates(by_sod[origins % per_day], observed, areas, origins)
        for name, make in BASELINES.items():
            t0 = time.perf_counter()
            pred = make().fit(known, cutoff).predict(known, origins)
            refs[name] = rates(pred, observed, areas, origins) | {"seconds": round(time.perf_counter() - t0, 1)}
            print(name, refs[name], flush=True)
    variants = result.setdefault("variants", {})
    for name in args.variants.split(","):
        load = load_average()
        t0 = time.perf_counter()
        model = VARIANTS[name]().fit(known, cutoff)
        seconds = time.perf_counter() - t0
        pred = model.predict(known, origins)
        scored = rates(pred, observed, areas, origins)
        variants[name] = scored | {"fit_seconds": round(seconds, 1), "load_before": load,
                                   "load_after": load_average(), "fit_summary": model.fit_summary(),
                                   "params": {k: repr(v) for k, v in model.get_params(deep=True).items()}}
        print(name, scored, f"{seconds:.0f} s (load {load})", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(with_shares(result), indent=2))
    if "strongest" in with_shares(result):
        print(table(result))


def with_shares(result: dict) -> dict:
    """The strongest baseline (best of BASELINES at each coverage and tie rule) and each variant's headroom share
    (model - strongest) / (ceiling - strongest)."""
    refs = result.get("references", {})
    if "ceiling_shift_of_day" not in refs:
        return result
    strongest = {ties: [max(refs[b][ties][i] for b in BASELINES) for i in range(len(HEADLINE_COVERAGES))]
                 for ties in ("random", "pessimistic")}
    ceiling = refs["ceiling_shift_of_day"]
    result["strongest"] = strongest
    for r in result["variants"].values():
        r["headroom_share"] = {ties: [(m - s) / (c - s) for m, s, c in zip(r[ties], strongest[ties], ceiling[ties])]
                               for ties in ("random", "pessimistic")}
    return result


def table(result: dict) -> str:
    """Markdown: hit rates at 1%/5% (random | pessimistic ties), headroom shares, fit seconds."""
    head = ("| variant | 1% | 5% | 1% pess. | 5% pess. | headroom 1% | headroom 5% | headroom 1% pess. | "
            "headroom 5% pess. | fit s (load) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]

    def pct(v):
        return f"{100 * v:.2f}"

    for name, r in result["references"].items():
        lines.append(f"| {name} (reference) | {pct(r['random'][0])} | {pct(r['random'][1])} | {pct(r['pessimistic'][0])} "
                     f"| {pct(r['pessimistic'][1])} | | | | | {r.get('seconds', '')} |")
    s = result["strongest"]
    lines.append(f"| strongest baseline | {pct(s['random'][0])} | {pct(s['random'][1])} | {pct(s['pessimistic'][0])} "
                 f"| {pct(s['pessimistic'][1])} | 0 | 0 | 0 | 0 | |")
    for name, r in result["variants"].items():
        h = r["headroom_share"]
        lines.append(f"| {name} | {pct(r['random'][0])} | {pct(r['random'][1])} | {pct(r['pessimistic'][0])} | "
                     f"{pct(r['pessimistic'][1])} | {h['random'][0]:.0%} | {h['random'][1]:.0%} | {h['pessimistic'][0]:.0%} | "
                     f"{h['pessimistic'][1]:.0%} | {r['fit_seconds']} ({r['load_before']}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
