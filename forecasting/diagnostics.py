"""Production diagnostics of a hotspot model: does its map narrow onto the same cells?

Issue 5, item 2. For any model's forecasts over a test period, flagged with the backtest's own rule (top
cells by area coverage or a fixed top-k, ties by the seeded permutation of :mod:`forecasting.metrics`):

- **concentration** of the flags: Gini of how often each cell is flagged, the share of all flags held by the
  most-flagged 1% / 5% of cells, how many cells are ever flagged;
- **churn**: Jaccard similarity of the flagged sets between consecutive shifts and between the same shift of
  consecutive days (mean and series), and 1 - Jaccard;
- **persistence**: lengths of runs of consecutive flagged shifts (and days, same shift of day);
- **gain from lagged counts**: LightGBM's gain importance grouped into the cell's own past counts, its
  neighbours' past counts, calendar and static features. The grouping is read off ``features.matrix`` by
  probing :func:`~features.matrix.build_features` (which columns move when counts move, in which cell), so a
  new feature is classified without editing a list here;
- with a **patrol log**: recorded crime per cell-shift by patrol dose, the discovered/reported split where the
  data defines it, and a Poisson GLM of recorded counts on the previous shift's and previous day's dose with
  the model's expected count as offset and cell-clustered standard errors.

The same flag measures for the naive baseline sit beside the model's, so a reader can tell what the model
adds to the concentration that any "where crime was recorded" map already has.

This module only computes (dataclasses, numbers, ``payload()`` / ``to_dict()``); the figure and the HTML are in
:mod:`forecasting.reporting.diagnostics_view`, the MLflow logging in :mod:`forecasting.reporting.assess`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import Any

import h3
import numpy as np
import polars as pl

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.matrix import FeatureConfig, build_features
from features.panel import COUNTS_SCHEMA, CountPanel
from forecasting.jsonable import jsonable
from forecasting.measures import gini, jaccard, lorenz, top_share
from forecasting.metrics import HEADLINE_COVERAGES, TIE_SEED, rank_cells, ranking
from forecasting.patrol_dose import PatrolDiagnostics, patrol_diagnostics

GROUPS = ("own_lagged", "neighbour_lagged", "calendar", "static")


# --- flag rule ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlagRule:
    """Which cells a shift's map flags: the top cells reaching ``coverage`` of the area (the backtest's rule)
    or the ``top_k`` cells. Exactly one is set."""

    coverage: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.coverage is None) == (self.top_k is None):
            raise ValueError("a flag rule needs exactly one of coverage (share of area) or top_k (cells)")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {self.coverage}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")

    @property
    def tag(self) -> str:
        """Metric-name suffix, as the backtest writes coverages: ``1pct``, ``5pct``, ``top50``."""
        return f"{self.coverage * 100:g}pct" if self.coverage is not None else f"top{self.top_k}"

    @property
    def label(self) -> str:
        return f"{self.coverage * 100:g}% of area" if self.coverage is not None else f"top {self.top_k} cells"


def flag_matrix(expected: np.ndarray, areas: np.ndarray, origins: np.ndarray, rule: FlagRule,
                seed: int = TIE_SEED, order: np.ndarray | None = None) -> np.ndarray:
    """Boolean (n_shifts, n_cells): the cells each shift's map flags, exactly as ``shift_hits`` counts them."""
    expected = np.atleast_2d(np.asarray(expected, dtype=np.float64))
    order = rank_cells(expected, origins, seed) if order is None else order
    n = expected.shape[1]
    if rule.coverage is not None:
        cum_area = np.cumsum(np.asarray(areas, dtype=np.float64)[order], axis=1)
        k = np.minimum((cum_area < rule.coverage * areas.sum() - 1e-12).sum(axis=1) + 1, n)
    else:
        k = np.full(expected.shape[0], min(rule.top_k, n))
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), order.shape), axis=1)
    return rank < k[:, None]


