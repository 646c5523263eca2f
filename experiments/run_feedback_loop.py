"""Run every feedback-loop policy on Chicago (H3 resolution 9, the city's cells) for a simulated year.

The truth repeats Chicago's real 2016 pattern (a smoothed rate per cell x shift of day x weekday, see
``experiments.feedback_loop.intensity_from_history``), scaled so that the record under random patrols has the
real volume; ``--truth synthetic`` uses the synthetic Hawkes city on the same cells instead (its background from
the same 2016 rates, its exact conditional mean as the truth). A 91-day warm-up with random patrols builds the
first record, then 365 days (1,095 shifts) of closed loop with monthly refits.

    python -m experiments.run_feedback_loop                        # Chicago, every policy: 4-8 min, 1 thread
    python -m experiments.run_feedback_loop --report-prob 0.1 --discover-prob 0.8 --scale 2.4815 \
        --out experiments/results/feedback_loop/strong_discovery   # the same truth, patrols find most crime
    python -m experiments.run_feedback_loop --truth synthetic --days 120

Writes experiments/results/feedback_loop/{curves.png, measures.parquet, summary.json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

from experiments.feedback_loop import (
    MEASURES,
    Recording,
    SimulationConfig,
    World,
    default_policies,
    plot_measures,
    reference_policies,
    simulate,
    summarise,
    world_from_history,
    world_from_synthetic,
)
from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.panel import CountPanel
from features.pipeline import build_city_panel, ingest_file
from features.profile import load_profile
from features.store import IncidentStore

RESULTS = Path(__file__).parent / "results"
SHARED = Path(os.environ.get("HOTSPOTS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def chicago_panel(source: Path, boundary: Path, resolution: int, start: date, end: date) -> CountPanel:
    """Chicago incidents from ``start`` to ``end`` (local dates) as a count panel over the city's cells, through
    the project's ingest (validation, quarantine) and binning."""
    profile = load_profile("chicago")
    zone = ZoneInfo(profile.timezone)
    with tempfile.TemporaryDirectory() as tmp:
        store = IncidentStore(tmp)
        ingest_file(source, profile, store, write_report=False)
        # the read window only needs to cover the shifts; build_panel cuts at their exact boundaries
        lo, hi = (datetime(d.year, d.month, d.day, tzinfo=zone).astimezone(UTC) for d in (start, end))
        incidents = store.read("chicago", lo, hi + timedelta(days=1))
    area = StudyArea.from_file(boundary, resolution, layer="city_boundary_dissolved", name="chicago")
    calendar = ShiftCalendar(profile.timezone)
    first, stop = calendar.local_day(start) * calendar.per_day, calendar.local_day(end) * calendar.per_day
    return build_city_panel(incidents, profile, study_area=area, shift_starts=calendar.labels, first_shift=first,
                            end_shift=stop).panel


def calibrated_scale(recording: Recording, patrols: int, n_cells: int) -> float:
    """Scale of the real counts so the simulated record under random patrols has the real volume."""
    return 1.0 / (recording.report_prob + (1 - recording.report_prob) * recording.discover_prob * patrols / n_cells)


def build_world(args: argparse.Namespace, recording: Recording) -> World:
    panel = chicago_panel(args.source, args.boundary, args.resolution, date(args.history_year, 1, 1),
                          date(args.history_year + 1, 1, 1))
    per_day = panel.calendar.per_day
    warmup = args.warmup_days * per_day
    first = panel.calendar.local_day(args.start) * per_day - warmup
    n_shifts = warmup + args.days * per_day
    scale = args.scale or calibrated_scale(recording, args.patrols, panel.n_cells)
    if args.truth == "history":
        world = world_from_history(panel, panel.first_shift, panel.end_shift, first, n_shifts, scale=scale,
                                   name=f"chicago-r{args.resolution}-{args.history_year}")
    else:
        from features.synthetic import SyntheticCity, background_from_rates
        from features.synthetic import simulate as simulate_city

        counts = panel.cell_totals(panel.first_shift, panel.end_shift)
        span = panel.calendar.starts_utc([panel.first_shift, panel.end_shift])
        hours = float((span[1] - span[0]) / np.timedelta64(1, "h"))
        background = background_from_rates(panel.study_area, counts * scale * (1 - args.branching), hours)
        city = SyntheticCity(panel.study_area, panel.calendar, background, branching_ratio=args.branching,
                             decay_per_hour=1 / 48)
        result = simulate_city(city, first, first + n_shifts, seed=args.seed, burn_in_shifts=60 * per_day)
        world = world_from_synthetic(result, name=f"synthetic-chicago-r{args.resolution}")
    world.meta.update({"scale": scale, "history_year": args.history_year})
    return world


