"""The strongest traditional baseline, chosen the way a sceptical researcher would: on a validation window
that ends where the test period starts, among every non-learned forecaster, before the test period is seen.

Each baseline is fitted once at the window's start (on the panel cut there) and forecasts every shift of the
window from the history before that shift; the one with the best mean hit rate at the headline coverages is
the reference the claim test, the report and the promotion gate compare with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from features.panel import CountPanel
from forecasting.base import Forecaster
from forecasting.metrics import HEADLINE_COVERAGES, pooled, shift_hits

VALIDATION_DAYS = 56


@dataclass
class StrongestChoice:
    name: str
    hit_rates: dict[str, dict[str, float]]  # forecaster -> coverage -> validation hit rate
    pessimistic: dict[str, dict[str, float]]  # the same with pessimistic ties
    window_start: str  # local dates of the validation window [start, end)
    window_end: str
    n_shifts: int

    def score(self, name: str) -> float:
        return float(np.mean(list(self.hit_rates[name].values())))

    def sentence(self) -> str:
        others = ", ".join(f"{n} {self.score(n):.3f}" for n in sorted(self.hit_rates, key=self.score, reverse=True)
                           if n != self.name)
        at = ", ".join(f"{float(c):.0%}" for c in self.hit_rates[self.name])
        return (f"Strongest baseline: {self.name} (mean hit rate at {at} {self.score(self.name):.3f} on the validation "
                f"window {self.window_start} to {self.window_end}, before the test period"
                + (f"; {others}" if others else "") + ")")

    def as_dict(self) -> dict:
        return asdict(self)


def choose_strongest(panel: CountPanel, test_start: int, baselines: dict[str, Callable[[], Forecaster]],
                     valid_days: int = VALIDATION_DAYS, coverages=HEADLINE_COVERAGES) -> StrongestChoice:
    """Score ``baselines`` on the ``valid_days`` before shift ``test_start`` and name the best. The panel is cut
    at ``test_start`` first: nothing of the test period can reach the choice. The same as scoring each baseline
    anywhere (``validation_origins``, ``score_baseline``: a local process) and naming the best (``strongest_of``)."""
    if not baselines:
        raise ValueError("no baseline to choose the strongest from: include at least one non-learned forecaster")
    origins = validation_origins(panel, test_start, valid_days)
    scores = {name: score_baseline(panel, test_start, origins, make, coverages) for name, make in baselines.items()}
    return strongest_of(panel, test_start, origins, scores)


def validation_origins(panel: CountPanel, test_start: int, valid_days: int = VALIDATION_DAYS) -> np.ndarray:
    """The shifts of the validation window: the ``valid_days`` before ``test_start``, after the panel's first day."""
    per_day = panel.calendar.per_day
    start = max(panel.first_shift + per_day, int(test_start) - valid_days * per_day)
    origins = np.arange(start, int(test_start), dtype=np.int64)
    if origins.size < per_day:
        raise ValueError(f"no validation window before the test period: the panel starts at shift {panel.first_shift}, "
                         f"the test period at {test_start}; give the panel at least {valid_days} more days before it")
    return origins


Scores = tuple[dict[str, float], dict[str, float]]  # coverage -> hit rate, with random and with pessimistic ties


def score_baseline(panel: CountPanel, test_start: int, origins: np.ndarray, make: Callable[[], Forecaster],
                   coverages=HEADLINE_COVERAGES) -> Scores:
    """One baseline's validation hit rates: fitted at the window's start on the panel cut at ``test_start``,
    forecasting every shift of the window from the history before it. A pure function of its arguments."""
    known = panel.until(int(test_start))
    observed = known.dense(int(origins[0]), int(origins[-1]) + 1, dtype=np.float64)
    pred = make().fit(known, int(origins[0])).predict(known, origins)
    rates = []
    for ties in ("random", "pessimistic"):
        h = pooled(shift_hits(pred, observed, known.study_area.areas_km2, origins, coverages, ties=ties))["hit_rate"]
        rates.append({f"{c:g}": float(r) for c, r in zip(coverages, h)})
    return rates[0], rates[1]


def strongest_of(panel: CountPanel, test_start: int, origins: np.ndarray, scores: dict[str, Scores]) -> StrongestChoice:
    """The best mean validation hit rate (the first of equals in ``scores``' order) and every score."""
    rates = {name: score[0] for name, score in scores.items()}
    worst = {name: score[1] for name, score in scores.items()}
    best = max(rates, key=lambda n: (float(np.mean(list(rates[n].values()))), -list(rates).index(n)))
    cal = panel.calendar
    return StrongestChoice(best, rates, worst, str(cal.local_date(int(origins[0]))),
                           str(cal.local_date(int(test_start))), int(origins.size))
