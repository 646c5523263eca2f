"""The tracked runs users start from the CLI: a backtest with its claim test, report, assessments and promotion
gate, and a training run; each is one MLflow run."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.backtest import BacktestResult, default_forecasters, per_category_hit_rates, run_backtest
from forecasting.base import Forecaster
from forecasting.claim import against_every_baseline, claim_test
from forecasting.cluster import address_of
from forecasting.metrics import HEADLINE_COVERAGES, MetricSummary
from forecasting.promotion import GATE_COVERAGES, PromotionDecision, ahead_of, backtest_winner, promotion_decision
from forecasting.references import Headroom, score_references
from forecasting.references import headroom as headroom_shares
from forecasting.reporting.assess import assess, assess_training
from forecasting.reporting.report import write_report
from forecasting.reporting.tracking import apply_promotion, code_version, configure, log_model
from forecasting.saved import protocol_of, save_backtest, write_forecasts
from forecasting.strongest import VALIDATION_DAYS, StrongestChoice

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
    strongest: StrongestChoice | None = None
    candidate: str | None = None
    references: dict[str, MetricSummary] = field(default_factory=dict)  # clairvoyant maps: never forecasters
    headroom: list[Headroom] = field(default_factory=list)
    assessed: tuple[str, str | None] | None = None  # (model, baseline) the diagnostics compared
    leads: dict[str, dict[float, float]] = field(default_factory=dict)  # the gate's paired lower bounds


def _flat_params(name: str, model: Forecaster) -> dict[str, object]:
    """Every parameter, nested ones (the feature configuration) included, as MLflow params."""
    return {f"{name}.{key}": (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in model.get_params(deep=True).items()
            if key != "category" and not hasattr(value, "__dataclass_fields__")}


def _register(model: Forecaster, panel: CountPanel, source: str):
    """Log a fitted forecaster as the registered pyfunc model of the city, with its input rows as signature."""
    sample = model.model_inputs(panel, panel.end_shift - 1).head(200)
    return log_model(model, sample, source)


def _log_strongest(choice: StrongestChoice, out_dir: Path) -> None:
    mlflow.set_tags({"strongest_baseline": choice.name, "claim.baseline": choice.name})
    mlflow.log_params({"strongest.window_start": choice.window_start, "strongest.window_end": choice.window_end})
    mlflow.log_metrics({f"validation.{name}.hit_rate.{float(cov) * 100:g}pct": rate
                        for name, rates in choice.hit_rates.items() for cov, rate in rates.items()})
    (out_dir / "strongest.json").write_text(json.dumps(choice.as_dict(), indent=2))


def _log_summaries(summaries: dict[str, MetricSummary], result: BacktestResult) -> None:
    metrics: dict[str, float] = {}  # one batch: one registry write (one commit or request) per backtest
    for name, summary in summaries.items():
        for j, cov in enumerate(summary.coverages):
            tag = f"{cov * 100:g}pct"
            for metric in ("hit_rate", "pai", "pei"):
                metrics[f"{name}.{metric}.{tag}"] = float(summary.point[metric][j])
            metrics[f"{name}.hit_rate_low.{tag}"] = float(summary.low["hit_rate"][j])
            metrics[f"{name}.hit_rate_high.{tag}"] = float(summary.high["hit_rate"][j])
            if summary.pessimistic:
                metrics[f"{name}.hit_rate_pessimistic.{tag}"] = float(summary.pessimistic["hit_rate"][j])
        metrics[f"{name}.poisson_deviance"] = summary.deviance
        metrics[f"{name}.fit_seconds"] = result.fit_seconds[name]
    mlflow.log_metrics(metrics)


def _log_references(references: dict[str, MetricSummary], shares: list[Headroom]) -> None:
    """Under ``reference.<name>.`` and ``headroom.<forecaster>.``: never under a forecaster's own prefix, so
    nothing that reads forecaster metrics (model card, gate) can take a reference for a forecaster."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for name, summary in references.items():
        for j, cov in enumerate(summary.coverages):
            if cov not in HEADLINE_COVERAGES:
                continue
            tag = f"{cov * 100:g}pct"
            for metric in ("hit_rate", "pai"):
                metrics[f"reference.{name}.{metric}.{tag}"] = float(summary.point[metric][j])
            if summary.pessimistic:
                metrics[f"reference.{name}.hit_rate_pessimistic.{tag}"] = float(summary.pessimistic["hit_rate"][j])
    for share in shares:
        key = f"headroom.{share.forecaster}.{share.coverage * 100:g}pct" + ("" if share.ties == "random" else ".pessimistic")
        if share.share is None:
            tags[key] = share.text()
        else:
            metrics[key] = share.share
    mlflow.log_metrics(metrics)
    mlflow.set_tags(tags)