def add_world_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The world and loop settings shared by this script and the benchmark."""
    parser.add_argument("--source", type=Path, default=SHARED / "chicago" / "chicago_crimes_2001_2018.parquet")
    parser.add_argument("--boundary", type=Path, default=SHARED / "areas" / "chicago.gpkg")
    parser.add_argument("--truth", choices=["history", "synthetic"], default="history")
    parser.add_argument("--resolution", type=int, default=9)
    parser.add_argument("--history-year", type=int, default=2016)
    parser.add_argument("--start", type=date.fromisoformat, default=date(2017, 1, 1), help="first closed-loop day")
    parser.add_argument("--days", type=int, default=365, help="closed-loop days (3 shifts each)")
    parser.add_argument("--warmup-days", type=int, default=91)
    parser.add_argument("--patrols", type=int, default=60, help="patrols per shift (60 = 1%% of Chicago's cells)")
    parser.add_argument("--report-prob", type=float, default=0.4)
    parser.add_argument("--discover-prob", type=float, default=0.5)
    parser.add_argument("--scale", type=float, default=None, help="truth = scale x real rate (default: calibrated)")
    parser.add_argument("--branching", type=float, default=0.3, help="synthetic truth: Hawkes branching ratio")
    parser.add_argument("--explore-share", type=float, default=0.1)
    parser.add_argument("--window-days", type=int, default=28)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def check_inputs(args: argparse.Namespace) -> None:
    for path in (args.source, args.boundary):
        if not path.is_file():
            raise SystemExit(f"no input at {path}: set HOTSPOTS_SHARED_DATA or pass --source/--boundary")


def loop_config(args: argparse.Namespace, recording: Recording, per_day: int) -> SimulationConfig:
    return SimulationConfig(patrols=args.patrols, recording=recording, warmup_shifts=args.warmup_days * per_day,
                            window_shifts=args.window_days * per_day, seed=args.seed)


def main() -> None:
    parser = add_world_arguments(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--policies", nargs="*", default=None, help="subset of policy names (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "feedback_loop")
    args = parser.parse_args()
    check_inputs(args)

    started = time.perf_counter()
    recording = Recording(args.report_prob, args.discover_prob)
    world = build_world(args, recording)
    per_day = world.calendar.per_day
    print(f"world {world.name}: {world.n_cells:,} cells, {world.n_shifts:,} shifts, "
          f"{world.expected.sum() / world.n_shifts:.1f} true incidents per shift "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    policies = default_policies(args.num_threads, args.seed, args.explore_share) + reference_policies(world)
    if args.policies:
        unknown = set(args.policies) - {p.name for p in policies}
        if unknown:
            raise SystemExit(f"unknown policies {sorted(unknown)}; known: {[p.name for p in policies]}")
        policies = [p for p in policies if p.name in args.policies]
    config = loop_config(args, recording, per_day)
    result = simulate(world, policies, config, progress=lambda m: print(m, flush=True))

    args.out.mkdir(parents=True, exist_ok=True)
    result.measures.write_parquet(args.out / "measures.parquet")
    title = (f"{world.name}: {world.n_cells:,} cells, {args.patrols} patrols/shift, report {args.report_prob}, "
             f"discover {args.discover_prob}, {args.days} days after a {args.warmup_days}-day random warm-up, monthly refits")
    plot_measures(result.measures, args.out / "curves.png", per_day, title)
    summary = {
        "world": {"name": world.name, "cells": world.n_cells, "truth": args.truth, **world.meta,
                  "true_per_shift": float(world.expected.sum() / world.n_shifts)},
        "config": {"patrols": args.patrols, "report_prob": args.report_prob, "discover_prob": args.discover_prob,
                   "warmup_days": args.warmup_days, "days": args.days, "shifts": args.days * per_day,
                   "window_days": args.window_days, "explore_share": args.explore_share, "refit": "monthly",
                   "seed": args.seed, "num_threads": args.num_threads, "start": str(args.start)},
        "measures": list(MEASURES),
        "summary_note": "start/end: mean over the first/last 7 simulated days; trend: least-squares slope per 30 days",
        "policies": summarise(result.measures, per_day),
        "incidents_in_loop": result.totals,
        "seconds": result.seconds,
        "refits": {k: len(v) for k, v in result.refits.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "when": datetime.now().isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, measures in summary["policies"].items():
        print(f"{name:<18} " + "  ".join(f"{m} {v['start']:.3f}->{v['end']:.3f}" for m, v in measures.items()))
    print(f"written to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
