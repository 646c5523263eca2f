"""Paired comparison of the candidate with every other forecaster of a saved backtest (ratio and difference of
hit rates with day-block bootstrap intervals), written next to it as pairwise.json.

    python -m experiments.pairwise data/backtests/toronto-mci-r9-20210101-20220101
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from forecasting.claim import against_every_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backtest_dir", type=Path)
    parser.add_argument("--candidate", default="lightgbm")
    parser.add_argument("--per-day", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data = np.load(args.backtest_dir / "predictions.npz")
    predictions = {k[5:]: data[k] for k in data.files if k.startswith("pred_")}
    results = against_every_baseline(predictions, data["observed"], data["areas"], data["origins"], args.per_day,
                                     candidate=args.candidate)
    for r in results:
        print(f"{r.candidate} vs {r.baseline} at {r.coverage:.0%}: difference {r.difference:+.4f} "
              f"(95% CI {r.difference_low:+.4f} to {r.difference_high:+.4f}), "
              f"ratio {r.ratio:.3f} ({r.ratio_low:.3f}-{r.ratio_high:.3f})")
    out = args.out or args.backtest_dir / "pairwise.json"
    out.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
