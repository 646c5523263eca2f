"""Hotspot metrics shared by the backtest, the claim test and the API.

Coverage is a share of the study area's *area*: at coverage a, the flagged cells are the top-ranked cells
whose cumulative area first reaches a x total area. Metrics are pooled over the test period (total hits over
total crimes), with confidence intervals from a day-block bootstrap (whole local days resampled, keeping the
shifts of a day together).

Tie rule, used everywhere (ranking for the API included): cells with equal forecasts are ordered by a seeded
random permutation drawn per shift (``seed`` + shift id), so ties neither favour nor penalise any model.
Beside it, backtests report the *pessimistic* bound: tied cells with fewer actual incidents ranked first, the
worst a tie order could do. Count maps with many ties (naive, KDE) can lose much between the two.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

DEFAULT_COVERAGES = (0.005, 0.01, 0.02, 0.05, 0.10, 0.20)
# the two shares of the city's area every verdict, gate and headline table is stated at
HEADLINE_COVERAGES = (0.01, 0.05)
TIE_SEED = 20240101


def tiebreak_order(shift_ids: np.ndarray, n_cells: int, seed: int = TIE_SEED) -> np.ndarray:
    """(n_shifts, n_cells): the cells of each shift in tie-break order (the inverse of its seeded permutation).
    The same for every forecaster, so the last one is kept: a backtest's scoring draws it once, not per call."""
    shift_ids = np.atleast_1d(np.asarray(shift_ids, dtype=np.int64))
    key = (int(seed), int(n_cells), shift_ids.tobytes())
    found = _TIEBREAK[0]
    if found is not None and found[0] == key:
        return found[1]
    keys = np.empty((shift_ids.size, n_cells), dtype=np.intp)
    for i, sid in enumerate(shift_ids):
        keys[i] = np.random.default_rng([seed, int(sid)]).permutation(n_cells)
    order = np.empty_like(keys)
    np.put_along_axis(order, keys, np.broadcast_to(np.arange(n_cells, dtype=np.intp), keys.shape), axis=1)
    order.setflags(write=False)
    _TIEBREAK[0] = (key, order)  # one assignment: threads (the service) see the old pair or the new one
    return order


_TIEBREAK: list = [None]


def _stable_by(order: np.ndarray, key: np.ndarray) -> np.ndarray:
    """``order`` re-sorted by ``key`` (per row, ascending), keeping the present order among equal keys."""
    return np.take_along_axis(order, np.argsort(np.take_along_axis(key, order, axis=1), axis=1, kind="stable"), axis=1)


def rank_cells(expected: np.ndarray, shift_ids: np.ndarray | int, seed: int = TIE_SEED,
               worst_first: np.ndarray | None = None) -> np.ndarray:
    """Cell order (best first) for each shift: by expected count, ties by a seeded random permutation.

    ``expected`` is (n_shifts, n_cells) or (n_cells,); returns indices of the same shape. ``worst_first`` (the
    observed counts, same shape) orders ties by fewer observed incidents first: the pessimistic bound.
    Stable sorts from the tie-break order, all shifts at once: the same order as a per-shift lexsort of
    (tie-break, [observed,] -expected)."""
    expected = np.atleast_2d(np.asarray(expected))
    order = tiebreak_order(np.asarray(shift_ids), expected.shape[1], seed)
    if order.shape[0] != expected.shape[0]:
        raise ValueError(f"{order.shape[0]} shift ids for {expected.shape[0]} rows of forecasts")
    if worst_first is not None:
        order = _stable_by(order, np.atleast_2d(worst_first))
    return _stable_by(order, -expected)


def cells_for_coverage(areas: np.ndarray, order: np.ndarray, coverage: float) -> int:
    """Number of top cells needed for their area to reach ``coverage`` of the total (at least one)."""
    cum = np.cumsum(areas[order[0] if order.ndim > 1 else order])
    return int(min(np.searchsorted(cum, coverage * areas.sum() - 1e-12) + 1, areas.size))


@dataclass
class ShiftHits:
    """Per-shift ingredients of the pooled metrics, at each coverage level."""

    coverages: np.ndarray  # (n_cov,)
    hits: np.ndarray  # (n_shifts, n_cov) observed crimes in flagged cells
    best: np.ndarray  # (n_shifts, n_cov) crimes in the best possible cells of the same number
    predicted_in: np.ndarray  # (n_shifts, n_cov) forecast total in flagged cells
    area_share: np.ndarray  # (n_shifts, n_cov) flagged area / total area
    crimes: np.ndarray  # (n_shifts,)
    predicted: np.ndarray  # (n_shifts,) forecast total over the area
    n_flagged: np.ndarray  # (n_shifts, n_cov)


