"""Recorded crime by patrol dose, from the planners' patrol log: where patrols look, they find.

Bins compare the dose *in* a shift with what was recorded in it; a Poisson GLM (statsmodels, cluster-robust by
cell) regresses recorded counts at shift t on the dose *before* t (previous shift, same shift the day before),
with the model's expected count as offset, because patrols are sent where the model expects crime. The
discovered/reported split is used only where the data defines it. Part of :mod:`forecasting.diagnostics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import polars as pl

from features.grid import StudyArea
from features.panel import CountPanel

DOSE_EDGES = (0.0, 15.0, 30.0, 60.0)  # minutes: bins 0, (0,15], (15,30], (30,60], >60
DOSE_LAGS = (1, "day")  # previous shift, same shift of the previous day


# --- patrol dose -------------------------------------------------------------------------------------
PATROL_COLUMNS = {"shift_id": pl.Int64, "h3": pl.String, "dose_minutes": pl.Float64}


def _dose_matrix(patrols: pl.DataFrame, area: StudyArea, start: int, stop: int) -> tuple[np.ndarray, dict[str, int]]:
    """Minutes of patrol per (shift in [start, stop), cell), and counts of log rows that could not be placed."""
    missing = [c for c in PATROL_COLUMNS if c not in patrols.columns]
    if missing:
        raise ValueError(f"the patrol log lacks column(s) {missing}; expected {list(PATROL_COLUMNS)}")
    log = patrols.select(pl.col("shift_id").cast(pl.Int64), pl.col("h3").cast(pl.String),
                         pl.col("dose_minutes").cast(pl.Float64))
    bad = log.filter(pl.col("dose_minutes").is_null() | pl.col("dose_minutes").is_nan() | (pl.col("dose_minutes") < 0))
    if bad.height:
        raise ValueError(f"the patrol log has {bad.height} row(s) with a missing, NaN or negative dose_minutes")
    if log["shift_id"].null_count():
        raise ValueError("the patrol log has rows without shift_id")
    cell_int = log["h3"].str.to_integer(base=16, strict=False).cast(pl.UInt64, strict=False)
    idx = np.full(log.height, -1, dtype=np.int64)
    ok = cell_int.is_not_null().to_numpy()
    idx[ok] = area.index_of(cell_int.filter(cell_int.is_not_null()).to_numpy())
    shifts = log["shift_id"].to_numpy()
    inside = (idx >= 0) & (shifts >= start) & (shifts < stop)
    dose = np.bincount((shifts[inside] - start) * len(area) + idx[inside], weights=log["dose_minutes"].to_numpy()[inside],
                       minlength=(stop - start) * len(area)).reshape(stop - start, len(area))
    dropped = {"unparseable_h3": int((~ok).sum()), "outside_study_area": int((ok & (idx < 0)).sum()),
               "outside_period": int(((idx >= 0) & ~inside).sum())}
    return dose, dropped


def dose_bin_edges(doses: np.ndarray, bins: Sequence[float] | str = DOSE_EDGES, quantiles: int = 4) -> np.ndarray:
    """Bin edges (first is 0): bins are 0, (e0, e1], ..., > e_last. ``"quantile"`` splits positive doses."""
    if isinstance(bins, str):
        if bins != "quantile":
            raise ValueError(f"dose bins must be edges in minutes or 'quantile', got {bins!r}")
        positive = doses[doses > 0]
        inner = np.quantile(positive, np.linspace(0, 1, quantiles + 1)[1:-1]) if positive.size else np.array([])
        return np.unique(np.concatenate([[0.0], inner]))
    edges = np.asarray(bins, dtype=np.float64)
    if edges.size == 0 or edges[0] != 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"dose bin edges must start at 0 and increase, got {list(edges)}")
    return edges


def _bin_labels(edges: np.ndarray) -> tuple[list[str], list[str]]:
    e = [f"{x:g}" for x in edges]
    labels = ["0"] + [f"({a}, {b}]" for a, b in zip(e[:-1], e[1:])] + [f">{e[-1]}"]
    keys = ["0"] + [f"{a}-{b}" for a, b in zip(e[:-1], e[1:])] + [f"{e[-1]}plus"]
    return labels, keys


def _lag_name(lag: int, per_day: int) -> str:
    return {0: "same_shift", 1: "prev_shift", per_day: "prev_day"}.get(lag, f"lag{lag}")


@dataclass
class PatrolDiagnostics:
    """Recorded crime by patrol dose and the dose regression."""

    bins: pl.DataFrame  # outcome, bin, key, lo, hi, cell_shifts, recorded, rate (+CI), expected, obs_exp (+CI)
    regression: pl.DataFrame  # outcome, term, coef, se, rate_ratio_per_60min, low, high, p_value
    method: str
    split_available: bool
    split_note: str
    n_cell_shifts: int
    n_patrolled: int
    total_dose_hours: float
    dropped: dict[str, int]
    notes: list[str]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"patrolled_cell_shifts": float(self.n_patrolled), "dose_hours": self.total_dose_hours}
        for r in self.bins.filter(pl.col("outcome") == "all").iter_rows(named=True):
            out[f"rate.{r['key']}"] = r["rate"]
            out[f"obs_exp.{r['key']}"] = r["obs_exp"]
        for r in self.regression.filter(pl.col("term") != "intercept").iter_rows(named=True):
            head = "" if r["outcome"] == "all" else f"{r['outcome']}."
            out[f"{head}rate_ratio.{r['term']}"] = r["rate_ratio_per_60min"]
            out[f"{head}rate_ratio_low.{r['term']}"] = r["low"]
            out[f"{head}rate_ratio_high.{r['term']}"] = r["high"]
        return out

    def payload(self) -> dict[str, Any]:
        return {"bins": self.bins.to_dicts(), "regression": self.regression.to_dicts(), "method": self.method,
                "split_available": self.split_available, "split_note": self.split_note,
                "n_cell_shifts": self.n_cell_shifts, "n_patrolled": self.n_patrolled,
                "total_dose_hours": self.total_dose_hours, "dropped_log_rows": self.dropped, "notes": self.notes}


def _outcomes(panel: CountPanel, origins: np.ndarray, observed: np.ndarray,
              discovered: Sequence[str] | None) -> tuple[dict[str, np.ndarray], bool, str]:
    """Recorded counts to analyse: all, plus discovered/reported when the data says which is which."""
    names = list(discovered) if discovered is not None else panel.meta.get("discovered_categories")
    out = {"all": observed}
    if not names:
        return out, False, ("not available: the panel has no discovered/reported flag and its profile defines no "
                            "discovered categories (panel.meta['discovered_categories']), so only all recorded crime "
                            "is analysed; the split is not inferred from category names")
    known = cast(list[int], panel.category_index(names))  # a list for a list of names; raises naming any unknown one
    rest = [c for i, c in enumerate(panel.categories) if i not in known]
    lo, hi = int(origins[0]), int(origins[-1]) + 1
    rows = origins - lo
    out["discovered"] = panel.dense(lo, hi, category=names, dtype=np.float64)[rows]
    out["reported"] = panel.dense(lo, hi, category=rest, dtype=np.float64)[rows] if rest else np.zeros_like(observed)
    return out, True, f"discovered = categories {names}; reported = the other {len(rest)} categories"


def _bootstrap_rates(y: np.ndarray, mu: np.ndarray, which: np.ndarray, n_bins: int, n_boot: int, seed: int,
                     level: float) -> dict[str, np.ndarray]:
    """Per-bin rate and observed/expected with cell-block bootstrap intervals (cells resampled whole)."""
    n_cells = y.shape[1]
    cell = np.broadcast_to(np.arange(n_cells), y.shape).ravel()
    flat = cell * n_bins + which.ravel()
    size = n_cells * n_bins
    Y = np.bincount(flat, weights=y.ravel(), minlength=size).reshape(n_cells, n_bins)
    M = np.bincount(flat, weights=mu.ravel(), minlength=size).reshape(n_cells, n_bins)
    N = np.bincount(flat, minlength=size).reshape(n_cells, n_bins).astype(np.float64)
    W = np.random.default_rng(seed).multinomial(n_cells, np.full(n_cells, 1 / n_cells), size=n_boot).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_b, oe_b = (W @ Y) / (W @ N), (W @ Y) / (W @ M)
        rate, oe = Y.sum(0) / N.sum(0), Y.sum(0) / M.sum(0)
    a = (1 - level) / 2

    def q(v: np.ndarray, p: float) -> np.ndarray:
        v = np.where(np.isfinite(v), v, np.nan)
        out = np.full(n_bins, np.nan)
        seen = np.isfinite(v).any(axis=0)
        out[seen] = np.nanquantile(v[:, seen], p, axis=0)
        return out

    return {"cell_shifts": N.sum(0), "recorded": Y.sum(0), "expected": M.sum(0) / np.maximum(N.sum(0), 1),
            "rate": rate, "rate_low": q(rate_b, a), "rate_high": q(rate_b, 1 - a),
            "obs_exp": oe, "obs_exp_low": q(oe_b, a), "obs_exp_high": q(oe_b, 1 - a)}


def _poisson_glm(y: np.ndarray, mu: np.ndarray, doses: np.ndarray, names: list[str], level: float,
                 control: str) -> tuple[list[dict], str]:
    """Poisson GLM of counts on dose (hours), cell-clustered sandwich errors.

    ``control="offset"``: log(expected) is an offset; cell-shifts with no dose in any term share covariates,
    so they are collapsed to one row per cell (sum of counts, log of summed expected): the likelihood, the
    cluster scores and the Hessian are unchanged, and the fit runs on patrolled rows plus one row per cell.
    ``control="covariate"``: log(expected) enters with its own slope, on every row."""
    try:
        import statsmodels
        import statsmodels.api as sm
    except ImportError as exc:  # pragma: no cover - statsmodels ships with tobler, a declared dependency
        raise ImportError("the dose regression needs statsmodels (pip install statsmodels)") from exc
    n_c = y.shape[1]
    mu = np.maximum(mu, 1e-9)  # a zero forecast would make the offset -inf
    log_mu = np.log(mu)
    cell = np.broadcast_to(np.arange(n_c), y.shape).ravel()
    D = doses.reshape(len(names), -1).T / 60.0  # hours, so exp(coef) is the rate ratio per 60 minutes
    if control == "offset":
        dosed = D.any(axis=1)
        zero_y = np.bincount(cell[~dosed], weights=y.ravel()[~dosed], minlength=n_c)
        zero_m = np.bincount(cell[~dosed], weights=mu.ravel()[~dosed], minlength=n_c)
        keep = np.bincount(cell[~dosed], minlength=n_c) > 0
        yy = np.concatenate([y.ravel()[dosed], zero_y[keep]])
        off = np.concatenate([log_mu.ravel()[dosed], np.log(zero_m[keep])])
        XX = np.vstack([D[dosed], np.zeros((int(keep.sum()), len(names)))])
        groups = np.concatenate([cell[dosed], np.flatnonzero(keep)])
        X = sm.add_constant(XX, has_constant="add")
        model = sm.GLM(yy, X, family=sm.families.Poisson(), offset=off)
        terms = ["intercept", *names]
    elif control == "covariate":
        X = sm.add_constant(np.column_stack([D, log_mu.ravel()]), has_constant="add")
        model = sm.GLM(y.ravel(), X, family=sm.families.Poisson())
        groups = cell
        terms = ["intercept", *names, "log_expected"]
    else:
        raise ValueError(f"control must be 'offset' or 'covariate', got {control!r}")
    fit = model.fit(cov_type="cluster", cov_kwds={"groups": groups})
    ci = fit.conf_int(alpha=1 - level)
    rows = [{"term": t, "coef": float(fit.params[i]), "se": float(fit.bse[i]),
             "rate_ratio_per_60min": float(np.exp(fit.params[i])), "low": float(np.exp(ci[i, 0])),
             "high": float(np.exp(ci[i, 1])), "p_value": float(fit.pvalues[i])} for i, t in enumerate(terms)]
    control_text = ("log(model expected count) as offset; unpatrolled cell-shifts collapsed per cell (exact)"
                    if control == "offset" else "log(model expected count) as a covariate")
    method = (f"Poisson GLM (statsmodels {statsmodels.__version__}), log link, {control_text}; cluster-robust "
              f"sandwich standard errors by cell ({len(np.unique(groups))} clusters); Wald {level:.0%} intervals; "
              f"rate ratios per 60 minutes of dose")
    return rows, method


def patrol_diagnostics(
    patrols: pl.DataFrame, panel: CountPanel, origins: np.ndarray, expected: np.ndarray, observed: np.ndarray,
    *, start_shift: int | None = None, end_shift: int | None = None, bins: Sequence[float] | str = DOSE_EDGES,
    lags: Sequence[int | str] = DOSE_LAGS, discovered_categories: Sequence[str] | None = None,
    control: str = "offset", n_boot: int = 1000, level: float = 0.95, seed: int = 0,
) -> PatrolDiagnostics:
    """Recorded crime by patrol dose and the regression of recorded counts on earlier dose.

    ``patrols`` is the patrol log (``shift_id``, ``h3``, ``dose_minutes``); shifts in [start_shift, end_shift)
    (default: the log's span) count as logged, and a cell absent from a logged shift had zero dose. Only
    origins whose needed shifts are all logged are analysed. Bins compare the dose *in* the shift with what
    was recorded in it (where patrols look, they find); the regression uses the dose *before* the shift
    (``lags`` in shifts, ``"day"`` = one day), with the model's expected count as control, because patrols
    are sent where the model expects crime."""
    origins = np.asarray(origins, dtype=np.int64)
    expected = np.atleast_2d(np.asarray(expected, dtype=np.float64))
    observed = np.atleast_2d(np.asarray(observed, dtype=np.float64))
    if expected.shape != (origins.size, panel.n_cells) or observed.shape != expected.shape:
        raise ValueError(f"expected and observed must be (n_origins, n_cells) = {(origins.size, panel.n_cells)}, "
                         f"got {expected.shape} and {observed.shape}")
    per_day = panel.calendar.per_day
    lag_shifts = sorted({per_day if lag == "day" else int(lag) for lag in lags})
    if any(lag < 0 for lag in lag_shifts):
        raise ValueError(f"dose lags must be >= 0 shifts, got {list(lags)}")
    if patrols.height == 0 and (start_shift is None or end_shift is None):
        raise ValueError("the patrol log is empty: give start_shift and end_shift to analyse a period with no patrols")
    log_start = cast(int, patrols["shift_id"].min()) if start_shift is None else int(start_shift)
    log_end = cast(int, patrols["shift_id"].max()) + 1 if end_shift is None else int(end_shift)
    max_lag = max(lag_shifts + [0])
    t0 = int(origins[0]) - max_lag
    dose, dropped = _dose_matrix(patrols, panel.study_area, t0, int(origins[-1]) + 1)
    logged = lambda shifts: (shifts >= log_start) & (shifts < log_end)  # noqa: E731
    notes = []
    outcomes, split, split_note = _outcomes(panel, origins, observed, discovered_categories)

    # bins: contemporaneous dose
    now = logged(origins)
    if not now.any():
        raise ValueError(f"no test origin falls in the patrol log's span [{log_start}, {log_end})")
    d_now = dose[origins[now] - t0]
    edges = dose_bin_edges(d_now, bins)
    labels, keys = _bin_labels(edges)
    which = np.searchsorted(edges, d_now, side="left")
    frames = []
    for name, y in outcomes.items():
        stats = _bootstrap_rates(y[now], expected[now], which, len(labels), n_boot, seed, level)
        if name != "all":  # the model forecasts all recorded crime, so O/E of a part is not meaningful
            for k in ("obs_exp", "obs_exp_low", "obs_exp_high"):
                stats[k] = np.full(len(labels), np.nan)
        frames.append(pl.DataFrame({"outcome": name, "bin": labels, "key": keys,
                                    "lo": [0.0, *edges], "hi": [0.0, *edges[1:], float("inf")], **stats}))
    bins_frame = pl.concat(frames)

    # regression: lagged dose
    usable = np.all([logged(origins - lag) for lag in lag_shifts], axis=0)
    names = [_lag_name(lag, per_day) for lag in lag_shifts]
    reg_rows, method = [], "not fitted"
    if not usable.any():
        notes.append("regression not fitted: no origin has all its lagged shifts inside the patrol log")
    else:
        lagged = np.stack([dose[origins[usable] - lag - t0] for lag in lag_shifts])
        if not (lagged > 0).any():
            notes.append("regression not fitted: no patrol dose in the lagged shifts")
        else:
            for name, y in outcomes.items():
                rows, method = _poisson_glm(y[usable], expected[usable], lagged, names, level, control)
                reg_rows += [{"outcome": name, **r} for r in rows]
        if usable.sum() < origins.size:
            notes.append(f"{int(origins.size - usable.sum())} of {origins.size} origins left out of the regression: "
                         "their lagged shifts fall outside the patrol log")
    if any(dropped.values()):
        notes.append(f"patrol log rows not placed: {dropped}")
    regression = pl.DataFrame(reg_rows, schema={"outcome": pl.String, "term": pl.String, "coef": pl.Float64,
                                                "se": pl.Float64, "rate_ratio_per_60min": pl.Float64,
                                                "low": pl.Float64, "high": pl.Float64, "p_value": pl.Float64})
    return PatrolDiagnostics(bins=bins_frame, regression=regression, method=method, split_available=split,
                             split_note=split_note, n_cell_shifts=int(d_now.size), n_patrolled=int((d_now > 0).sum()),
                             total_dose_hours=float(d_now.sum() / 60), dropped=dropped, notes=notes)


# --- human oversight: flagged cells planners did not patrol, and why --------------------------------------

OVERRIDE_REASONS = ("other_priorities", "no_access", "no_resources", "safety", "other")


@dataclass
class OverrideSummary:
    """The share of flags not patrolled, by reason. ``flags`` are the flagged cell-shifts given, or else the
    cell-shifts planners accounted for (a patrol dose or an override recorded)."""

    flags: int
    not_patrolled: int
    by_reason: pl.DataFrame  # reason, code, count, share_of_flags (one row per reason and code)
    contradicted: int  # overrides of a cell-shift that also has patrol minutes recorded
    outside_flags: int  # overrides of a cell-shift that was not among the given flags
    flags_source: str

    @property
    def share_not_patrolled(self) -> float:
        return self.not_patrolled / self.flags if self.flags else float("nan")

    def metrics(self) -> dict[str, float]:
        out = {"flags": float(self.flags), "not_patrolled": float(self.not_patrolled),
               "share_not_patrolled": self.share_not_patrolled, "contradicted": float(self.contradicted)}
        totals = self.by_reason.group_by("reason").agg(pl.col("count").sum(), pl.col("share_of_flags").sum())
        shares = dict(zip(totals["reason"].to_list(), totals["share_of_flags"].to_list()))
        for reason in OVERRIDE_REASONS:
            out[f"share_not_patrolled.{reason}"] = float(shares.get(reason, 0.0)) if self.flags else float("nan")
        return out

    def payload(self) -> dict[str, Any]:
        return {"flags": self.flags, "not_patrolled": self.not_patrolled,
                "share_not_patrolled": self.share_not_patrolled, "by_reason": self.by_reason.to_dicts(),
                "contradicted": self.contradicted, "outside_flags": self.outside_flags,
                "flags_source": self.flags_source}


def override_summary(overrides: pl.DataFrame, patrols: pl.DataFrame, flags: pl.DataFrame | None = None) -> OverrideSummary:
    """Count overrides (``shift_id``, ``h3``, ``reason``, ``code``) against the flags (``shift_id``, ``h3``).

    A cell-shift overridden several times counts once, under its first recorded reason (the log is ordered)."""
    keys = ["shift_id", "h3"]
    first = overrides.select(*keys, "reason", "code").unique(keys, keep="first", maintain_order=True)
    dosed = patrols.filter(pl.col("dose_minutes") > 0).select(keys).unique()
    if flags is None:
        universe = pl.concat([dosed, first.select(keys)]).unique()
        source = "cell-shifts with a patrol dose or an override recorded"
    else:
        universe = flags.select(keys).unique()
        source = "the flags given"
    counted = first.join(universe, on=keys, how="semi")
    n = universe.height
    by_reason = (counted.group_by("reason", "code").len("count")
                 .with_columns(share_of_flags=pl.col("count") / n if n else pl.lit(float("nan")))
                 .sort(["count", "reason", "code"], descending=[True, False, False], nulls_last=True))
    return OverrideSummary(flags=n, not_patrolled=counted.height, by_reason=by_reason,
                           contradicted=first.join(dosed, on=keys, how="semi").height,
                           outside_flags=first.height - counted.height, flags_source=source)
