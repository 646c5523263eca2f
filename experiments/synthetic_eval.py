"""How close does each forecaster get to the best possible one? A synthetic city with a known intensity.

The city is Toronto's real study area; its background rate per cell is Toronto's real long-run rate (so the
spatial pattern is real), with self-excitation (Hawkes) on top. ``TrueIntensity`` forecasts the model's exact
conditional expectation, the ceiling no forecaster can beat on average. The backtest reports each forecaster's
hit rate at 5% (and 1%) of the area as a share of the ceiling's.

    python -m experiments.synthetic_eval --resolution 8 --years 3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.panel import CountPanel, with_cells
from features.profile import load_profile
from features.synthetic import SyntheticCity, SyntheticResult, background_from_rates, simulate
from forecasting.backtest import default_forecasters, run_backtest
from forecasting.base import Forecaster
from forecasting.metrics import HEADLINE_COVERAGES

RESULTS = Path(__file__).parent / "results"


@dataclass
class TrueIntensity(Forecaster):
    """The oracle: the simulation's exact expected count given everything before the shift."""

    truth: SyntheticResult | None = None
    name: str = field(default="true_intensity", init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        pass

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        return self.truth.true_expected[origins - self.truth.first_shift]


def synthetic_toronto(resolution: int, years: int, seed: int, branching: float, spread: float):
    from tempfile import TemporaryDirectory

    from features.pipeline import ingest_file
    from features.sources.toronto import materialise
    from features.store import IncidentStore

    with TemporaryDirectory() as tmp:
        store = IncidentStore(tmp)
        ingest_file(materialise(Path(tmp) / "t.csv"), load_profile("toronto-mci"), store, write_report=False)
        real = with_cells(store.read("toronto-mci"), resolution)
    area = StudyArea.from_cells(real["h3_cell"].to_numpy(), resolution, name="toronto")
    calendar = ShiftCalendar("America/Toronto")
    counts = np.bincount(area.index_of(real["h3_cell"].to_numpy()), minlength=len(area))
    hours = (real["occurred_at"].max() - real["occurred_at"].min()).total_seconds() / 3600
    # the real spatial pattern, thinned so the background plus its offspring matches the real volume
    background = background_from_rates(area, counts * (1 - branching), hours)
    city = SyntheticCity(area, calendar, background, branching_ratio=branching, decay_per_hour=1 / 48, spread=spread)
    first = calendar.shift_of(datetime(2019, 1, 1, 12, tzinfo=UTC))
    truth = simulate(city, first, first + years * 3 * 365, seed=seed, burn_in_shifts=3 * 60)
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=9)
    parser.add_argument("--years", type=int, default=3)
    parser.add_argument("--test-months", type=int, default=12)
    parser.add_argument("--branching", type=float, default=0.3)
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "synthetic_eval.json")
    args = parser.parse_args()

    truth = synthetic_toronto(args.resolution, args.years, args.seed, args.branching, args.spread)
    panel = truth.panel()
    last_day = date(1970, 1, 1) + timedelta(days=(panel.end_shift - 1) // panel.calendar.per_day)
    test_end = date(last_day.year, last_day.month, 1)
    year, month = divmod(test_end.year * 12 + test_end.month - 1 - args.test_months, 12)
    test_start = date(year, month + 1, 1)
    forecasters = default_forecasters() | {"true_intensity": lambda: TrueIntensity(truth=truth)}
    result = run_backtest(panel, test_start, test_end, forecasters, progress=print)
    summaries = result.summaries(coverages=HEADLINE_COVERAGES, n_boot=500)
    ceiling = summaries["true_intensity"].point["hit_rate"]
    table = {}
    for name, s in summaries.items():
        table[name] = {
            "hit_rate_1pct": float(s.point["hit_rate"][0]), "hit_rate_5pct": float(s.point["hit_rate"][1]),
            "share_of_ceiling_1pct": float(s.point["hit_rate"][0] / ceiling[0]),
            "share_of_ceiling_5pct": float(s.point["hit_rate"][1] / ceiling[1]),
            "hit_rate_5pct_ci": [float(s.low["hit_rate"][1]), float(s.high["hit_rate"][1])],
        }
        print(f"{name:<15} HR@5% {table[name]['hit_rate_5pct']:.3f} = {table[name]['share_of_ceiling_5pct']:.1%} of the ceiling"
              f"   HR@1% {table[name]['hit_rate_1pct']:.3f} = {table[name]['share_of_ceiling_1pct']:.1%}")
    out = {"resolution": args.resolution, "cells": panel.n_cells, "incidents": truth.incidents.height,
           "branching_ratio": args.branching, "spread": args.spread, "seed": args.seed,
           "test": [str(test_start), str(test_end)], "results": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
