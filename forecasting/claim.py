"""The claim test: is the candidate at least ``ratio`` times as effective as the baseline?

Effectiveness is the pooled hit rate at a given area coverage. The ratio's confidence interval comes from a
paired day-block bootstrap: each replicate resamples whole days and evaluates both forecasters on the same
days, so their shared day-to-day variation cancels. The verdict is read off the interval:

* supported: the whole interval is at or above the claimed ratio;
* refuted: the whole interval is below it;
* undetermined: the interval straddles it (the data cannot tell).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from forecasting.metrics import HEADLINE_COVERAGES, bootstrap_weights, day_blocks, shift_hits
from forecasting.references import NO_HEADROOM, headroom_share


@dataclass
class ClaimResult:
    candidate: str
    baseline: str
    coverage: float
    claimed_ratio: float
    candidate_hit_rate: float
    baseline_hit_rate: float
    ratio: float
    ratio_low: float
    ratio_high: float
    difference: float
    difference_low: float
    difference_high: float
    level: float
    n_boot: int
    n_shifts: int
    verdict: str

    def sentence(self) -> str:
        pct = round((self.claimed_ratio - 1) * 100)
        return (
            f"At {self.coverage:.1%} of the area, {self.candidate} hit rate {self.candidate_hit_rate:.3f} vs "
            f"{self.baseline} {self.baseline_hit_rate:.3f}: ratio {self.ratio:.2f} "
            f"({self.level:.0%} CI {self.ratio_low:.2f}-{self.ratio_high:.2f}). "
            f"'At least {pct}% more effective' is {self.verdict.upper()}."
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def headroom_share(self, ceiling: float) -> float | None:
        """The candidate's share of the headroom between the baseline and ``ceiling`` (the shift-of-day
        clairvoyant hit rate at this coverage); None when there is no headroom."""
        return headroom_share(self.candidate_hit_rate, self.baseline_hit_rate, ceiling)

    def headroom_sentence(self, ceiling: float) -> str:
        share = self.headroom_share(ceiling)
        if share is None:
            return (f"At {self.coverage:.1%} of the area there is {NO_HEADROOM}: the shift-of-day clairvoyant "
                    f"ceiling {ceiling:.3f} is not above {self.baseline} {self.baseline_hit_rate:.3f}.")
        return (f"At {self.coverage:.1%} of the area {self.candidate} has covered {share:.0%} of the headroom "
                f"between {self.baseline} ({self.baseline_hit_rate:.3f}) and the shift-of-day clairvoyant ceiling "
                f"({ceiling:.3f}, a reference no forecaster can use).")


def verdict(low: float, high: float, claimed: float) -> str:
    if low >= claimed:
        return "supported"
    if high < claimed:
        return "refuted"
    return "undetermined"


def claim_test(
    candidate: np.ndarray, baseline: np.ndarray, observed: np.ndarray, areas: np.ndarray, shift_ids: np.ndarray,
    per_day: int, *, coverages=HEADLINE_COVERAGES, claimed_ratio: float = 1.5, n_boot: int = 2000, level: float = 0.95,
    seed: int = 0, names: tuple[str, str] = ("candidate", "baseline"),
) -> list[ClaimResult]:
    hc = shift_hits(candidate, observed, areas, shift_ids, coverages)
    hb = shift_hits(baseline, observed, areas, shift_ids, coverages)
    weights = bootstrap_weights(day_blocks(shift_ids, per_day), n_boot, seed)
    crimes = weights @ hc.crimes  # (n_boot,)
    rate_c = (weights @ hc.hits) / crimes[:, None]
    rate_b = (weights @ hb.hits) / crimes[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = rate_c / rate_b
    alpha = (1 - level) / 2
    out = []
    total = hc.crimes.sum()
    for j, cov in enumerate(hc.coverages):
        point_c, point_b = hc.hits[:, j].sum() / total, hb.hits[:, j].sum() / total
        r_low, r_high = np.nanquantile(ratios[:, j], [alpha, 1 - alpha])
        d_low, d_high = np.quantile(rate_c[:, j] - rate_b[:, j], [alpha, 1 - alpha])
        out.append(
            ClaimResult(
                candidate=names[0], baseline=names[1], coverage=float(cov), claimed_ratio=claimed_ratio,
                candidate_hit_rate=float(point_c), baseline_hit_rate=float(point_b),
                ratio=float(point_c / point_b) if point_b > 0 else float("inf"),
                ratio_low=float(r_low), ratio_high=float(r_high),
                difference=float(point_c - point_b), difference_low=float(d_low), difference_high=float(d_high),
                level=level, n_boot=n_boot, n_shifts=int(np.asarray(shift_ids).size),
                verdict=verdict(float(r_low), float(r_high), claimed_ratio),
            )
        )
    return out


def against_every_baseline(
    predictions: dict[str, np.ndarray], observed: np.ndarray, areas: np.ndarray, shift_ids: np.ndarray, per_day: int,
    *, candidate: str, coverages=HEADLINE_COVERAGES, n_boot: int = 2000, seed: int = 0,
) -> list[ClaimResult]:
    """'Is the candidate better at all?' (claimed ratio 1) against every other forecaster, with the paired
    interval of the difference in hit rate: the evidence that it is ahead of each baseline, or not."""
    return [
        result
        for name, pred in predictions.items() if name != candidate
        for result in claim_test(predictions[candidate], pred, observed, areas, shift_ids, per_day, coverages=coverages,
                                 claimed_ratio=1.0, n_boot=n_boot, seed=seed, names=(candidate, name))
    ]
