"""Assessments of a backtested model, logged into its MLflow run: the feedback-loop diagnostics of its flags,
the patrol-dose analysis when a patrol log exists, and the bias audit on a population layer.

The backtest calls :func:`assess` on its in-memory result; ``hotspots diagnose`` / ``hotspots audit`` call it
later on a saved backtest folder (``predictions.npz`` + ``feature_importance.json``), logging into the same run
so the model card and ``/v1/diagnostics`` always show the latest figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from features.panel import CountPanel
from forecasting.area_presets import AreaLayerSpec
from forecasting.assessment import run_audit, run_diagnostics
from forecasting.bias_audit import BiasAudit
from forecasting.diagnostics import Diagnostics
from forecasting.jsonable import jsonable
from forecasting.reporting.bias_audit_view import bias_audit_page, bias_audit_png, bias_audit_section
from forecasting.reporting.diagnostics_view import diagnostics_page, diagnostics_png, diagnostics_section
from forecasting.reporting.tracking import log_assessment


def log_diagnostics(diag: Diagnostics, out_dir: Path | None = None) -> None:
    """Into the active run as the ``diagnostics`` assessment (and ``patrol_diagnostics`` when a patrol log was
    analysed), where the model card and /v1/diagnostics read them; beside the backtest's report when
    ``out_dir`` is given."""
    png = diagnostics_png(diag)  # one rendering for the run's section, its PNG and the page
    log_assessment("diagnostics", diag.payload(), diag.to_dict(prefix=""), html=diagnostics_section(diag, png=png),
                   png=png)
    if diag.patrol is not None:
        log_assessment("patrol_diagnostics", jsonable(diag.patrol.payload()), diag.patrol.metrics())
    if out_dir is not None:
        (out_dir / "diagnostics.json").write_text(json.dumps(diag.payload(), indent=1))
        (out_dir / "diagnostics.html").write_text(diagnostics_page(diag, png=png))


def log_audit(result: BiasAudit, out_dir: Path | None = None) -> None:
    """Into the active run as the ``bias_audit`` assessment; beside the backtest's report when ``out_dir`` is given."""
    png = bias_audit_png(result)  # one rendering for the run's section, its PNG and the page
    metrics = {k.removeprefix("bias."): v for k, v in result.mlflow_metrics().items()}
    log_assessment("bias_audit", result.to_dict(), metrics, html=bias_audit_section(result, png), png=png)
    if out_dir is not None:
        (out_dir / "bias_audit.json").write_text(result.to_json())
        (out_dir / "bias_audit.html").write_text(bias_audit_page(result, png))


def assess(result, panel: CountPanel, out_dir: Path, *, model: str, baseline: str | None,
           audit_layer: AreaLayerSpec | None = None, shared_dir: Path | None = None,
           n_boot: int = 1000) -> tuple[Diagnostics, BiasAudit | None]:
    """Diagnostics (and the audit) of ``model`` against ``baseline`` (None: alone) in a fresh
    ``BacktestResult``, inside the backtest's active run. Importance only when the model's contract gives it."""
    fitted = result.last_models.get(model)
    importance = fitted.feature_importance() if fitted is not None else None
    diag = run_diagnostics(result.predictions, result.observed, result.areas, result.origins, panel, importance,
                           model=model, baseline=baseline)
    log_diagnostics(diag, out_dir)
    bias = None
    if audit_layer is not None:
        bias = run_audit(result.predictions, result.observed, result.areas, result.origins, panel, audit_layer,
                         shared_dir, n_boot=n_boot, model=model, baseline=baseline)
        log_audit(bias, out_dir)
    return diag, bias


def assess_training(model, panel: CountPanel, cutoff: int, *, baseline: str,
                    audit_layer: AreaLayerSpec | None = None, shared_dir: Path | None = None,
                    n_boot: int = 1000) -> tuple[Diagnostics, BiasAudit | None]:
    """Diagnostics (and the audit) of a freshly trained forecaster, inside its training run.

    A training run has no test period, so the figures describe the model's flags over its validation window
    (the forecaster's ``valid_days`` parameter when it has one, else the strongest-baseline window, before the
    cutoff) against the ``baseline`` registry forecaster (the city's strongest baseline when a backtest named
    one) on the same shifts. They show how the map behaves; accuracy claims come from backtests."""
    import mlflow

    from forecasting import registry
    from forecasting.strongest import VALIDATION_DAYS

    per_day = panel.calendar.per_day
    days = int(model.get_params(deep=False).get("valid_days") or VALIDATION_DAYS)
    origins = np.arange(max(panel.first_shift + 1, cutoff - days * per_day), cutoff, dtype=np.int64)
    predictions = {model.name: model.predict(panel, origins)}
    compared: str | None = None
    if baseline != model.name:
        compared = baseline
        predictions[baseline] = registry.make(baseline).fit(panel, int(origins[0])).predict(panel, origins)
    observed = panel.dense(int(origins[0]), int(origins[-1]) + 1).astype(np.float64)
    areas = panel.study_area.areas_km2
    diag = run_diagnostics(predictions, observed, areas, origins, panel, model.feature_importance(),
                           model=model.name, baseline=compared)
    log_diagnostics(diag)
    mlflow.set_tag("assessment.window", f"validation window: shifts {origins[0]}..{origins[-1]} "
                                        f"({days} days before the cutoff)")
    bias = None
    if audit_layer is not None:
        bias = run_audit(predictions, observed, areas, origins, panel, audit_layer, shared_dir, n_boot=n_boot,
                         title=f"Bias audit of the training run's validation window: {audit_layer.name}",
                         model=model.name, baseline=compared)
        log_audit(bias)
    return diag, bias
