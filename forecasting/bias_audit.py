"""Bias audit of a hotspot map: who lives in the flagged cells, compared with who lives in the city and with
where crime is recorded, per population group and per hardship (or poverty) quintile.

Cells are flagged exactly as in the backtest (:mod:`forecasting.metrics`): per shift, the top-ranked cells whose
area first reaches the coverage share of the study area, ties by the seeded permutation. Residents come from an
area layer joined to the cells by areal weighting (:mod:`forecasting.area_join`), so one cell's residents are
spread over several groups (fractional membership).

Notation: shift t (T shifts), cell c, group g; F[t,c] = 1 when c is flagged in t; P[c,g] residents of g in c,
N[c] all residents, P_g = sum_c P[c,g], N = sum_c N[c]; Y[t,c] recorded crimes, Yhat[t,c] forecast; A[c] cell
area; M[c,g] the group's membership weight of the cell: P[c,g] / N[c] for population groups (0 where nobody
lives), 1 for the cells of a quintile. Sums over t are pooled over the test period.

* flagged_share_g   = sum_t sum_c F P[.,g] / (T P_g): share of the group living in flagged cells, averaged over shifts
* exposure_ratio_g  = flagged_share_g / flagged_share_all, identical to
  (group's share of the flagged population) / (group's share of the population)
  = [sum F P[.,g] / sum F N] / [P_g / N]. 1 = flagged in proportion to its population; 2 = twice as often.
* crime_share_g     = sum Y M[.,g] / sum Y M[.,all]: recorded crime attributed to the group by the cell's population shares
* exposure_to_crime_ratio_g = (group's share of the flagged population) / crime_share_g: above 1, the group is
  flagged more than its share of recorded crime would imply
* hit_rate_g        = sum F Y M[.,g] / sum Y M[.,g]: the group-attributed crimes inside flagged cells
* pai_g             = hit_rate_g / (sum F A M[.,g] / (T sum A M[.,g])): hit rate over the flagged share of the group's area
* calibration_g     = sum Yhat M[.,g] / sum Y M[.,g]: predicted over recorded, within the group's areas

Intervals: the project's day-block bootstrap (whole local days resampled, :func:`forecasting.metrics.bootstrap_weights`),
percentile intervals; every forecaster and split uses the same replicates, so the difference of a model's and the
baseline's exposure ratio (``*_minus_<baseline>``) has a paired interval.

fairlearn's ``MetricFrame`` assigns each sample to exactly one group. That fits the quintile split (each cell lies
in one quintile) and the *majority* view (each cell assigned to its largest group), and both are computed with it
(``majority`` frame; for quintiles it agrees with the main engine, which a test checks). It does not fit fractional,
population-weighted membership (a cell 60% Black and 40% Hispanic counts for both), which is the main measure and is
computed here with matrix products; nor does its i.i.d. row bootstrap respect the day blocks, so intervals come
from the project's bootstrap.

This module only computes; the figure and the HTML are in :mod:`forecasting.reporting.bias_audit_view`, the
MLflow logging in :mod:`forecasting.reporting.assess`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl

from forecasting.area_join import TOTAL, AreaJoin
from forecasting.jsonable import jsonable
from forecasting.metrics import HEADLINE_COVERAGES, TIE_SEED, bootstrap_weights, day_blocks, ranking, shift_hits

ALL = "all"
MEASURES = ("flagged_share", "exposure_ratio", "exposure_to_crime_ratio", "hit_rate", "pai", "calibration")
PAIRED = ("exposure_ratio", "exposure_to_crime_ratio")
TRIVIAL_FOR_ALL = ("exposure_ratio", "exposure_to_crime_ratio", "crime_share")  # 1 (or 0) for 'all' by definition
DEFINITIONS = {
    "flagged_share": "sum_t sum_c F[t,c] P[c,g] / (T * P_g): share of the group's residents living in flagged cells, "
                     "averaged over shifts",
    "exposure_ratio": "flagged_share_g / flagged_share_all = (group share of flagged residents) / (group share of "
                      "residents); 1 = flagged in proportion to population",
    "exposure_to_crime_ratio": "(group share of flagged residents) / crime_share_g; >1 = flagged more than its share "
                               "of recorded crime implies",
    "hit_rate": "sum F Y M[.,g] / sum Y M[.,g]: share of group-attributed recorded crime inside flagged cells",
    "pai": "hit_rate_g / (sum F A M[.,g] / (T sum A M[.,g])): hit rate over the flagged share of the group's area",
    "calibration": "sum Yhat M[.,g] / sum Y M[.,g]: predicted over recorded counts within the group's areas",
    "population_share": "P_g / N",
    "crime_share": "sum Y M[.,g] / sum Y M[.,all]: recorded crime attributed to the group by residents' shares per cell",
    "*_minus_<baseline>": "model minus baseline, paired day-block bootstrap interval",
    "membership M": "P[c,g] / N[c] for population groups (fractional), 1[c in quintile] for quintiles",
}


# --- splits ----------------------------------------------------------------------------------------
@dataclass
class Split:
    """Groups as residents (for exposure) and membership weights (for crime, area, predictions) per cell."""

    name: str
    label: str
    groups: list[str]
    population: np.ndarray  # (n_cells, G)
    membership: np.ndarray  # (n_cells, G)
    total_population: np.ndarray  # (n_cells,)
    total_membership: np.ndarray  # (n_cells,)
    cell_labels: np.ndarray  # (n_cells,) one group per cell for MetricFrame ('' = none)
    kind: str = "population"
    group_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.total_population.shape[0]
        for name in ("population", "membership"):
            arr = getattr(self, name)
            if arr.shape != (n, len(self.groups)):
                raise ValueError(f"split {self.name!r}: {name} has shape {arr.shape}, expected {(n, len(self.groups))}")

    def extended(self) -> tuple[np.ndarray, np.ndarray]:
        """Residents and membership with the 'all' column appended last."""
        return (np.column_stack([self.population, self.total_population]),
                np.column_stack([self.membership, self.total_membership]))


def population_split(join: AreaJoin, groups: Sequence[str] | None = None, *, partition: Sequence[str] | None = None,
                     name: str = "group", label: str = "group") -> Split:
    """Population groups with fractional membership P[c,g] / N[c]; majority labels over ``partition``."""
    groups = list(groups or join.groups)
    pop = join.counts[groups].to_numpy(dtype=np.float64)
    total = join.counts[TOTAL].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        membership = np.where(total[:, None] > 0, pop / total[:, None], 0.0)
    return Split(name, label, groups, pop, membership, total, (total > 0).astype(np.float64),
                 join.majority(partition or groups), "population")


def quantile_split(join: AreaJoin, variable: str, n: int = 5, *, name: str | None = None,
                   label: str | None = None) -> Split:
    """Population-weighted quantiles of an area-weighted rate; quantile n = the highest values."""
    q = join.quantiles(variable, n)
    total = join.counts[TOTAL].to_numpy(dtype=np.float64)
    member = (q[:, None] == np.arange(1, n + 1)[None, :]).astype(np.float64)
    groups = [f"Q{i}" for i in range(1, n + 1)]
    values = join.rates[variable].to_numpy()
    ranges = {g: f"{g} ({np.nanmin(values[q == i]):.3g}-{np.nanmax(values[q == i]):.3g})" for i, g in enumerate(groups, 1)
              if (q == i).any()}
    return Split(name or (f"{variable}_quintile" if n == 5 else f"{variable}_q{n}"), label or variable, groups,
                 member * total[:, None], member, total * (q > 0), (q > 0).astype(np.float64),
                 np.where(q > 0, np.char.add("Q", q.astype(str)), ""), "quantile", ranges)


# --- flags -----------------------------------------------------------------------------------------
def flag_masks(expected: np.ndarray, observed: np.ndarray, areas: np.ndarray, shift_ids: np.ndarray,
               coverages: Sequence[float], seed: int = TIE_SEED) -> np.ndarray:
    """(n_cov, n_shifts, n_cells) flagged cells, by the backtest's rule (same k per shift, same tie order)."""
    h = shift_hits(expected, observed, areas, shift_ids, coverages, seed)
    order = ranking(expected, shift_ids, seed)  # the backtest's own, for its frozen forecasts
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), axis=1)
    masks = rank[None, :, :] < h.n_flagged.T[:, :, None]
    hits = (masks * np.asarray(observed, dtype=np.float64)[None]).sum(axis=2).T
    if not np.allclose(hits, h.hits):  # the masks must reproduce the backtest's hits exactly
        raise AssertionError("flag masks disagree with forecasting.metrics.shift_hits")
    return masks


