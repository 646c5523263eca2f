"""The promotion gate: which backtested forecaster may become a city's champion.

Pure computation on backtest summaries; moving the registry alias is the tracking layer's job
(:func:`forecasting.reporting.tracking.apply_promotion`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from forecasting.metrics import HEADLINE_COVERAGES

GATE_COVERAGES = HEADLINE_COVERAGES


@dataclass
class PromotionDecision:
    promote: bool
    reason: str
    candidate_hit_rates: dict[str, float]
    naive_hit_rates: dict[str, float]
    coverages: tuple[float, ...] = GATE_COVERAGES

    def as_dict(self) -> dict:
        return asdict(self)


def promotion_decision(summaries: dict, candidate: str = "lightgbm", baseline: str = "naive",
                       coverages=GATE_COVERAGES) -> PromotionDecision:
    """The gate: the candidate's backtest hit rate must beat the naive baseline's at every gate coverage."""
    cand, base = summaries[candidate], summaries[baseline]
    c_rates, b_rates, failures = {}, {}, []
    for cov in coverages:
        j = int(np.argmin(np.abs(cand.coverages - cov)))
        if abs(cand.coverages[j] - cov) > 1e-9:
            raise ValueError(f"the backtest has no coverage {cov}")
        c, b = float(cand.point["hit_rate"][j]), float(base.point["hit_rate"][j])
        c_rates[f"{cov:g}"], b_rates[f"{cov:g}"] = c, b
        if not c > b:
            failures.append(f"{cov:.0%}: {c:.3f} <= {b:.3f}")
    reason = "beats naive at " + " and ".join(f"{c:.0%}" for c in coverages) if not failures else "does not beat naive at " + "; ".join(failures)
    return PromotionDecision(not failures, reason, c_rates, b_rates, tuple(coverages))