# --- runs and pairs ----------------------------------------------------------------------------------
def run_lengths(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of the runs of True down each column, and whether each run is censored (touches the first or
    last row, so its true length is unknown)."""
    f = np.asarray(flags, dtype=bool)
    t, m = f.shape
    padded = np.zeros((m, t + 2), dtype=np.int8)
    padded[:, 1:-1] = f.T
    step = np.diff(padded, axis=1)
    _, starts = np.nonzero(step == 1)  # row-major: by column, then time, so starts and ends pair up
    _, ends = np.nonzero(step == -1)
    return ends - starts, (starts == 0) | (ends == t)


def _timeline(flags: np.ndarray, origins: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Flags placed on the full shift range [start, stop); shifts missing from ``origins`` are unflagged."""
    full = np.zeros((stop - start, flags.shape[1]), dtype=bool)
    full[origins - start] = flags
    return full


def _pairs(origins: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i, j) with origins[j] == origins[i] + lag."""
    pos = np.searchsorted(origins, origins + lag)
    ok = pos < origins.size
    ok[ok] = origins[pos[ok]] == origins[ok] + lag
    return np.flatnonzero(ok), pos[ok]


@dataclass
class RunStats:
    mean: float
    median: float
    p90: float
    max: int
    n_runs: int
    censored_share: float
    lengths: np.ndarray  # distinct lengths
    counts: np.ndarray  # runs of each length

    @classmethod
    def of(cls, lengths: np.ndarray, censored: np.ndarray) -> RunStats:
        if lengths.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0, 0, float("nan"), np.array([], int), np.array([], int))
        values, counts = np.unique(lengths, return_counts=True)
        return cls(float(lengths.mean()), float(np.median(lengths)), float(np.quantile(lengths, 0.9)),
                   int(lengths.max()), int(lengths.size), float(censored.mean()), values, counts)


# --- one model, one rule -----------------------------------------------------------------------------
@dataclass
class FlagDiagnostics:
    """Concentration, churn and persistence of one model's flags under one rule over the test period."""

    model: str
    rule: FlagRule
    n_shifts: int
    n_cells: int
    mean_flagged: float  # cells flagged per shift
    gini: float  # of the number of times each study-area cell is flagged
    gini_static: float  # the Gini if the same cells were flagged every shift: 1 - mean_flagged / n_cells
    top1_share: float  # share of all flags held by the most-flagged 1% of cells
    top5_share: float
    cells_ever_flagged: int
    share_ever_flagged: float
    tie_share: float  # share of flags decided by the tie rule (equal forecast at the flag boundary)
    jaccard_shift: float  # mean Jaccard of consecutive shifts' flagged sets
    jaccard_day: float  # mean Jaccard of the same shift of consecutive days
    runs_shift: RunStats  # consecutive flagged shifts
    runs_day: RunStats  # consecutive days flagged for the same shift of day
    flag_counts: np.ndarray = field(repr=False)  # (n_cells,)
    series_shift: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (later shift id, Jaccard)
    series_day: tuple[np.ndarray, np.ndarray] = field(repr=False)

    @property
    def rotation(self) -> float:
        """Cells ever flagged per cell flagged in a shift: 1 for a map that never changes."""
        return self.cells_ever_flagged / self.mean_flagged if self.mean_flagged else float("nan")

    @property
    def churn_shift(self) -> float:
        return 1.0 - self.jaccard_shift

    @property
    def churn_day(self) -> float:
        return 1.0 - self.jaccard_day

    def metrics(self) -> dict[str, float]:
        """Flat figures without prefix or rule tag."""
        return {
            "gini": self.gini, "gini_static": self.gini_static, "top1pct_share": self.top1_share,
            "top5pct_share": self.top5_share, "cells_ever_flagged": float(self.cells_ever_flagged),
            "share_ever_flagged": self.share_ever_flagged, "mean_flagged": self.mean_flagged,
            "rotation": self.rotation,
            "tie_share": self.tie_share,
            "jaccard_mean": self.jaccard_shift, "churn_mean": self.churn_shift,
            "jaccard_day_mean": self.jaccard_day, "churn_day_mean": self.churn_day,
            "run_mean": self.runs_shift.mean, "run_median": self.runs_shift.median, "run_p90": self.runs_shift.p90,
            "run_max": float(self.runs_shift.max),
            "run_days_mean": self.runs_day.mean, "run_days_median": self.runs_day.median,
            "run_days_p90": self.runs_day.p90, "run_days_max": float(self.runs_day.max),
        }

    def payload(self, per_day: int) -> dict[str, Any]:
        def daily(series: tuple[np.ndarray, np.ndarray]) -> dict[str, list]:
            days, values = series[0] // per_day, series[1]
            uniq, inv = np.unique(days, return_inverse=True)
            means = np.bincount(inv, weights=values) / np.bincount(inv)
            return {"date": [str(np.datetime64(int(d), "D")) for d in uniq], "jaccard": means.tolist()}

        x, y = lorenz(self.flag_counts)
        runs = {name: {"lengths": r.lengths.tolist(), "counts": r.counts.tolist(), "censored_share": r.censored_share}
                for name, r in (("shifts", self.runs_shift), ("days", self.runs_day))}
        return {"model": self.model, "rule": self.rule.label, "tag": self.rule.tag, "coverage": self.rule.coverage,
                "top_k": self.rule.top_k, "n_shifts": self.n_shifts, "n_cells": self.n_cells,
                "metrics": self.metrics(), "lorenz": {"cell_share": x.tolist(), "flag_share": y.tolist()},
                "jaccard_consecutive_shifts_daily": daily(self.series_shift),
                "jaccard_same_shift_next_day_daily": daily(self.series_day), "run_lengths": runs}


def flag_diagnostics(expected: np.ndarray, areas: np.ndarray, origins: np.ndarray, per_day: int, rule: FlagRule,
                     *, model: str = "model", seed: int = TIE_SEED, order: np.ndarray | None = None) -> FlagDiagnostics:
    """Concentration, churn and run lengths of one model's flags (vectorised over cells and shifts)."""
    expected = np.atleast_2d(np.asarray(expected, dtype=np.float64))
    origins = np.asarray(origins, dtype=np.int64)
    order = rank_cells(expected, origins, seed) if order is None else order
    flags = flag_matrix(expected, areas, origins, rule, seed, order)
    n_shifts, n_cells = flags.shape
    counts = flags.sum(axis=0)
    k = flags.sum(axis=1)

    # ties at the boundary: flagged cells whose forecast equals that of the best unflagged cell
    rows = np.arange(n_shifts)
    boundary = expected[rows, order[rows, np.minimum(k, n_cells - 1)]]
    tied = flags & (expected == boundary[:, None]) & (k < n_cells)[:, None]

    i, j = _pairs(origins, 1)
    series_shift = (origins[j], np.asarray(jaccard(flags[i], flags[j])))  # rows in, an array out
    i, j = _pairs(origins, per_day)
    series_day = (origins[j], np.asarray(jaccard(flags[i], flags[j])))

    runs_shift = run_lengths(_timeline(flags, origins, int(origins[0]), int(origins[-1]) + 1))
    d0, d1 = int(origins[0]) // per_day, int(origins[-1]) // per_day + 1
    by_day = _timeline(flags, origins, d0 * per_day, d1 * per_day).reshape(d1 - d0, per_day * n_cells)
    runs_day = run_lengths(by_day)

    mean_k = float(k.mean())
    return FlagDiagnostics(
        model=model, rule=rule, n_shifts=n_shifts, n_cells=n_cells, mean_flagged=mean_k,
        gini=float(gini(counts)), gini_static=1.0 - mean_k / n_cells,  # 1-d counts: floats
        top1_share=float(top_share(counts, 0.01)), top5_share=float(top_share(counts, 0.05)),
        cells_ever_flagged=int((counts > 0).sum()), share_ever_flagged=float((counts > 0).mean()),
        tie_share=float(tied.sum() / max(flags.sum(), 1)),
        jaccard_shift=float(series_shift[1].mean()) if series_shift[1].size else float("nan"),
        jaccard_day=float(series_day[1].mean()) if series_day[1].size else float("nan"),
        runs_shift=RunStats.of(*runs_shift), runs_day=RunStats.of(*runs_day),
        flag_counts=counts, series_shift=series_shift, series_day=series_day,
    )


# --- gain share from lagged counts -------------------------------------------------------------------
@lru_cache(maxsize=16)
def _probe_groups(calendar: ShiftCalendar, categories: tuple[str, ...], config: FeatureConfig) -> tuple[tuple[str, str], ...]:
    per_day = calendar.per_day
    centre = h3.latlng_to_cell(0.0, 0.0, 9)
    area = StudyArea(np.array([h3.str_to_int(c) for c in h3.grid_disk(centre, 2)], dtype=np.uint64), 9)
    c = int(area.index_of(np.array([h3.str_to_int(centre)], dtype=np.uint64))[0])
    first = calendar.local_day(date(2020, 1, 1)) * per_day
    lookback = config.lookback(per_day)
    # a year of origins stepping through every shift of day and weekday (and a DST change where there is one)
    origins = first + lookback + np.arange(0, 366 * per_day, 7)
    end = int(origins[-1]) + 1
    shifts = np.arange(first, end - 1)
    cats = np.arange(len(categories))
    filled = pl.DataFrame({"shift": np.repeat(shifts, cats.size), "cell": c, "category": np.tile(cats, shifts.size),
                           "count": 1}).cast(COUNTS_SCHEMA)  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys
    empty = filled.clear()
    shape = (origins.size, len(area), -1)
    base = build_features(CountPanel(area, calendar, categories, first, end, empty), origins, config)
    busy = build_features(CountPanel(area, calendar, categories, first, end, filled), origins, config)
    X0, X1 = base.X.reshape(shape), busy.X.reshape(shape)
    moved = X1 != X0
    own = moved[:, c, :].any(axis=0)
    others = np.delete(moved, c, axis=1).any(axis=(0, 1))
    varies_by_cell = (X0 != X0[:, :1, :]).any(axis=(0, 1))
    group = np.where(own, "own_lagged", np.where(others, "neighbour_lagged",
                                                 np.where(varies_by_cell, "static", "calendar")))
    return tuple(zip(base.columns, group.tolist()))


def feature_groups(calendar: ShiftCalendar, categories: Sequence[str], config: FeatureConfig = FeatureConfig()) -> dict[str, str]:
    """Group of every feature column ``build_features`` makes for this calendar, categories and config.

    Read off the builder itself, not a list of names: on a tiny probe area, one incident per shift and
    category in the centre cell; a column that moves in the centre cell's row is ``own_lagged`` (the cell's
    past counts, long-run rate and category counts included), one that moves only in the neighbours' rows is
    ``neighbour_lagged``; of the rest, ``static`` varies between cells (location) and ``calendar`` does not."""
    return dict(_probe_groups(calendar, tuple(categories), config))


@dataclass
class GainShare:
    """LightGBM gain importance by feature group."""

    groups: dict[str, str]
    gain: dict[str, float]  # feature -> gain
    by_group: dict[str, float]  # group -> share of total gain
    unknown: list[str]  # features in the importance that the probe did not produce (another config?)

    @property
    def lagged_share(self) -> float:
        return self.by_group.get("own_lagged", 0.0) + self.by_group.get("neighbour_lagged", 0.0)

    def metrics(self) -> dict[str, float]:
        return {"gain_lagged_share": self.lagged_share, **{f"gain_share.{g}": self.by_group.get(g, 0.0) for g in GROUPS}}

    def payload(self) -> dict[str, Any]:
        total = sum(self.gain.values()) or 1.0
        return {"lagged_share": self.lagged_share, "by_group": self.by_group, "unknown_features": self.unknown,
                "features": [{"feature": f, "group": self.groups.get(f, "unknown"), "gain_share": g / total}
                             for f, g in sorted(self.gain.items(), key=lambda kv: -kv[1])]}


def gain_share(importance: Mapping[str, float], groups: Mapping[str, str]) -> GainShare:
    """Share of total gain per group; features the grouping does not know are kept under ``unknown``."""
    if not importance:
        raise ValueError("the feature importance is empty: fit the LightGBM model first")
    gain = {k: float(v) for k, v in importance.items()}
    total = sum(gain.values())
    if total <= 0:
        raise ValueError("the feature importance sums to zero gain (a model without splits?)")
    by_group: dict[str, float] = {g: 0.0 for g in GROUPS}
    for name, value in gain.items():  # a few dozen features, not cells
        g = groups.get(name, "unknown")
        by_group[g] = by_group.get(g, 0.0) + value / total
    return GainShare(dict(groups), gain, by_group, sorted(set(gain) - set(groups)))


# --- the whole set -----------------------------------------------------------------------------------


@dataclass
class Diagnostics:
    """Diagnostics of one model (and its baseline) over a test period; see the module docstring."""

    model: str
    baseline: str | None
    per_day: int
    flags: dict[tuple[str, str], FlagDiagnostics]  # (model name, rule tag) -> measures
    gain: GainShare | None = None
    patrol: PatrolDiagnostics | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rules(self) -> list[str]:
        return list(dict.fromkeys(tag for _, tag in self.flags))

    def to_dict(self, prefix: str = "diag.") -> dict[str, float]:
        """Flat metrics for MLflow: ``diag.gini.1pct`` (the model), ``diag.baseline.gini.1pct`` (the baseline),
        ``diag.gain_lagged_share``, ``diag.dose.rate_ratio.prev_shift``; non-finite values are left out."""
        out: dict[str, float] = {}
        for (name, tag), f in self.flags.items():
            head = prefix if name == self.model else f"{prefix}baseline."
            out.update({f"{head}{k}.{tag}": v for k, v in f.metrics().items()})
        if self.gain is not None:
            out.update({f"{prefix}{k}": v for k, v in self.gain.metrics().items()})
        if self.patrol is not None:
            out.update({f"{prefix}dose.{k}": v for k, v in self.patrol.metrics().items()})
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def payload(self) -> dict[str, Any]:
        """Everything, JSON-ready (strict: no NaN)."""
        return jsonable({
            "model": self.model, "baseline": self.baseline, "rules": self.rules,
            "flags": [f.payload(self.per_day) for f in self.flags.values()],
            "gain": self.gain.payload() if self.gain else None,
            "patrol": self.patrol.payload() if self.patrol else None,
            "patrol_note": None if self.patrol else "no patrol log given: dose analysis not run",
            "notes": self.notes, "metrics": self.to_dict(),
        })


def diagnose(
    predictions: Mapping[str, np.ndarray], observed: np.ndarray, areas: np.ndarray, origins: np.ndarray, per_day: int,
    *, model: str, baseline: str | None = None, coverages: Sequence[float] = HEADLINE_COVERAGES,
    top_k: Sequence[int] = (), seed: int = TIE_SEED, importance: Mapping[str, float] | None = None,
    panel: CountPanel | None = None, feature_config: FeatureConfig = FeatureConfig(),
    groups: Mapping[str, str] | None = None, patrols: pl.DataFrame | None = None, **patrol_options,
) -> Diagnostics:
    """All diagnostics of ``predictions[model]`` (and ``predictions[baseline]``) over a test period.

    ``importance`` (LightGBM gain by feature) is grouped with ``groups`` or, given ``panel``, with
    :func:`feature_groups` for the panel's calendar and categories. ``patrols`` (the patrol log) needs
    ``panel``; ``patrol_options`` go to :func:`patrol_diagnostics`."""
    origins = np.asarray(origins, dtype=np.int64)
    observed = np.atleast_2d(np.asarray(observed, dtype=np.float64))
    areas = np.asarray(areas, dtype=np.float64)
    names = [model] + ([baseline] if baseline and baseline != model else [])
    missing = [n for n in names if n not in predictions]
    if missing:
        raise KeyError(f"no predictions for {missing}; have {sorted(predictions)}")
    if origins.ndim != 1 or np.any(np.diff(origins) <= 0):
        raise ValueError("origins must be a strictly increasing 1-d array of shift ids")
    shape = (origins.size, areas.size)
    for name in names:
        if np.shape(predictions[name]) != shape:
            raise ValueError(f"predictions[{name!r}] has shape {np.shape(predictions[name])}, expected {shape} "
                             "(origins x cells)")
    if observed.shape != shape:
        raise ValueError(f"observed has shape {observed.shape}, expected {shape}")
    rules = [FlagRule(coverage=float(c)) for c in coverages] + [FlagRule(top_k=int(k)) for k in top_k]
    if not rules:
        raise ValueError("give at least one coverage or top_k")
    flags: dict[tuple[str, str], FlagDiagnostics] = {}
    for name in names:
        pred = np.asarray(predictions[name], dtype=np.float64)
        order = ranking(pred, origins, seed)  # one ranking per model, shared by every rule (the backtest's)
        for rule in rules:
            flags[(name, rule.tag)] = flag_diagnostics(pred, areas, origins, per_day, rule, model=name, seed=seed, order=order)
    gain = None
    if importance is not None:
        if groups is None:
            if panel is None:
                raise ValueError("grouping the feature importance needs the panel (calendar, categories) or groups")
            groups = feature_groups(panel.calendar, panel.categories, feature_config)
        gain = gain_share(importance, groups)
    patrol = None
    if patrols is not None:
        if panel is None:
            raise ValueError("the patrol analysis needs the panel (study area, calendar, categories)")
        patrol = patrol_diagnostics(patrols, panel, origins, predictions[model], observed, **patrol_options)
    notes = []
    if gain is not None and gain.unknown:
        notes.append(f"features not produced by the feature builder with this config: {gain.unknown}")
    return Diagnostics(model=model, baseline=baseline if len(names) > 1 else None, per_day=per_day, flags=flags,
                       gain=gain, patrol=patrol, notes=notes)


def diagnose_backtest(result, panel: CountPanel, model: str, **kwargs) -> Diagnostics:
    """:func:`diagnose` of ``model`` on an ``forecasting.backtest.BacktestResult``; its importance and feature
    configuration come from ``result.last_models`` through the forecaster contract, when it has them."""
    fitted = result.last_models.get(model)
    if fitted is not None and "importance" not in kwargs:
        kwargs["importance"] = fitted.feature_importance()
        features = fitted.get_params(deep=False).get("features")
        if kwargs["importance"] is not None and isinstance(features, FeatureConfig):
            kwargs.setdefault("feature_config", features)
    return diagnose(result.predictions, result.observed, result.areas, result.origins, result.per_day, panel=panel,
                    model=model, **kwargs)