# --- the audit -------------------------------------------------------------------------------------
def _pooled(weights: np.ndarray, parts: dict[str, np.ndarray], pop_g: np.ndarray, area_g: np.ndarray) -> dict:
    """Every measure for every replicate row of ``weights`` (row 0 = the point estimate); last column = 'all'."""
    n = weights.sum(axis=1)[:, None]
    s = {k: weights @ v for k, v in parts.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        flagged_share = s["flagged_pop"] / (pop_g[None, :] * n)
        pop_share_flagged = s["flagged_pop"] / s["flagged_pop"][:, -1:]
        crime_share = s["crimes"] / s["crimes"][:, -1:]
        hit_rate = s["hits"] / s["crimes"]
        area_share = s["flagged_area"] / (area_g[None, :] * n)
        return {
            "flagged_share": flagged_share,
            "exposure_ratio": flagged_share / flagged_share[:, -1:],
            "exposure_to_crime_ratio": pop_share_flagged / crime_share,
            "hit_rate": hit_rate,
            "pai": hit_rate / area_share,
            "calibration": s["predicted"] / s["crimes"],
            "crime_share": crime_share,
        }


def _interval(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1 - level) / 2
    with np.errstate(all="ignore"):
        ok = np.isfinite(reps).any(axis=0)
        low = np.full(reps.shape[1], np.nan)
        high = np.full(reps.shape[1], np.nan)
        if ok.any():
            low[ok], high[ok] = np.nanquantile(reps[:, ok], [alpha, 1 - alpha], axis=0)
    return low, high


def _majority_frame(split: Split, forecaster: str, coverage: float, mask: np.ndarray, observed: np.ndarray,
                    expected: np.ndarray, areas: np.ndarray) -> pd.DataFrame:
    """Hard assignment (one group per cell) with fairlearn's MetricFrame on per-cell totals over the test period."""
    from fairlearn.metrics import MetricFrame

    n_shifts = mask.shape[0]
    flags = mask.sum(axis=0).astype(np.float64)
    per_cell = {"hits": (mask * observed).sum(axis=0), "flags": flags, "pop": split.total_population, "area": areas}

    def total(y_true, y_pred, values):
        return float(np.sum(values))

    def hit_rate(y_true, y_pred, hits):
        return float(np.sum(hits) / np.sum(y_true)) if np.sum(y_true) > 0 else float("nan")

    def pai(y_true, y_pred, hits, flags, area):
        share = np.sum(flags * area) / (n_shifts * np.sum(area))
        return hit_rate(y_true, y_pred, hits) / share if share > 0 else float("nan")

    def calibration(y_true, y_pred):
        return float(np.sum(y_pred) / np.sum(y_true)) if np.sum(y_true) > 0 else float("nan")

    def flagged_share(y_true, y_pred, flags, pop):
        return float(np.sum(flags * pop) / (n_shifts * np.sum(pop))) if np.sum(pop) > 0 else float("nan")

    metrics = {"crimes": lambda y_true, y_pred: float(np.sum(y_true)), "flagged_population": total,
               "hit_rate": hit_rate, "pai": pai, "calibration": calibration, "flagged_share": flagged_share}
    params = {
        "flagged_population": {"values": flags * split.total_population},
        "hit_rate": {"hits": per_cell["hits"]},
        "pai": {"hits": per_cell["hits"], "flags": flags, "area": areas},
        "flagged_share": {"flags": flags, "pop": split.total_population},
    }
    labels = np.where(split.cell_labels == "", "(none)", split.cell_labels)
    frame = MetricFrame(metrics=metrics, y_true=observed.sum(axis=0), y_pred=expected.sum(axis=0),
                        sensitive_features=pd.Series(labels, name="group"), sample_params=params)
    by, overall = frame.by_group, frame.overall
    pop = pd.Series(split.total_population).groupby(labels).sum()
    out = pd.DataFrame({
        "split": split.name, "group": by.index.astype(str), "forecaster": forecaster, "coverage": coverage,
        "n_cells": pd.Series(labels).value_counts().reindex(by.index).to_numpy(),
        "population_share": (pop / pop.sum()).reindex(by.index).to_numpy(),
        "crime_share": (by["crimes"] / overall["crimes"]).to_numpy(),
        "flagged_share": by["flagged_share"].to_numpy(),
        "exposure_ratio": (by["flagged_share"] / overall["flagged_share"]).to_numpy(),
        "exposure_to_crime_ratio": ((by["flagged_population"] / overall["flagged_population"])
                                    / (by["crimes"] / overall["crimes"])).to_numpy(),
        "hit_rate": by["hit_rate"].to_numpy(), "pai": by["pai"].to_numpy(), "calibration": by["calibration"].to_numpy(),
    })
    return out


@dataclass
class BiasAudit:
    """Tidy results: one row per (split, group, forecaster, coverage, measure) with a bootstrap interval."""

    frame: pl.DataFrame
    majority: pl.DataFrame
    splits: list[dict]
    meta: dict
    definitions: dict = field(default_factory=lambda: dict(DEFINITIONS))

    # --- views -----------------------------------------------------------------------------------
    def get(self, split: str, group: str, measure: str, forecaster: str | None = None,
            coverage: float | None = None) -> dict:
        """One row as a dict (value, low, high)."""
        f = self.frame.filter((pl.col("split") == split) & (pl.col("group") == group) & (pl.col("measure") == measure))
        if forecaster is not None:
            f = f.filter(pl.col("forecaster") == forecaster)
        if coverage is not None:
            f = f.filter((pl.col("coverage") - coverage).abs() < 1e-12)
        if f.height != 1:
            raise KeyError(f"{f.height} rows for {split}/{group}/{measure}/{forecaster}/{coverage}")
        return f.row(0, named=True)

    def to_dict(self) -> dict:
        return jsonable({"meta": self.meta, "definitions": self.definitions, "splits": self.splits,
                          "findings": self.findings(),
                          "rows": self.frame.to_dicts(), "majority": self.majority.to_dicts()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def mlflow_metrics(self, prefix: str = "bias") -> dict[str, float]:
        """Flat metric names (``bias.lightgbm.race.black.exposure_ratio.1pct``), with _low/_high for the
        exposure measures; non-finite values are left out (MLflow rejects them)."""
        out: dict[str, float] = {}
        for r in self.frame.filter(pl.col("forecaster").is_not_null()).iter_rows(named=True):
            base = f"{prefix}.{r['forecaster']}.{r['split']}.{r['group']}.{r['measure']}.{r['coverage'] * 100:g}pct"
            keys = {base: r["value"]}
            if r["measure"].startswith(PAIRED):
                keys.update({base.replace(f".{r['measure']}.", f".{r['measure']}_low."): r["low"],
                             base.replace(f".{r['measure']}.", f".{r['measure']}_high."): r["high"]})
            out.update({k: float(v) for k, v in keys.items() if v is not None and math.isfinite(v)})
        return out

    def findings(self) -> list[str]:
        """Plain sentences: per split and coverage, the most and least exposed group for each non-baseline
        forecaster, with the baseline's figure and the paired difference."""
        out = []
        base = self.meta.get("baseline")
        for split in self.splits:
            labels = split.get("group_labels", {})
            for c in self.meta["coverages"]:
                for f in [f for f in self.meta["forecasters"] if f != base]:
                    rows = self.frame.filter((pl.col("split") == split["name"]) & (pl.col("forecaster") == f)
                                             & (pl.col("measure") == "exposure_ratio") & (pl.col("coverage") - c).abs().lt(1e-12)
                                             & pl.col("value").is_not_null()).sort("value")
                    if rows.height == 0:
                        continue
                    parts = []
                    for r in (rows.row(-1, named=True), rows.row(0, named=True)):
                        g = r["group"]
                        text = (f"{labels.get(g, g)} {fmt_num(r['value'])}x [{fmt_num(r['low'])}, {fmt_num(r['high'])}]")
                        if base:
                            b = self.get(split["name"], g, "exposure_ratio", base, c)
                            d = self.get(split["name"], g, f"exposure_ratio_minus_{base}", f, c)
                            text += (f" ({base} {fmt_num(b['value'])}x; difference {d['value']:+.3f} "
                                     f"[{d['low']:+.3f}, {d['high']:+.3f}])")
                        parts.append(text)
                    out.append(f"{split['label']}, {c * 100:g}% of the area, {f}: most exposed {parts[0]}; "
                               f"least exposed {parts[1]} (exposure ratio = group share of flagged residents over "
                               "its share of residents).")
        return out


def fmt_num(x: float | None) -> str:
    """Three significant decimals for small numbers, fewer for large ones."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def audit(
    predictions: Mapping[str, np.ndarray] | np.ndarray,
    observed: np.ndarray,
    areas: np.ndarray,
    origins: np.ndarray,
    per_day: int,
    splits: Sequence[Split],
    *,
    coverages: Sequence[float] = HEADLINE_COVERAGES,
    baseline: str | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    tie_seed: int = TIE_SEED,
    meta: dict | None = None,
) -> BiasAudit:
    """Audit every forecaster in ``predictions`` (name -> (n_shifts, n_cells)) over every split."""
    if isinstance(predictions, np.ndarray):
        predictions = {"model": predictions}
    observed = np.atleast_2d(np.asarray(observed, dtype=np.float64))
    areas = np.asarray(areas, dtype=np.float64)
    origins = np.asarray(origins, dtype=np.int64)
    n_shifts, n_cells = observed.shape
    if origins.shape != (n_shifts,) or areas.shape != (n_cells,):
        raise ValueError(f"origins {origins.shape} / areas {areas.shape} do not match observed {observed.shape}")
    for name, pred in predictions.items():
        if np.shape(pred) != observed.shape:
            raise ValueError(f"predictions {name!r} have shape {np.shape(pred)}, observed {observed.shape}")
    for split in splits:
        if split.total_population.shape[0] != n_cells:
            raise ValueError(f"split {split.name!r} has {split.total_population.shape[0]} cells, the forecasts {n_cells}")
    if baseline is not None and baseline not in predictions:
        baseline = None
    coverages = [float(c) for c in coverages]
    weights = np.vstack([np.ones(n_shifts), bootstrap_weights(day_blocks(origins, per_day), n_boot, seed)])

    rows: list[dict] = []
    majority: list[pd.DataFrame] = []
    ext = {s.name: s.extended() for s in splits}
    crimes = {s.name: observed @ ext[s.name][1] for s in splits}
    replicates: dict[tuple, np.ndarray] = {}

    def emit(split, measure, forecaster, coverage, values):
        low, high = _interval(values[1:], level)
        names = split.groups + ([] if measure.startswith(TRIVIAL_FOR_ALL) else [ALL])
        for g, name in enumerate(names):
            rows.append({"split": split.name, "group": name, "forecaster": forecaster, "coverage": coverage,
                         "measure": measure, "value": float(values[0, g]), "low": float(low[g]), "high": float(high[g])})

    for split in splits:  # forecaster-independent context
        pop, member = ext[split.name]
        pop_g = pop.sum(axis=0)
        point = np.broadcast_to(pop_g / pop_g[-1], (2, pop_g.size))
        for g, name in enumerate(split.groups):
            rows.append({"split": split.name, "group": name, "forecaster": None, "coverage": None,
                         "measure": "population_share", "value": float(point[0, g]), "low": None, "high": None})
        with np.errstate(divide="ignore", invalid="ignore"):
            emit(split, "crime_share", None, None, (weights @ crimes[split.name]) / (weights @ crimes[split.name][:, -1:]))

    order = [baseline] + [f for f in predictions if f != baseline] if baseline else list(predictions)
    for forecaster in order:
        expected = np.asarray(predictions[forecaster], dtype=np.float64)
        masks = flag_masks(expected, observed, areas, origins, coverages, tie_seed)
        for j, coverage in enumerate(coverages):
            flag = masks[j].astype(np.float64)
            caught = flag * observed
            for split in splits:
                pop, member = ext[split.name]
                parts = {"flagged_pop": flag @ pop, "crimes": crimes[split.name], "hits": caught @ member,
                         "flagged_area": flag @ (areas[:, None] * member), "predicted": expected @ member}
                values = _pooled(weights, parts, pop.sum(axis=0), areas @ member)
                for measure in MEASURES:
                    emit(split, measure, forecaster, coverage, values[measure])
                    if measure in PAIRED:
                        replicates[(forecaster, coverage, split.name, measure)] = values[measure]
                        if baseline and forecaster != baseline:
                            diff = values[measure] - replicates[(baseline, coverage, split.name, measure)]
                            emit(split, f"{measure}_minus_{baseline}", forecaster, coverage, diff)
                majority.append(_majority_frame(split, forecaster, coverage, masks[j], observed, expected, areas))

    frame = pl.DataFrame(rows, schema={"split": pl.String, "group": pl.String, "forecaster": pl.String,
                                       "coverage": pl.Float64, "measure": pl.String, "value": pl.Float64,
                                       "low": pl.Float64, "high": pl.Float64})
    frame = frame.with_columns(pl.col("value", "low", "high").fill_nan(None))
    meta = {"title": "Bias audit", **(meta or {}), "forecasters": order, "baseline": baseline, "coverages": coverages,
            "n_shifts": int(n_shifts), "n_cells": int(n_cells), "n_boot": int(n_boot), "level": level, "seed": seed,
            "tie_seed": tie_seed, "per_day": int(per_day), "crimes": float(observed.sum())}
    split_info = [{"name": s.name, "label": s.label, "kind": s.kind, "groups": s.groups, "group_labels": s.group_labels,
                   "population": {g: float(v) for g, v in zip(s.groups + [ALL], ext[s.name][0].sum(axis=0))},
                   "unattributed_crime_share": float(1 - crimes[s.name][:, -1].sum() / max(observed.sum(), 1e-12))}
                  for s in splits]
    return BiasAudit(frame, pl.from_pandas(pd.concat(majority, ignore_index=True)) if majority else pl.DataFrame(),
                     split_info, meta)