def _save(result: BacktestResult, panel: CountPanel, out_dir: Path, protocol: dict[str, Any]) -> None:
    """The backtest's files an outside scorer and the later commands read: results.parquet, forecasts.parquet,
    predictions.npz and backtest.json."""
    result.tidy().write_parquet(out_dir / "results.parquet")
    write_forecasts(out_dir, panel, result.origins, result.observed, result.predictions)
    save_backtest(out_dir, result.origins, result.observed, result.areas, result.predictions, protocol)


def assessed_pair(winner: str | None, candidate: str | None, strongest: str | None) -> tuple[str, str | None] | None:
    """(model, baseline) the diagnostics and the bias audit compare: the winner against the strongest baseline;
    when the strongest baseline itself wins, the learned candidate against it; alone when there is nothing to
    compare with."""
    model = winner if winner is not None and winner != strongest else candidate or winner
    if model is None:
        return None
    return model, (strongest if strongest is not None and strongest != model else None)


def gate_leads(result: BacktestResult, summaries: dict[str, MetricSummary], strongest: str,
               n_boot: int, known: list | None = None) -> dict[str, dict[float, float]]:
    """The lower end of the paired day-block bootstrap interval of each challenger's lead over the strongest
    baseline at the gate coverages, for the challengers ahead of it on points (the others lose anyway).
    ``known``: claim results already computed against the strongest baseline, reused where they cover the gate."""
    leads = {}
    for name in ahead_of(summaries, strongest, GATE_COVERAGES):
        done = {c.coverage: c.difference_low for c in known or [] if c.candidate == name and c.baseline == strongest}
        if all(c in done for c in GATE_COVERAGES):
            leads[name] = {c: done[c] for c in GATE_COVERAGES}
            continue
        found = claim_test(result.predictions[name], result.predictions[strongest], result.observed, result.areas,
                           result.origins, result.per_day, coverages=GATE_COVERAGES, claimed_ratio=1.0,
                           n_boot=max(n_boot, 2000), names=(name, strongest))
        leads[name] = {c.coverage: c.difference_low for c in found}
    return leads


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
    strongest_days: int = VALIDATION_DAYS,
    cluster: Any = None,
) -> TrackedBacktest:
    """The whole researcher's run, tracked in MLflow: choose the strongest traditional baseline on the validation
    window before the test period, backtest every forecaster, claim test against that baseline (and every
    other), report, then fit the backtest's winner on all data, register it and make it the champion: a
    challenger wins only by beating the strongest baseline at every gate coverage, else that baseline wins.
    The feedback-loop diagnostics (and, given ``audit_layer``, the bias audit) are logged into the same run.
    ``final_model`` replaces the candidate's factory for the final fit when the candidate wins. ``cluster`` (a
    Dask scheduler address or Client) runs the refits as tasks there; this run still logs once, after gathering."""
    forecasters = forecasters or default_forecasters()
    learned = {name for name, make in forecasters.items() if make().learned}
    baselines = {name: make for name, make in forecasters.items() if name not in learned}
    candidate = next((name for name in forecasters if name in learned), None)
    resolution = panel.study_area.resolution
    out_dir = Path(out_dir or DataPaths(settings).backtest(source, test_start, test_end, resolution))
    out_dir.mkdir(parents=True, exist_ok=True)
    configure(settings)
    say = progress or (lambda message: None)
    # side tasks on the other core, beside the parent's scoring and report: saving the forecasts and the
    # winner's final fit (both release the GIL in their compression, file writes and numerical work; MLflow
    # logging stays in this thread)
    with mlflow.start_run(run_name=f"backtest-{source}-{test_start:%Y%m%d}-{test_end:%Y%m%d}") as run, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="backtest-side") as side:
        mlflow.set_tags({"kind": "backtest", "city": source})
        if baselines:
            say(f"backtest, and choose the strongest baseline on the {strongest_days} days before the test period")
        if cluster is not None:
            mlflow.set_tag("dask_scheduler", address_of(cluster))
        result = run_backtest(panel, test_start, test_end, forecasters, progress=say, cluster=cluster,
                              strongest_from=baselines, strongest_days=strongest_days)
        strongest = result.strongest
        if strongest is not None:
            say(strongest.sentence())
        meta = protocol_of(panel, source, test_start=str(test_start), test_end=str(test_end), refit="monthly",
                           code_version=code_version(),
                           strongest_baseline=strongest.name if strongest else None)
        params: dict[str, object] = {**meta, "claimed_ratio": claimed_ratio, "n_boot": n_boot,
                                     "strongest_validation_days": strongest_days}
        for name, make in forecasters.items():
            params.update(_flat_params(name, make()))
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        if strongest is not None:
            _log_strongest(strongest, out_dir)
        say("metrics and intervals")
        summaries = result.summaries(n_boot=n_boot)
        claims, others = [], []
        if candidate is not None and strongest is not None:
            claim_of = lambda baseline: claim_test(  # noqa: E731
                result.predictions[candidate], result.predictions[baseline], result.observed, result.areas,
                result.origins, result.per_day, coverages=claim_coverages, claimed_ratio=claimed_ratio,
                n_boot=max(n_boot, 2000), names=(candidate, baseline))
            claims = claim_of(strongest.name)
            others = [c for name in baselines if name != strongest.name for c in claim_of(name)]
        _log_summaries(summaries, result)
        references = score_references(result.observed, result.areas, result.origins, result.per_day, n_boot=n_boot)
        shares = headroom_shares(summaries, references, strongest.name) if strongest is not None else []
        _log_references(references, shares)
        leads = gate_leads(result, summaries, strongest.name, n_boot, claims) if strongest is not None else {}
        winner = backtest_winner(summaries, strongest.name, GATE_COVERAGES, leads)[0] if strongest is not None else candidate
        pair = assessed_pair(winner, candidate, strongest.name if strongest else None)
        decision, fitting = None, None
        if register and strongest is not None:
            decision = promotion_decision(summaries, strongest.name, GATE_COVERAGES, leads=leads)
            if decision.winner is None:  # promotion_decision always names one (None only in older records)
                raise RuntimeError("the promotion decision names no winner")
            say(f"fit the winner, {decision.winner}, on all data (a side task)")
            make = final_model if (final_model is not None and decision.winner == candidate) else forecasters[decision.winner]
            fitting = side.submit(lambda: make().fit(panel, panel.end_shift))
        mlflow.log_metrics({**{f"claim.ratio.{c.coverage * 100:g}pct": c.ratio for c in claims},
                            **{f"claim.{c.baseline}.ratio.{c.coverage * 100:g}pct": c.ratio for c in others}})
        mlflow.set_tags({**{f"claim.verdict.{c.coverage * 100:g}pct": c.verdict for c in claims},
                         **{f"claim.{c.baseline}.verdict.{c.coverage * 100:g}pct": c.verdict for c in others}})
        pairwise = []
        if candidate is not None:
            pairwise = against_every_baseline(result.predictions, result.observed, result.areas, result.origins,
                                              result.per_day, candidate=candidate, coverages=claim_coverages,
                                              n_boot=max(n_boot, 2000))
            mlflow.log_metrics({f"{candidate}_minus_{p.baseline}.hit_rate_low.{p.coverage * 100:g}pct": p.difference_low
                                for p in pairwise})
            (out_dir / "pairwise.json").write_text(json.dumps([p.as_dict() for p in pairwise], indent=2))
        importance = result.last_models[candidate].feature_importance() if candidate is not None else None
        say("save the forecasts (per-cell Parquet, predictions.npz) as a side task")
        # the saving thread writes other files than the report, and everything is written before it is logged
        protocol = {**meta, "winner": winner, "candidate": candidate,
                    "importance_of": candidate if importance is not None else None}
        saving = side.submit(_save, result, panel, out_dir, protocol)
        say("report")
        write_report(result, panel, out_dir, title=f"Backtest: {source}, {test_start} to {test_end}",
                     summaries=summaries, claims=claims + others + pairwise,
                     per_category=per_category_hit_rates(result, panel), meta=meta,
                     map_forecaster=pair[0] if pair else None, strongest=strongest, references=references,
                     headroom=shares)
        saving.result()
        if importance is not None:
            (out_dir / "feature_importance.json").write_text(json.dumps(importance, indent=2))
        (out_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "city": source}, indent=2))
        mlflow.log_artifacts(str(out_dir), artifact_path="backtest")
        if pair is not None:
            say(f"feedback-loop diagnostics of {pair[0]}" + (f" against {pair[1]}" if pair[1] else "")
                + (" and bias audit" if audit_layer is not None else ""))
            assess(result, panel, out_dir, model=pair[0], baseline=pair[1], audit_layer=audit_layer, n_boot=n_boot)

        version = None
        if decision is not None and fitting is not None:
            winner = decision.winner
            say(f"register the winner, {winner}")
            info = _register(fitting.result(), panel, source)
            version = str(info.registered_model_version)
            apply_promotion(source, version, decision, run.info.run_id)
            mlflow.log_dict(decision.as_dict(), "promotion.json")
            mlflow.set_tags({"promotion": "promoted" if decision.promote else "rejected", "model_version": version,
                             "champion_forecaster": winner})
            (out_dir / "promotion.json").write_text(json.dumps({**decision.as_dict(), "version": version}, indent=2))
    return TrackedBacktest(result, summaries, claims, decision, version, run.info.run_id, out_dir, strongest, candidate,
                           references, shares, pair, leads)