def shift_hits(
    expected: np.ndarray, observed: np.ndarray, areas: np.ndarray, shift_ids: np.ndarray,
    coverages=DEFAULT_COVERAGES, seed: int = TIE_SEED, ties: str = "random", order: np.ndarray | None = None,
) -> ShiftHits:
    """``ties``: "random" (the project's rule) or "pessimistic" (tied cells with fewer incidents first).
    ``order``: the ranking of ``expected`` under that rule when the caller has it already (``rank_cells``).

    Results for read-only arrays (a backtest's forecasts and counts) are remembered, so the summaries, the
    claim tests and the report rank each forecaster once instead of once per use."""
    if ties not in ("random", "pessimistic"):
        raise ValueError(f"ties must be 'random' or 'pessimistic', got {ties!r}")
    expected = np.atleast_2d(np.asarray(expected, dtype=np.float64))
    observed = np.atleast_2d(np.asarray(observed, dtype=np.float64))
    coverages = np.asarray(coverages, dtype=np.float64)
    key = _memo_key(expected, observed, areas, shift_ids, coverages, seed, ties) if order is None else None
    if key is not None and key in _HITS:
        refs, found = _HITS[key]
        if all(ref() is obj for ref, obj in zip(refs, (expected, observed))):
            return found
    if order is None:
        order = ranking(expected, shift_ids, seed, worst_first=observed if ties == "pessimistic" else None)
    rows = np.arange(expected.shape[0])[:, None]
    total_area = areas.sum()
    targets = coverages * total_area - 1e-12
    # cumulative areas only over the ranks any coverage can reach: no k exceeds the count of the smallest cells
    # that reach the largest target (a few more for rounding). A cumsum's prefix is the same numbers.
    reach = min(int(np.searchsorted(np.cumsum(np.sort(areas)), targets.max(), side="left")) + 1 + _REACH_SLACK,
                areas.size)
    cum_area = np.cumsum(areas[order[:, :reach]], axis=1)
    # k per shift and coverage: first rank whose cumulative area reaches the target
    # (the count of cumulative areas below the target: a binary search per shift, cum_area strictly increases)
    found = np.stack([np.searchsorted(row, targets, side="left") for row in cum_area])
    if reach < areas.size and (found >= reach).any():  # not reached within the bound (cannot happen): all ranks
        cum_area = np.cumsum(areas[order], axis=1)
        found = np.stack([np.searchsorted(row, targets, side="left") for row in cum_area])
    k = np.minimum(found + 1, areas.size)
    idx = k - 1
    head = order[:, : int(k.max())]  # only the ranks any coverage reaches (a cumsum's prefix is the same numbers)
    cum_obs = np.cumsum(observed[rows, head], axis=1)
    cum_exp = np.cumsum(expected[rows, head], axis=1)
    best_sorted = _best_cumulative(observed)
    out = ShiftHits(
        coverages=coverages,
        hits=np.take_along_axis(cum_obs, idx, axis=1),
        best=np.take_along_axis(best_sorted, idx, axis=1),
        predicted_in=np.take_along_axis(cum_exp, idx, axis=1),
        area_share=np.take_along_axis(cum_area, idx, axis=1) / total_area,
        crimes=observed.sum(axis=1),
        predicted=expected.sum(axis=1),
        n_flagged=k,
    )
    if key is not None:
        for a in (out.hits, out.best, out.predicted_in, out.area_share, out.crimes, out.predicted, out.n_flagged):
            a.setflags(write=False)  # shared by every caller from now on
        with _HITS_LOCK:  # summaries are scored in threads (``summarise_all``)
            while len(_HITS) >= _HITS_KEEP:
                _HITS.pop(next(iter(_HITS)))
            _HITS[key] = ((weakref.ref(expected), weakref.ref(observed)), out)
    return out


_REACH_SLACK = 8  # ranks beyond the bound on k in ``shift_hits``, against rounding in the cumulative areas
_HITS: dict = {}  # memo of shift_hits for frozen arrays, oldest first
_HITS_LOCK = threading.Lock()
_HITS_KEEP = 256  # a few KB each (per-shift figures at a few coverages)


def _best_cumulative(observed: np.ndarray) -> np.ndarray:
    """Per shift, the cumulative counts of the busiest cells first (the best any map of k cells could catch);
    remembered for frozen counts, which every forecaster of a backtest is scored against."""
    if not _frozen(observed):
        return np.cumsum(-np.sort(-observed, axis=1), axis=1)
    found = _BEST.get(id(observed))
    if found is not None and found[0]() is observed:
        return found[1]
    best = np.cumsum(-np.sort(-observed, axis=1), axis=1)
    _BEST[id(observed)] = (weakref.ref(observed), best)
    weakref.finalize(observed, _BEST.pop, id(observed), None)
    return best


_BEST: dict = {}
_ORDERS: dict = {}  # rankings of frozen forecasts, dropped when the forecast array is freed


