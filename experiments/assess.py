"""Assessments of a backtested model, logged into its MLflow run: the feedback-loop diagnostics of its flags,
the patrol-dose analysis when a patrol log exists, and the bias audit on a population layer.

The backtest calls :func:`assess` on its in-memory result; ``hotspots diagnose`` / ``hotspots audit`` call it
later on a saved backtest folder (``predictions.npz`` + ``feature_importance.json``), logging into the same run
so the model card and ``/v1/diagnostics`` always show the latest figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.panel import CountPanel
from forecasting.area_presets import AreaLayerSpec
from forecasting.bias_audit import BiasAudit, audit, population_split, quantile_split
from forecasting.diagnostics import Diagnostics, diagnose
from forecasting.tracking import log_assessment

COVERAGES = (0.01, 0.05)


@dataclass
class SavedBacktest:
    """What a backtest folder keeps: every forecaster's forecast for every test shift, and the run it belongs to."""

    out_dir: Path
    origins: np.ndarray
    observed: np.ndarray
    areas: np.ndarray
    predictions: dict[str, np.ndarray]
    importance: dict[str, float] | None
    run_id: str | None

    @classmethod
    def load(cls, out_dir: Path) -> "SavedBacktest":
        out_dir = Path(out_dir)
        path = out_dir / "predictions.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `hotspots backtest` first (it saves every forecast there)")
        with np.load(path) as z:
            predictions = {k.removeprefix("pred_"): z[k] for k in z.files if k.startswith("pred_")}
            origins, observed, areas = z["origins"], z["observed"], z["areas"]
        imp = out_dir / "feature_importance.json"
        run = out_dir / "run.json"
        return cls(out_dir, origins, observed, areas, predictions,
                   json.loads(imp.read_text()) if imp.is_file() else None,
                   json.loads(run.read_text())["run_id"] if run.is_file() else None)

    def check(self, panel: CountPanel) -> None:
        if self.areas.size != panel.n_cells:
            raise ValueError(f"the backtest in {self.out_dir} has {self.areas.size} cells, the panel {panel.n_cells}: "
                             "rebuild one of them so both use the same study area")


def latest_backtest(data_dir: Path, city: str, resolution: int) -> Path:
    found = sorted((Path(data_dir) / "backtests").glob(f"{city}-r{resolution}-*/predictions.npz"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no backtest of {city} at resolution {resolution} under {data_dir}/backtests: "
                                f"run `hotspots backtest {city}` first")
    return found[-1].parent


def _pair(predictions, model: str, baseline: str) -> dict[str, np.ndarray]:
    missing = [name for name in (model, baseline) if name not in predictions]
    if missing:
        raise KeyError(f"the backtest has no forecasts of {missing}; it has {sorted(predictions)}")
    return {model: predictions[model], baseline: predictions[baseline]}


def run_diagnostics(predictions, observed, areas, origins, panel: CountPanel, importance=None,
                    patrols: pl.DataFrame | None = None, coverages=COVERAGES, model: str = "lightgbm",
                    baseline: str = "naive") -> Diagnostics:
    return diagnose(_pair(predictions, model, baseline), observed, areas, origins, panel.calendar.per_day,
                    model=model, baseline=baseline, coverages=coverages,
                    importance=importance if model == "lightgbm" else None, panel=panel, patrols=patrols)


def run_audit(predictions, observed, areas, origins, panel: CountPanel, layer: AreaLayerSpec,
              shared_dir: Path | None = None, coverages=COVERAGES, n_boot: int = 1000, title: str = "",
              model: str = "lightgbm", baseline: str = "naive") -> BiasAudit:
    join = layer.join(panel.study_area, shared_dir)
    splits = [population_split(join, partition=layer.partition, name="group", label=layer.group_label or "group")]
    if layer.split:
        splits.append(quantile_split(join, layer.split, 5, label=layer.split_label or layer.split))
    return audit(_pair(predictions, model, baseline), observed, areas, origins, panel.calendar.per_day, splits,
                 coverages=coverages, baseline=baseline, n_boot=n_boot, meta={"title": title or f"Bias audit: {layer.name}",
                                                        "layer": layer.name, "join": join.summary()})


def log_diagnostics(diag: Diagnostics, out_dir: Path | None = None) -> None:
    """Into the active run (and beside the backtest's report when ``out_dir`` is given)."""
    diag.log_to_mlflow()
    if out_dir is not None:
        (out_dir / "diagnostics.json").write_text(json.dumps(diag.payload(), indent=1))
        (out_dir / "diagnostics.html").write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Diagnostics"
                                                  f"</title></head><body>{diag.html_section()}</body></html>")


def log_audit(result: BiasAudit, out_dir: Path | None = None) -> None:
    figure = result.figure()
    metrics = {k.removeprefix("bias."): v for k, v in result.mlflow_metrics().items()}
    log_assessment("bias_audit", result.to_dict(), metrics, html=result.html_section(), figure=figure)
    if out_dir is not None:
        (out_dir / "bias_audit.json").write_text(result.to_json())
        (out_dir / "bias_audit.html").write_text(result.html_page())


def assess(result, panel: CountPanel, out_dir: Path, *, audit_layer: AreaLayerSpec | None = None,
           shared_dir: Path | None = None, n_boot: int = 1000) -> tuple[Diagnostics, BiasAudit | None]:
    """Diagnostics (and the audit) of a fresh ``BacktestResult``, inside the backtest's active run."""
    lgbm = result.last_models.get("lightgbm")
    importance = lgbm.feature_importance() if lgbm is not None else None
    diag = run_diagnostics(result.predictions, result.observed, result.areas, result.origins, panel, importance)
    log_diagnostics(diag, out_dir)
    bias = None
    if audit_layer is not None:
        bias = run_audit(result.predictions, result.observed, result.areas, result.origins, panel, audit_layer,
                         shared_dir, n_boot=n_boot)
        log_audit(bias, out_dir)
    return diag, bias


def assess_training(model, panel: CountPanel, cutoff: int, *, audit_layer: AreaLayerSpec | None = None,
                    shared_dir: Path | None = None, n_boot: int = 1000) -> tuple[Diagnostics, BiasAudit | None]:
    """Diagnostics (and the audit) of a freshly trained LightGBM model, inside its training run.

    A training run has no test period, so the figures describe the model's flags over its validation window
    (the ``valid_days`` before the cutoff, which early stopping used) against the naive map of the same shifts.
    They show how the map behaves; accuracy claims come from backtests."""
    import mlflow

    from forecasting.baselines import Naive

    per_day = panel.calendar.per_day
    origins = np.arange(max(panel.first_shift + 1, cutoff - model.valid_days * per_day), cutoff, dtype=np.int64)
    naive = Naive().fit(panel, int(origins[0]))
    predictions = {"lightgbm": model.predict(panel, origins), "naive": naive.predict(panel, origins)}
    observed = panel.dense(int(origins[0]), int(origins[-1]) + 1).astype(np.float64)
    areas = panel.study_area.areas_km2
    diag = run_diagnostics(predictions, observed, areas, origins, panel, model.feature_importance())
    log_diagnostics(diag)
    mlflow.set_tag("assessment.window", f"validation window: shifts {origins[0]}..{origins[-1]} "
                                        f"({model.valid_days} days before the cutoff, used for early stopping)")
    bias = None
    if audit_layer is not None:
        bias = run_audit(predictions, observed, areas, origins, panel, audit_layer, shared_dir, n_boot=n_boot,
                         title=f"Bias audit of the training run's validation window: {audit_layer.name}")
        log_audit(bias)
    return diag, bias
