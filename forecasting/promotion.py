"""The promotion gate: which backtested forecaster becomes a city's champion.

The reference is the *strongest traditional baseline*, chosen on a validation window before the test period
(:mod:`forecasting.strongest`). A challenger wins only if its backtest hit rate beats the reference's at every
gate coverage; among those that do, the best mean hit rate wins. When no forecaster beats it, the reference
itself wins: the product then serves the baseline, because that is the honest best map.

Pure computation on backtest summaries; moving the registry alias is the tracking layer's job
(:func:`forecasting.reporting.tracking.apply_promotion`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from forecasting.metrics import HEADLINE_COVERAGES

GATE_COVERAGES = HEADLINE_COVERAGES


@dataclass
class PromotionDecision:
    promote: bool
    reason: str
    candidate_hit_rates: dict[str, float]
    baseline_hit_rates: dict[str, float]
    coverages: tuple[float, ...] = GATE_COVERAGES
    winner: str | None = None
    candidate: str | None = None
    baseline: str | None = None  # the strongest baseline the gate compared with
    hit_rates: dict[str, dict[str, float]] = field(default_factory=dict)  # every forecaster, for the record

    def as_dict(self) -> dict:
        return asdict(self)


def _rate(summary, cov: float) -> float:
    j = int(np.argmin(np.abs(summary.coverages - cov)))
    if abs(summary.coverages[j] - cov) > 1e-9:
        raise ValueError(f"the backtest has no coverage {cov}")
    return float(summary.point["hit_rate"][j])


def backtest_winner(summaries: dict, strongest: str, coverages=GATE_COVERAGES) -> tuple[str, str]:
    """(winner, why): the best forecaster that beats ``strongest`` at every coverage, else ``strongest``."""
    if strongest not in summaries:
        raise ValueError(f"the strongest baseline {strongest!r} is not in the backtest; it has {sorted(summaries)}")
    rates = {name: {f"{c:g}": _rate(s, c) for c in coverages} for name, s in summaries.items()}
    ref = rates[strongest]
    beats = {name: r for name, r in rates.items() if name != strongest and all(r[k] > ref[k] for k in ref)}
    at = " and ".join(f"{c:.0%}" for c in coverages)
    if beats:
        winner = max(beats, key=lambda name: (np.mean(list(beats[name].values())), name))
        return winner, f"{winner} beats the strongest baseline, {strongest}, at {at}"
    losers = [f"{name} ({'; '.join(f'{float(k):.0%}: {v:.3f} vs {ref[k]:.3f}' for k, v in r.items() if not v > ref[k])})"
              for name, r in rates.items() if name != strongest]
    return strongest, (f"no forecaster beats the strongest baseline, {strongest}, at {at}"
                       + (f": {', '.join(losers)}" if losers else "") + f"; {strongest} itself wins")


def promotion_decision(summaries: dict, strongest: str = "naive", coverages=GATE_COVERAGES,
                       candidate: str | None = None) -> PromotionDecision:
    """The gate for a registered ``candidate`` (None: the backtest's winner, which is then registered): it is
    promoted exactly when it is the winner."""
    winner, why = backtest_winner(summaries, strongest, coverages)
    candidate = candidate or winner
    if candidate not in summaries:
        raise ValueError(f"candidate {candidate!r} is not in the backtest; it has {sorted(summaries)}")
    rates = {name: {f"{c:g}": _rate(s, c) for c in coverages} for name, s in summaries.items()}
    promote = candidate == winner
    reason = why if promote else f"{candidate} is not the winner: {why}"
    return PromotionDecision(promote, reason, rates[candidate], rates[strongest], tuple(coverages), winner, candidate,
                             strongest, rates)