def ranking(expected: np.ndarray, shift_ids, seed: int = TIE_SEED, worst_first: np.ndarray | None = None) -> np.ndarray:
    """``rank_cells``, remembered for frozen arrays (a backtest's forecasts): the summaries, claim tests, the
    report's curves, the per-category rates and the diagnostics ask for other coverages of the same ranking.
    Remembered orders are int32 (half the memory); the same cells in the same order."""
    arrays = (expected,) if worst_first is None else (expected, worst_first)
    if not all(_frozen(a) for a in arrays):
        return rank_cells(expected, shift_ids, seed, worst_first=worst_first)
    key = (*map(id, arrays), np.asarray(shift_ids, dtype=np.int64).tobytes(), int(seed))
    found = _ORDERS.get(key)
    if found is not None and all(ref() is a for ref, a in zip(found[0], arrays)):
        return found[1]
    order = None
    if worst_first is not None:  # the pessimistic order re-sorts only the ties of the random one
        order = _worst_first_within_ties(ranking(expected, shift_ids, seed), np.atleast_2d(expected),
                                         np.atleast_2d(worst_first))
    if order is None:
        order = rank_cells(expected, shift_ids, seed, worst_first=worst_first)
    order = order.astype(np.int32) if np.atleast_2d(expected).shape[1] < 2**31 else order  # half the memory
    _ORDERS[key] = (tuple(weakref.ref(a) for a in arrays), order)
    for a in arrays:
        weakref.finalize(a, _ORDERS.pop, key, None)
    return order


def _worst_first_within_ties(order: np.ndarray, expected: np.ndarray, observed: np.ndarray) -> np.ndarray | None:
    """``rank_cells(expected, worst_first=observed)`` from the random order ``order`` of the same forecasts: a
    stable sort of it by (run of equal forecasts, observed count) orders by (-expected, observed, tie-break), the
    same cells in the same order, with a cheaper sort (the keys are nearly sorted already). None where that does
    not hold exactly: NaN forecasts, counts that are not small non-negative integers."""
    if np.isnan(expected).any():
        return None
    counts = np.take_along_axis(observed, order, axis=1)
    if counts.size == 0 or not (counts.min() >= 0 and np.array_equal(counts, np.floor(counts))):
        return None
    span = int(counts.max()) + 1
    if span * expected.shape[1] >= 2**62:
        return None
    ranked = np.take_along_axis(expected, order, axis=1)
    new_run = np.zeros(ranked.shape, dtype=bool)
    np.not_equal(ranked[:, 1:], ranked[:, :-1], out=new_run[:, 1:])
    key = np.cumsum(new_run, axis=1, dtype=np.int64) * span + counts.astype(np.int64)
    return np.take_along_axis(order, np.argsort(key, axis=1, kind="stable"), axis=1)


def _frozen(a: np.ndarray) -> bool:
    """An array nobody can change any more: read-only and owning its data (not a view of a writable array)."""
    return not a.flags.writeable and a.base is None


def _memo_key(expected, observed, areas, shift_ids, coverages, seed, ties) -> tuple | None:
    """Key of a remembered ``shift_hits``: only for frozen forecasts and counts (checked by identity through a
    weak reference, so a freed array's id reused by another never matches)."""
    if not (_frozen(expected) and _frozen(observed)):
        return None
    return (id(expected), id(observed), np.asarray(areas).tobytes(), np.asarray(shift_ids, dtype=np.int64).tobytes(),
            coverages.tobytes(), int(seed), ties)


