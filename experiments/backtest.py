"""Rolling-origin backtest: every forecaster on identical inputs, a forecast for every shift of the test
period, refitted on a cadence (monthly by default) with only the data before each refit.

Model selection happens inside ``fit`` on the validation period that precedes each cutoff; the test period
is touched once, here, after the forecasters' settings are fixed.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Callable
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from features.matrix import build_targets
from features.panel import CountPanel
from forecasting.base import Forecaster
from forecasting.baselines import KDE, SEPP, Naive, ProspectiveHotspot
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import DEFAULT_COVERAGES, MetricSummary, shift_hits, summarise


def default_forecasters(seed: int = 0) -> dict[str, Callable[[], Forecaster]]:
    return {
        "lightgbm": lambda: LightGBMForecaster(seed=seed),
        "naive": lambda: Naive(window_days=28),
        "kde": lambda: KDE(),
        "prospective": lambda: ProspectiveHotspot(),
        "sepp": lambda: SEPP(warm_start=True),
    }


def month_starts(start: date, end: date) -> list[date]:
    out, d = [], date(start.year, start.month, 1)
    while d < end:
        out.append(max(d, start))
        d = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    return out


@dataclass
class BacktestResult:
    origins: np.ndarray  # (n_shifts,)
    observed: np.ndarray  # (n_shifts, n_cells)
    predictions: dict[str, np.ndarray]  # name -> (n_shifts, n_cells)
    areas: np.ndarray
    per_day: int
    cutoffs: list[int]
    fit_seconds: dict[str, float]
    predict_seconds: dict[str, float]
    last_models: dict[str, Forecaster] = field(default_factory=dict)

    def summaries(self, coverages=DEFAULT_COVERAGES, n_boot: int = 1000, seed: int = 0) -> dict[str, MetricSummary]:
        return {
            name: summarise(pred, self.observed, self.areas, self.origins, self.per_day, coverages, n_boot, seed=seed)
            for name, pred in self.predictions.items()
        }

    def tidy(self, coverages=DEFAULT_COVERAGES) -> pl.DataFrame:
        """One row per (forecaster, shift, coverage): the per-shift ingredients every pooled metric uses."""
        frames = []
        for name, pred in self.predictions.items():
            h = shift_hits(pred, self.observed, self.areas, self.origins, coverages)
            n_cov = len(h.coverages)
            frames.append(
                pl.DataFrame(
                    {
                        "forecaster": name,
                        "shift_id": np.repeat(self.origins, n_cov),
                        "coverage": np.tile(h.coverages, self.origins.size),
                        "cells_flagged": h.n_flagged.ravel(),
                        "area_share": h.area_share.ravel(),
                        "hits": h.hits.ravel(),
                        "best_possible_hits": h.best.ravel(),
                        "crimes": np.repeat(h.crimes, n_cov),
                        "predicted_in_flagged": h.predicted_in.ravel(),
                        "predicted_total": np.repeat(h.predicted, n_cov),
                    }
                )
            )
        return pl.concat(frames)


def run_backtest(
    panel: CountPanel,
    test_start: date,
    test_end: date,
    forecasters: dict[str, Callable[[], Forecaster]] | None = None,
    category: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> BacktestResult:
    """Forecast every shift starting in [test_start, test_end) (local dates), refitting monthly."""
    forecasters = forecasters or default_forecasters()
    zone = ZoneInfo(panel.calendar.timezone)
    to_dt = lambda d: datetime(d.year, d.month, d.day, tzinfo=zone)  # noqa: E731
    origins = panel.calendar.shift_range(to_dt(test_start), to_dt(test_end))
    if origins.size == 0 or origins[-1] >= panel.end_shift:
        raise ValueError(f"the panel (shifts {panel.first_shift}..{panel.end_shift}) does not cover the test period")
    blocks = [panel.calendar.shift_of(to_dt(d)) for d in month_starts(test_start, test_end)]
    blocks = sorted({max(b, int(origins[0])) for b in blocks}) + [int(origins[-1]) + 1]
    predictions = {name: np.zeros((origins.size, panel.n_cells)) for name in forecasters}
    fit_seconds = {name: 0.0 for name in forecasters}
    predict_seconds = {name: 0.0 for name in forecasters}
    models = {name: make() for name, make in forecasters.items()}  # refitted in place: caches and warm starts carry over
    for cutoff, stop in zip(blocks[:-1], blocks[1:]):
        block = origins[(origins >= cutoff) & (origins < stop)]
        rows = np.searchsorted(origins, block)
        for name, model in models.items():
            t0 = time.perf_counter()
            if category is not None:
                model.category = category
            model.fit(panel, cutoff)
            t1 = time.perf_counter()
            predictions[name][rows] = model.predict(panel, block)
            fit_seconds[name] += t1 - t0
            predict_seconds[name] += time.perf_counter() - t1
        if progress:
            progress(f"refit at shift {cutoff}: forecast {block.size} shifts")
    observed = build_targets(panel, origins, category).reshape(origins.size, panel.n_cells).astype(np.float64)
    return BacktestResult(
        origins=origins, observed=observed, predictions=predictions, areas=panel.study_area.areas_km2,
        per_day=panel.calendar.per_day, cutoffs=blocks[:-1], fit_seconds=fit_seconds,
        predict_seconds=predict_seconds, last_models=models,
    )


def per_category_hit_rates(result: BacktestResult, panel: CountPanel, coverages=(0.01, 0.05)) -> pl.DataFrame:
    """Hit rate of each forecaster's (all-crime) map against each category's incidents."""
    rows = []
    for category in panel.categories:
        observed = build_targets(panel, result.origins, category).reshape(result.origins.size, panel.n_cells)
        if observed.sum() == 0:
            continue
        for name, pred in result.predictions.items():
            h = shift_hits(pred, observed, result.areas, result.origins, coverages)
            rates = h.hits.sum(axis=0) / h.crimes.sum()
            rows += [
                {"category": category, "forecaster": name, "coverage": float(c), "hit_rate": float(r), "crimes": float(h.crimes.sum())}
                for c, r in zip(h.coverages, rates)
            ]
    return pl.DataFrame(rows)


@dataclass
class TrackedBacktest:
    result: BacktestResult
    summaries: dict[str, MetricSummary]
    claims: list
    decision: object | None
    model_version: str | None
    run_id: str
    out_dir: Path


def run_tracked_backtest(
    panel: CountPanel,
    source: str,
    settings,
    test_start: date,
    test_end: date,
    *,
    forecasters: dict[str, Callable[[], Forecaster]] | None = None,
    out_dir=None,
    claimed_ratio: float = 1.5,
    claim_coverages=(0.01, 0.05),
    n_boot: int = 1000,
    register: bool = True,
    final_model: Callable[[], Forecaster] | None = None,
    progress: Callable[[str], None] | None = None,
    audit_layer=None,
) -> TrackedBacktest:
    """The whole researcher's run, tracked in MLflow: backtest every forecaster, claim test, report, then fit
    the candidate on all data, register it, and move ``champion`` only if the backtest passes the gate.
    The feedback-loop diagnostics (and, given ``audit_layer``, the bias audit) are logged into the same run."""
    import json

    import mlflow

    from experiments.assess import assess
    from experiments.report import write_report
    from features.matrix import build_features
    from forecasting.claim import against_every_baseline, claim_test
    from forecasting.tracking import apply_promotion, code_version, configure, log_model, promotion_decision

    forecasters = forecasters or default_forecasters()
    out_dir = Path(out_dir or settings.data_dir / "backtests" / f"{source}-r{panel.study_area.resolution}-{test_start:%Y%m%d}-{test_end:%Y%m%d}")
    out_dir.mkdir(parents=True, exist_ok=True)
    configure(settings)
    say = progress or (lambda message: None)
    with mlflow.start_run(run_name=f"backtest-{source}-{test_start:%Y%m%d}-{test_end:%Y%m%d}") as run:
        mlflow.set_tags({"kind": "backtest", "city": source})
        params = {
            "city": source, "resolution": panel.study_area.resolution, "shift_starts": ",".join(panel.calendar.labels),
            "timezone": panel.calendar.timezone, "test_start": str(test_start), "test_end": str(test_end),
            "refit": "monthly", "n_cells": panel.n_cells, "data_fingerprint": panel.fingerprint(),
            "code_version": code_version(), "claimed_ratio": claimed_ratio, "n_boot": n_boot,
        }
        for name, make in forecasters.items():
            for key, value in make().params().items():
                if key not in ("category",) and not hasattr(value, "__dict__"):
                    params[f"{name}.{key}"] = value
        mlflow.log_params(params)
        result = run_backtest(panel, test_start, test_end, forecasters, progress=say)
        say("metrics and intervals")
        summaries = result.summaries(n_boot=n_boot)
        claims = []
        if "lightgbm" in result.predictions and "naive" in result.predictions:
            claims = claim_test(
                result.predictions["lightgbm"], result.predictions["naive"], result.observed, result.areas,
                result.origins, result.per_day, coverages=claim_coverages, claimed_ratio=claimed_ratio,
                n_boot=max(n_boot, 2000), names=("lightgbm", "naive"),
            )
        for name, summary in summaries.items():
            for j, cov in enumerate(summary.coverages):
                tag = f"{cov * 100:g}pct"
                for metric in ("hit_rate", "pai", "pei"):
                    mlflow.log_metric(f"{name}.{metric}.{tag}", float(summary.point[metric][j]))
                mlflow.log_metric(f"{name}.hit_rate_low.{tag}", float(summary.low["hit_rate"][j]))
                mlflow.log_metric(f"{name}.hit_rate_high.{tag}", float(summary.high["hit_rate"][j]))
            mlflow.log_metric(f"{name}.poisson_deviance", summary.deviance)
            mlflow.log_metric(f"{name}.fit_seconds", result.fit_seconds[name])
        for claim in claims:
            mlflow.log_metric(f"claim.ratio.{claim.coverage * 100:g}pct", claim.ratio)
            mlflow.set_tag(f"claim.verdict.{claim.coverage * 100:g}pct", claim.verdict)
        pairwise = []
        if "lightgbm" in result.predictions:
            pairwise = against_every_baseline(result.predictions, result.observed, result.areas, result.origins,
                                              result.per_day, coverages=claim_coverages, n_boot=max(n_boot, 2000))
            for p in pairwise:
                mlflow.log_metric(f"lightgbm_minus_{p.baseline}.hit_rate_low.{p.coverage * 100:g}pct", p.difference_low)
            (out_dir / "pairwise.json").write_text(json.dumps([p.as_dict() for p in pairwise], indent=2))
        result.tidy().write_parquet(out_dir / "results.parquet")
        np.savez_compressed(out_dir / "predictions.npz", origins=result.origins, observed=result.observed,
                            areas=result.areas, **{f"pred_{k}": v for k, v in result.predictions.items()})
        per_category = per_category_hit_rates(result, panel)
        meta = {k: params[k] for k in ("city", "resolution", "shift_starts", "timezone", "test_start", "test_end",
                                        "refit", "n_cells", "data_fingerprint", "code_version")}
        write_report(result, panel, out_dir, title=f"Backtest: {source}, {test_start} to {test_end}",
                             summaries=summaries, claims=claims + pairwise, per_category=per_category, meta=meta)
        if "lightgbm" in result.last_models:
            importance = result.last_models["lightgbm"].feature_importance()
            (out_dir / "feature_importance.json").write_text(json.dumps(importance, indent=2))
        (out_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "city": source}, indent=2))
        mlflow.log_artifacts(str(out_dir), artifact_path="backtest")
        if "lightgbm" in result.predictions:
            say("feedback-loop diagnostics" + (" and bias audit" if audit_layer is not None else ""))
            assess(result, panel, out_dir, audit_layer=audit_layer, n_boot=n_boot)

        decision, version = None, None
        if register and "lightgbm" in forecasters:
            say("fit the candidate on all data and register it")
            make = final_model or forecasters["lightgbm"]
            model = make().fit(panel, panel.end_shift)
            sample = build_features(panel, panel.end_shift - 1, model.features).frame().drop("origin", "cell").head(200)
            info = log_model(model, sample.to_pandas(), source)
            version = str(info.registered_model_version)
            decision = promotion_decision(summaries)
            apply_promotion(source, version, decision, run.info.run_id)
            mlflow.log_dict(decision.as_dict(), "promotion.json")
            mlflow.set_tags({"promotion": "promoted" if decision.promote else "rejected", "model_version": version})
            (out_dir / "promotion.json").write_text(json.dumps({**decision.as_dict(), "version": version}, indent=2))
    return TrackedBacktest(result, summaries, claims, decision, version, run.info.run_id, out_dir)
