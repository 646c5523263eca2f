"""Clairvoyant reference maps: how far any forecaster could get, scored the same way as the forecasters.

Both maps are made from the test period's *own* observed counts, so no forecaster can use them; they are
references, never forecasters (they never enter the registry, the strongest-baseline choice, the promotion
gate, the claim test or ``forecasts.parquet``):

* ``static_clairvoyant``: each cell's mean count over the whole test period (knows *where*);
* ``shift_of_day_clairvoyant``: each cell's mean count over the test shifts of the same shift of day (knows
  *where* and *when in the day*): the ceiling the headroom share is measured against. Its ties are ordered
  like any forecaster's (random, and the pessimistic bound), so over a short test period, where many cells tie
  within a shift of day, it can fall below the static map by tie luck; over a year it does not.

The headroom share of a forecaster, ``(model - strongest) / (ceiling - strongest)`` in hit rate, says how much
of the distance between the strongest traditional baseline and that ceiling it has covered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from forecasting.metrics import DEFAULT_COVERAGES, HEADLINE_COVERAGES, MetricSummary, pooled, shift_hits, summarise_all

STATIC = "static_clairvoyant"
CEILING = "shift_of_day_clairvoyant"
LABELS = {
    STATIC: "the test period's own counts per cell (a reference no forecaster can use)",
    CEILING: "the test period's own counts per cell and shift of day (a reference no forecaster can use; the ceiling)",
}
NO_HEADROOM = "no headroom"


def clairvoyant_maps(observed: np.ndarray, origins: np.ndarray, per_day: int) -> dict[str, np.ndarray]:
    """Both reference maps, shape (n_shifts, n_cells) like a forecaster's, as mean counts per shift."""
    observed = np.atleast_2d(np.asarray(observed, dtype=np.float64))
    slot = np.asarray(origins, dtype=np.int64) % int(per_day)  # shift id = local day x per_day + shift of day
    if slot.shape != (observed.shape[0],):
        raise ValueError(f"origins {slot.shape} do not match observed {observed.shape}")
    static = observed.mean(axis=0)
    totals = np.zeros((int(per_day), observed.shape[1]))
    np.add.at(totals, slot, observed)
    per_slot = np.maximum(np.bincount(slot, minlength=int(per_day)), 1).astype(np.float64)
    by_slot = totals / per_slot[:, None]
    return {STATIC: np.broadcast_to(static, observed.shape), CEILING: by_slot[slot]}


def score_references(observed: np.ndarray, areas: np.ndarray, origins: np.ndarray, per_day: int,
                     coverages=DEFAULT_COVERAGES, n_boot: int = 1000, seed: int = 0) -> dict[str, MetricSummary]:
    """Each reference map's metrics, pooled and bootstrapped exactly as a forecaster's (random and pessimistic
    ties)."""
    return summarise_all(clairvoyant_maps(observed, origins, per_day), observed, areas, origins, per_day, coverages,
                         n_boot, seed=seed)


def headroom_share(model: float, strongest: float, ceiling: float) -> float | None:
    """(model - strongest) / (ceiling - strongest); None when the ceiling is not above the strongest baseline
    (no headroom to share)."""
    room = float(ceiling) - float(strongest)
    if not np.isfinite(room) or room <= 1e-12 or not np.isfinite(model):
        return None
    return (float(model) - float(strongest)) / room


@dataclass(frozen=True)
class Headroom:
    """One forecaster's share of the headroom at one coverage, for one tie rule."""

    forecaster: str
    coverage: float
    ties: str  # "random" (the project's rule) or "pessimistic"
    hit_rate: float
    strongest: str
    strongest_hit_rate: float
    ceiling_hit_rate: float
    share: float | None  # None: no headroom

    def text(self) -> str:
        if self.share is None:
            return (f"{NO_HEADROOM} (ceiling {self.ceiling_hit_rate:.3f} <= {self.strongest} "
                    f"{self.strongest_hit_rate:.3f})")
        return f"{self.share:.0%}"

    def as_dict(self) -> dict:
        return {**asdict(self), "text": self.text()}


def _rate(summary: MetricSummary, coverage: float, ties: str) -> float:
    hits = np.flatnonzero(np.isclose(np.asarray(summary.coverages, dtype=float), coverage))
    if not hits.size:
        raise ValueError(f"the backtest has no coverage {coverage:g}")
    rates = summary.point["hit_rate"] if ties == "random" else summary.pessimistic["hit_rate"]
    return float(rates[int(hits[0])])


def headroom(summaries: dict[str, MetricSummary], references: dict[str, MetricSummary], strongest: str,
             coverages=HEADLINE_COVERAGES) -> list[Headroom]:
    """Every forecaster's headroom share at ``coverages``, random ties then pessimistic ties (both sides of
    each share use the same tie rule)."""
    if strongest not in summaries:
        raise ValueError(f"the strongest baseline {strongest!r} is not in the backtest; it has {sorted(summaries)}")
    ceiling = references[CEILING]
    out = []
    for ties in ("random", "pessimistic"):
        if ties == "pessimistic" and not all(s.pessimistic for s in (*summaries.values(), ceiling)):
            continue
        for c in coverages:
            top, base = _rate(ceiling, c, ties), _rate(summaries[strongest], c, ties)
            for name, summary in summaries.items():
                rate = _rate(summary, c, ties)
                out.append(Headroom(name, float(c), ties, rate, strongest, base, top, headroom_share(rate, base, top)))
    return out


def ceiling_hit_rates(observed: np.ndarray, areas: np.ndarray, origins: np.ndarray, per_day: int,
                      coverages=HEADLINE_COVERAGES) -> dict[float, float]:
    """The shift-of-day ceiling's pooled hit rate (random ties) per coverage, for a claim on a saved backtest."""
    ceiling = clairvoyant_maps(observed, origins, per_day)[CEILING]
    rates = pooled(shift_hits(ceiling, observed, areas, origins, coverages))["hit_rate"]
    return {float(c): float(r) for c, r in zip(coverages, rates)}