@dataclass
class TrainingRun:
    run_id: str
    version: str | None
    model: Forecaster


def run_training(panel: CountPanel, source: str, settings: Settings, model: Forecaster, cutoff: int, *,
                 baseline: str, audit_layer=None, progress: Progress | None = None) -> TrainingRun:
    """Fit one forecaster on the shifts before ``cutoff`` and register it (never promoted: only a backtest that
    passes the gate moves the champion). The run also logs the diagnostics of its validation window against
    ``baseline`` (a registry name)."""
    say = progress or (lambda message: None)
    configure(settings)
    with mlflow.start_run(run_name=f"train-{source}") as run:
        mlflow.set_tags({"kind": "train", "city": source, "forecaster": model.name})
        mlflow.log_params({**protocol_of(panel, source, cutoff_shift=cutoff, code_version=code_version()),
                           "category": model.category or "all",
                           **_flat_params(model.name, model)})
        say(f"fit {model.name}")
        model.fit(panel, cutoff)
        mlflow.log_metrics({k: v for k, v in model.fit_summary().items() if np.isfinite(v)})
        importance = model.feature_importance()
        if importance is not None:
            mlflow.log_dict(importance, "feature_importance.json")
        info = _register(model, panel, source)
        say("diagnostics" + (" and bias audit" if audit_layer is not None else "") + " on the validation window")
        assess_training(model, panel, cutoff, baseline=baseline, audit_layer=audit_layer)
    version = info.registered_model_version
    return TrainingRun(run.info.run_id, None if version is None else str(version), model)
