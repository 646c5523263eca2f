"""Model selection on a validation period that precedes the test period (never the test period itself).

Compares a few LightGBM settings with the strongest baselines over a pre-test period and prints hit rate and
PAI at 1% and 5% of the area; the chosen setting becomes the default before the test year is run once.

    python -m experiments.select_lightgbm --panel data/panels/toronto-mci-r9 --start 2020-07-01 --end 2021-01-01
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from features.panel import CountPanel
from forecasting.backtest import run_backtest
from forecasting.baselines import SEPP, Naive
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import HEADLINE_COVERAGES

CANDIDATES = {
    "lgbm_default": lambda: LightGBMForecaster(),
    "lgbm_regularised": lambda: LightGBMForecaster(num_leaves=15, min_child_samples=300, learning_rate=0.03),
    "lgbm_one_year": lambda: LightGBMForecaster(train_days=365),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--panel", type=Path, required=True)
    parser.add_argument("--start", type=date.fromisoformat, required=True)
    parser.add_argument("--end", type=date.fromisoformat, required=True)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    panel = CountPanel.load(args.panel)
    forecasters = {name: CANDIDATES[name] for name in args.candidates}
    forecasters |= {"sepp": lambda: SEPP(warm_start=True), "naive": lambda: Naive()}
    result = run_backtest(panel, args.start, args.end, forecasters, progress=print)
    rows = {}
    for name, s in result.summaries(coverages=HEADLINE_COVERAGES, n_boot=200).items():
        rows[name] = {"hit_rate": s.point["hit_rate"].round(4).tolist(), "pai": s.point["pai"].round(2).tolist(),
                      "deviance": round(s.deviance, 5), "fit_seconds": round(result.fit_seconds[name], 1)}
        print(f"{name:<18} HR@1% {rows[name]['hit_rate'][0]:.4f}  HR@5% {rows[name]['hit_rate'][1]:.4f}  "
              f"dev {rows[name]['deviance']:.5f}  fit {rows[name]['fit_seconds']:.0f}s")
    out = args.out or Path(__file__).parent / "results" / f"selection-{args.panel.name}-{args.start}-{args.end}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"panel": str(args.panel), "start": str(args.start), "end": str(args.end), "results": rows},
                              indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
