"""The promotion gate: which backtested forecaster becomes a city's champion.

The reference is the *strongest traditional baseline*, chosen on a validation window before the test period
(:mod:`forecasting.strongest`). A challenger wins only if its backtest hit rate beats the reference's at every
gate coverage and, where the paired day-block bootstrap of its lead is given (``leads``: the lower end of the
interval of challenger minus reference), that interval lies above zero at every gate coverage: a lead the test
period cannot tell from zero is not a win. Among those that win, the best mean hit rate wins. When no forecaster
beats it, the reference itself wins: the product then serves the baseline, because that is the honest best map.

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


def ahead_of(summaries: dict, strongest: str, coverages=GATE_COVERAGES) -> list[str]:
    """The forecasters whose pooled hit rate is above the strongest baseline's at every coverage: those whose
    lead the gate then asks the paired interval about."""
    ref = [_rate(summaries[strongest], c) for c in coverages]
    return [name for name, s in summaries.items()
            if name != strongest and all(_rate(s, c) > r for c, r in zip(coverages, ref))]


def backtest_winner(summaries: dict, strongest: str, coverages=GATE_COVERAGES,
                    leads: dict[str, dict[float, float]] | None = None) -> tuple[str, str]:
    """(winner, why): the best forecaster that beats ``strongest`` at every coverage (and, for those ``leads``
    names, with the paired interval of its lead above zero there), else ``strongest``."""
    if strongest not in summaries:
        raise ValueError(f"the strongest baseline {strongest!r} is not in the backtest; it has {sorted(summaries)}")
    rates = {name: {f"{c:g}": _rate(s, c) for c in coverages} for name, s in summaries.items()}
    ref = rates[strongest]
    ahead = {name: rates[name] for name in ahead_of(summaries, strongest, coverages)}
    unclear = {name: [c for c in coverages if not (leads or {}).get(name, {}).get(c, np.inf) > 0] for name in ahead}
    beats = {name: r for name, r in ahead.items() if not unclear[name]}
    at = " and ".join(f"{c:.0%}" for c in coverages)
    if beats:
        winner = max(beats, key=lambda name: (np.mean(list(beats[name].values())), name))
        return winner, f"{winner} beats the strongest baseline, {strongest}, at {at}"
    losers = [f"{name} ({'; '.join(f'{float(k):.0%}: {v:.3f} vs {ref[k]:.3f}' for k, v in r.items() if not v > ref[k])})"
              for name, r in rates.items() if name != strongest and name not in ahead]
    ties = [f"{name} (ahead, but the paired interval of its lead includes zero at "
            f"{', '.join(f'{c:.0%} (low {leads[name][c]:+.4f})' for c in unclear[name])})"  # type: ignore[index]
            for name in ahead]
    return strongest, (f"no forecaster beats the strongest baseline, {strongest}, at {at}"
                       + (f": {', '.join(ties + losers)}" if ties or losers else "") + f"; {strongest} itself wins")


def promotion_decision(summaries: dict, strongest: str = "naive", coverages=GATE_COVERAGES,
                       candidate: str | None = None,
                       leads: dict[str, dict[float, float]] | None = None) -> PromotionDecision:
    """The gate for a registered ``candidate`` (None: the backtest's winner, which is then registered): it is
    promoted exactly when it is the winner."""
    winner, why = backtest_winner(summaries, strongest, coverages, leads)
    candidate = candidate or winner
    if candidate not in summaries:
        raise ValueError(f"candidate {candidate!r} is not in the backtest; it has {sorted(summaries)}")
    rates = {name: {f"{c:g}": _rate(s, c) for c in coverages} for name, s in summaries.items()}
    promote = candidate == winner
    reason = why if promote else f"{candidate} is not the winner: {why}"
    return PromotionDecision(promote, reason, rates[candidate], rates[strongest], tuple(coverages), winner, candidate,
                             strongest, rates)