def pooled(h: ShiftHits, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pooled hit rate, PAI, PEI*, RRI per coverage; ``weights`` (n_shifts,) for one bootstrap replicate, or
    (n_boot, n_shifts) for all of them at once (each figure then (n_boot, n_cov))."""
    w = np.ones(h.crimes.size) if weights is None else np.asarray(weights, dtype=np.float64)
    many = w.ndim == 2
    col = (lambda v: v[:, None]) if many else (lambda v: v)  # noqa: E731
    crimes = w @ h.crimes
    hits = w @ h.hits
    with np.errstate(divide="ignore", invalid="ignore"):
        hit_rate = np.where(col(crimes) > 0, hits / col(crimes), np.nan)
    area = (w @ h.area_share) / col(w.sum(axis=-1))
    best = w @ h.best
    predicted_share = (w @ h.predicted_in) / col(np.maximum(w @ h.predicted, 1e-12))
    return {
        "hit_rate": hit_rate,
        "pai": hit_rate / area,
        "pei": np.divide(hits, best, out=np.full(hits.shape, np.nan), where=best > 0),
        # Levine's recapture rate index: forecast share in the flagged area over the observed share there
        "rri": np.divide(predicted_share, hit_rate, out=np.full(hits.shape, np.nan), where=hit_rate > 0),
        "area_share": area,
    }


def day_blocks(shift_ids: np.ndarray, per_day: int) -> np.ndarray:
    """Block label (local day) of each shift."""
    return np.asarray(shift_ids, dtype=np.int64) // per_day


def bootstrap_weights(blocks: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_shifts) weights: each replicate resamples whole blocks with replacement."""
    labels, inverse = np.unique(blocks, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(labels.size, np.full(labels.size, 1.0 / labels.size), size=n_boot)
    return draws[:, inverse].astype(np.float64)


def poisson_deviance(expected: np.ndarray, observed: np.ndarray) -> float:
    """Mean Poisson deviance per cell-shift (lower is better)."""
    mu = np.maximum(np.asarray(expected, dtype=np.float64), 1e-12)
    y = np.asarray(observed, dtype=np.float64)
    term = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)
    return float(np.mean(2 * (term - (y - mu))))


def calibration(expected: np.ndarray, observed: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Mean predicted vs mean observed count by decile of the forecast (ties kept in one bin)."""
    mu = np.asarray(expected, dtype=np.float64).ravel()
    y = np.asarray(observed, dtype=np.float64).ravel()
    edges = np.unique(np.quantile(mu, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, mu, side="right") - 1, 0, max(edges.size - 2, 0))
    count = np.bincount(which, minlength=edges.size - 1)
    keep = count > 0
    return {
        "predicted": (np.bincount(which, weights=mu, minlength=edges.size - 1)[keep] / count[keep]),
        "observed": (np.bincount(which, weights=y, minlength=edges.size - 1)[keep] / count[keep]),
        "n": count[keep],
    }


def hit_rate_curve(expected: np.ndarray, observed: np.ndarray, areas: np.ndarray, shift_ids: np.ndarray,
                   seed: int = TIE_SEED, points: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """Pooled hit rate against area coverage from 0 to 100% (the full curve)."""
    grid = np.linspace(0, 1, points)
    h = shift_hits(expected, observed, areas, shift_ids, coverages=np.clip(grid, 1e-9, 1), seed=seed)
    rates = pooled(h)["hit_rate"]
    rates[0] = 0.0
    return grid, rates


@dataclass
class MetricSummary:
    coverages: np.ndarray
    point: dict[str, np.ndarray]
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    deviance: float
    n_shifts: int
    crimes: float
    pessimistic: dict[str, np.ndarray] = field(default_factory=dict)  # point metrics with pessimistic ties


def summarise(expected: np.ndarray, observed: np.ndarray, areas: np.ndarray, shift_ids: np.ndarray, per_day: int,
              coverages=DEFAULT_COVERAGES, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> MetricSummary:
    """Pooled metrics with day-block bootstrap percentile intervals."""
    h = shift_hits(expected, observed, areas, shift_ids, coverages)
    point = pooled(h)
    reps = pooled(h, bootstrap_weights(day_blocks(shift_ids, per_day), n_boot, seed))  # every replicate at once
    alpha = (1 - level) / 2
    low = {k: np.nanquantile(reps[k], alpha, axis=0) for k in point}
    high = {k: np.nanquantile(reps[k], 1 - alpha, axis=0) for k in point}
    worst = pooled(shift_hits(expected, observed, areas, shift_ids, coverages, ties="pessimistic"))
    return MetricSummary(np.asarray(coverages), point, low, high, poisson_deviance(expected, observed),
                         int(np.atleast_2d(expected).shape[0]), float(np.sum(observed)),
                         {k: worst[k] for k in ("hit_rate", "pai")})


SCORING_THREADS = 2  # numpy's sorts, gathers and cumulative sums release the GIL: two forecasters at a time


def summarise_all(predictions: Mapping[str, np.ndarray], observed: np.ndarray, areas: np.ndarray,
                  shift_ids: np.ndarray, per_day: int, coverages=DEFAULT_COVERAGES, n_boot: int = 1000,
                  seed: int = 0, threads: int = SCORING_THREADS) -> dict[str, MetricSummary]:
    """``summarise`` of every forecaster, in the order given, ``threads`` forecasters at a time: the same
    figures as one after the other (each bootstrap draws from its own seeded generator)."""
    observed = np.asarray(observed)
    tiebreak_order(np.asarray(shift_ids), observed.shape[-1])  # drawn once here, not once per thread
    if _frozen(observed):
        _best_cumulative(observed)

    def one(name: str) -> MetricSummary:
        return summarise(predictions[name], observed, areas, shift_ids, per_day, coverages, n_boot, seed=seed)

    if threads <= 1 or len(predictions) <= 1:
        return {name: one(name) for name in predictions}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="summarise") as pool:
        return dict(zip(predictions, pool.map(one, predictions)))
