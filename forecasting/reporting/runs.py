"""The tracked runs users start from the CLI: a backtest with its claim test, report, assessments and promotion
gate, and a training run; each is one MLflow run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np

from features.matrix import build_features
from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.backtest import BacktestResult, default_forecasters, per_category_hit_rates, run_backtest
from forecasting.base import Forecaster
from forecasting.claim import against_every_baseline, claim_test
from forecasting.metrics import HEADLINE_COVERAGES, MetricSummary
from forecasting.promotion import PromotionDecision, promotion_decision
from forecasting.reporting.assess import assess, assess_training
from forecasting.reporting.report import write_report
from forecasting.reporting.tracking import apply_promotion, code_version, configure, log_model
from forecasting.saved import protocol_of, save_backtest

Progress = Callable[[str], None]


@dataclass
class TrackedBacktest:
    result: BacktestResult
    summaries: dict[str, MetricSummary]
    claims: list
    decision: PromotionDecision | None
    model_version: str | None
    run_id: str
    out_dir: Path


def _flat_params(name: str, model: Forecaster) -> dict[str, object]:
    return {f"{name}.{key}": value for key, value in model.params().items()
            if key != "category" and not hasattr(value, "__dict__")}


def _register(model: Forecaster, panel: CountPanel, source: str):
    """Log a fitted forecaster as the registered pyfunc model of the city, with a feature sample as signature."""
    sample = build_features(panel, panel.end_shift - 1, model.features).frame().drop("origin", "cell").head(200)
    return log_model(model, sample.to_pandas(), source)


def _log_summaries(summaries: dict[str, MetricSummary], result: BacktestResult) -> None:
    for name, summary in summaries.items():
        for j, cov in enumerate(summary.coverages):
            tag = f"{cov * 100:g}pct"
            for metric in ("hit_rate", "pai", "pei"):
                mlflow.log_metric(f"{name}.{metric}.{tag}", float(summary.point[metric][j]))
            mlflow.log_metric(f"{name}.hit_rate_low.{tag}", float(summary.low["hit_rate"][j]))
            mlflow.log_metric(f"{name}.hit_rate_high.{tag}", float(summary.high["hit_rate"][j]))
        mlflow.log_metric(f"{name}.poisson_deviance", summary.deviance)
        mlflow.log_metric(f"{name}.fit_seconds", result.fit_seconds[name])


def run_tracked_backtest(
    panel: CountPanel,
    source: str,
    settings: Settings,
    test_start: date,
    test_end: date,
    *,
    forecasters: dict[str, Callable[[], Forecaster]] | None = None,
    out_dir: Path | None = None,
    claimed_ratio: float = 1.5,
    claim_coverages=HEADLINE_COVERAGES,
    n_boot: int = 1000,
    register: bool = True,
    final_model: Callable[[], Forecaster] | None = None,
    progress: Progress | None = None,
    audit_layer=None,
) -> TrackedBacktest:
    """The whole researcher's run, tracked in MLflow: backtest every forecaster, claim test, report, then fit
    the candidate on all data, register it, and move ``champion`` only if the backtest passes the gate.
    The feedback-loop diagnostics (and, given ``audit_layer``, the bias audit) are logged into the same run."""
    forecasters = forecasters or default_forecasters()
    resolution = panel.study_area.resolution
    out_dir = Path(out_dir or DataPaths(settings).backtest(source, test_start, test_end, resolution))
    out_dir.mkdir(parents=True, exist_ok=True)
    configure(settings)
    say = progress or (lambda message: None)
    with mlflow.start_run(run_name=f"backtest-{source}-{test_start:%Y%m%d}-{test_end:%Y%m%d}") as run:
        mlflow.set_tags({"kind": "backtest", "city": source})
        meta = protocol_of(panel, source, test_start=str(test_start), test_end=str(test_end), refit="monthly",
                           code_version=code_version())
        params: dict[str, object] = {**meta, "claimed_ratio": claimed_ratio, "n_boot": n_boot}
        for name, make in forecasters.items():
            params.update(_flat_params(name, make()))
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
        _log_summaries(summaries, result)
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
        save_backtest(out_dir, result.origins, result.observed, result.areas, result.predictions, meta)
        write_report(result, panel, out_dir, title=f"Backtest: {source}, {test_start} to {test_end}",
                     summaries=summaries, claims=claims + pairwise, per_category=per_category_hit_rates(result, panel),
                     meta=meta)
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
            info = _register(make().fit(panel, panel.end_shift), panel, source)
            version = str(info.registered_model_version)
            decision = promotion_decision(summaries)
            apply_promotion(source, version, decision, run.info.run_id)
            mlflow.log_dict(decision.as_dict(), "promotion.json")
            mlflow.set_tags({"promotion": "promoted" if decision.promote else "rejected", "model_version": version})
            (out_dir / "promotion.json").write_text(json.dumps({**decision.as_dict(), "version": version}, indent=2))
    return TrackedBacktest(result, summaries, claims, decision, version, run.info.run_id, out_dir)


@dataclass
class TrainingRun:
    run_id: str
    version: str | None
    model: Forecaster


def run_training(panel: CountPanel, source: str, settings: Settings, model: Forecaster, cutoff: int, *,
                 audit_layer=None, progress: Progress | None = None) -> TrainingRun:
    """Fit one forecaster on the shifts before ``cutoff`` and register it (never promoted: only a backtest that
    passes the gate moves the champion). The run also logs the diagnostics of its validation window."""
    say = progress or (lambda message: None)
    configure(settings)
    with mlflow.start_run(run_name=f"train-{source}") as run:
        mlflow.set_tags({"kind": "train", "city": source})
        mlflow.log_params({**protocol_of(panel, source, cutoff_shift=cutoff, code_version=code_version()),
                           "category": model.category or "all",
                           **{k: v for k, v in _flat_params(model.name, model).items()}})
        say(f"fit {model.name}")
        model.fit(panel, cutoff)
        if hasattr(model, "booster_"):
            score = model.booster_.best_score.get("valid_0", {})
            mlflow.log_metrics({"best_iteration": model.best_iteration_, "train_rows": model.train_rows_,
                                "valid_poisson": float(score.get("poisson", np.nan))})
            mlflow.log_dict(model.feature_importance(), "feature_importance.json")
        info = _register(model, panel, source)
        say("diagnostics" + (" and bias audit" if audit_layer is not None else "") + " on the validation window")
        assess_training(model, panel, cutoff, audit_layer=audit_layer)
    version = info.registered_model_version
    return TrainingRun(run.info.run_id, None if version is None else str(version), model)
