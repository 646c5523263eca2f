"""Realised accuracy: the cells the service actually flagged for shifts that are now over, scored against the
incidents the panel holds for those shifts, per shift and over a rolling window, beside a baseline that flags
the same number of cells on the same shifts.

The flags come from outside (the service's audit log); this module only scores them, with the backtest's
definitions: hit rate = incidents in the flagged cells / all incidents of the shift, PAI = hit rate / flagged
share of the study area; pooled over a window as total hits over total incidents (as :func:`forecasting.metrics.pooled`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from features.panel import CountPanel
from forecasting.base import Forecaster
from forecasting.metrics import rank_cells

ROLLING_DAYS = 28


@dataclass(frozen=True)
class ShiftScores:
    """Per scored shift (sorted by shift id): incidents, incidents in the flagged cells, flagged area share."""

    shift_ids: np.ndarray  # (n,)
    crimes: np.ndarray  # (n,)
    hits: np.ndarray  # (n,)
    area_share: np.ndarray  # (n,)
    n_flagged: np.ndarray  # (n,)

    @property
    def hit_rate(self) -> np.ndarray:
        """NaN for a shift without incidents (nothing to hit)."""
        return np.divide(self.hits, self.crimes, out=np.full(self.crimes.shape, np.nan), where=self.crimes > 0)

    @property
    def pai(self) -> np.ndarray:
        return np.divide(self.hit_rate, self.area_share, out=np.full(self.crimes.shape, np.nan),
                         where=self.area_share > 0)


@dataclass(frozen=True)
class Pooled:
    """Total hits over total incidents of a set of shifts, and that over their mean flagged area share."""

    hit_rate: float | None
    pai: float | None
    crimes: float
    n_shifts: int


def observed_counts(panel: CountPanel, shift_ids: np.ndarray, category: str | list[str] | None) -> np.ndarray:
    """(n, n_cells) counts of ``category`` (None: all) in the given shifts."""
    shift_ids = np.asarray(shift_ids, dtype=np.int64)
    if shift_ids.size == 0:
        return np.zeros((0, panel.n_cells))
    lo = int(shift_ids.min())
    return panel.dense(lo, int(shift_ids.max()) + 1, category, dtype=np.float64)[shift_ids - lo]


def flag_matrix(cells: list[np.ndarray], n_cells: int) -> np.ndarray:
    """Boolean (n_shifts, n_cells) from each shift's flagged cell indices."""
    out = np.zeros((len(cells), n_cells), dtype=bool)
    rows = np.repeat(np.arange(len(cells)), [c.size for c in cells])
    out[rows, np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)] = True
    return out


def score_flags(shift_ids: np.ndarray, flagged: np.ndarray, observed: np.ndarray, areas: np.ndarray) -> ShiftScores:
    """Score boolean flags (n, n_cells) against observed counts (n, n_cells); rows are sorted by shift id."""
    order = np.argsort(np.asarray(shift_ids, dtype=np.int64), kind="stable")
    flagged, observed = flagged[order], np.asarray(observed, dtype=np.float64)[order]
    return ShiftScores(shift_ids=np.asarray(shift_ids, dtype=np.int64)[order], crimes=observed.sum(axis=1),
                       hits=(observed * flagged).sum(axis=1), area_share=flagged @ areas / float(areas.sum()),
                       n_flagged=flagged.sum(axis=1))


def pooled(scores: ShiftScores, mask: np.ndarray | None = None) -> Pooled:
    mask = np.ones(scores.shift_ids.size, dtype=bool) if mask is None else mask
    crimes, n = float(scores.crimes[mask].sum()), int(mask.sum())
    if n == 0 or crimes <= 0:
        return Pooled(None, None, crimes, n)
    rate = float(scores.hits[mask].sum()) / crimes
    area = float(scores.area_share[mask].mean())
    return Pooled(rate, rate / area if area > 0 else None, crimes, n)


def rolling(scores: ShiftScores, per_day: int, days: int = ROLLING_DAYS) -> tuple[np.ndarray, np.ndarray]:
    """(hit rate, PAI) pooled over the ``days`` days ending at each scored shift (NaN without incidents)."""
    sid = scores.shift_ids
    start = np.searchsorted(sid, sid - days * per_day, side="right")  # first shift inside each window

    def window_sum(values: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
        return cum[np.arange(sid.size) + 1] - cum[start]

    crimes, hits = window_sum(scores.crimes), window_sum(scores.hits)
    area = window_sum(scores.area_share) / np.maximum(np.arange(sid.size) + 1 - start, 1)
    rate = np.divide(hits, crimes, out=np.full(sid.shape, np.nan), where=crimes > 0)
    return rate, np.divide(rate, area, out=np.full(sid.shape, np.nan), where=area > 0)


def last_window(scores: ShiftScores, per_day: int, days: int = ROLLING_DAYS) -> np.ndarray:
    """Mask of the shifts in the ``days`` days ending at the last scored shift."""
    if scores.shift_ids.size == 0:
        return np.zeros(0, dtype=bool)
    return scores.shift_ids > scores.shift_ids[-1] - days * per_day


def baseline_flags(make: Callable[[], Forecaster], panel: CountPanel, shift_ids: np.ndarray,
                   n_flagged: np.ndarray) -> np.ndarray:
    """A baseline's flags on the same shifts with the same number of cells each: fitted once at the first shift
    (history before it only) and forecasting every shift from the history before that shift, ranked with the
    project's tie rule, as the strongest-baseline choice does."""
    shift_ids = np.asarray(shift_ids, dtype=np.int64)
    if shift_ids.size == 0:
        return np.zeros((0, panel.n_cells), dtype=bool)
    expected = make().fit(panel, int(shift_ids.min())).predict(panel, shift_ids)
    order = rank_cells(expected, shift_ids)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(panel.n_cells)[None, :].repeat(shift_ids.size, axis=0), axis=1)
    return ranks < np.asarray(n_flagged)[:, None]


@dataclass(frozen=True)
class BacktestInterval:
    """A saved backtest's pooled hit rate with its 95% interval for one forecaster at one coverage."""

    forecaster: str
    coverage: float
    hit_rate: float
    low: float
    high: float
    pai: float | None


@dataclass(frozen=True)
class SavedSummary:
    """What the realised record compares with, read from a backtest folder's summary.json (and strongest.json)."""

    folder: str
    test_start: str | None
    test_end: str | None
    strongest: str | None
    forecasters: dict[str, list[dict]]

    @classmethod
    def load(cls, folder) -> SavedSummary:
        import json
        from pathlib import Path

        folder = Path(folder)
        path = folder / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the backtest in {folder} wrote no summary (rerun `hotspots backtest`)")
        summary = json.loads(path.read_text())
        meta = summary.get("meta", {})
        strongest = meta.get("strongest_baseline")
        if strongest is None and (folder / "strongest.json").is_file():
            strongest = json.loads((folder / "strongest.json").read_text()).get("name")
        return cls(folder.name, meta.get("test_start"), meta.get("test_end"), strongest,
                   {name: f["coverages"] for name, f in summary.get("forecasters", {}).items()})

    def interval(self, forecaster: str | None, area_share: float | None) -> BacktestInterval | None:
        """``forecaster``'s interval at the backtest coverage nearest ``area_share`` (the realised flags' mean)."""
        rows = self.forecasters.get(forecaster or "")
        if not rows or area_share is None:
            return None
        row = min(rows, key=lambda r: abs(np.log(float(r["coverage"]) / max(area_share, 1e-9))))
        rate = row["hit_rate"]
        pai = row.get("pai", {}).get("point")
        return BacktestInterval(forecaster or "", float(row["coverage"]), float(rate["point"]), float(rate["low"]),
                                float(rate["high"]), None if pai is None else float(pai))
