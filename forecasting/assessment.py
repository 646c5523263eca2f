"""Assessments of a backtested forecaster's flags: the feedback-loop diagnostics and the bias audit, on the
forecasts of a backtest (in memory or saved). Computation only: logging them is the reporting layer's job.

The caller names the forecaster and the one it is compared with (the backtest's winner and strongest baseline:
``SavedBacktest.assessed_pair``); ``baseline`` None assesses the forecaster alone. ``importance`` is the
model's own (``Forecaster.feature_importance``), or None for forecasters without features."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features.panel import CountPanel
from forecasting.area_presets import AreaLayerSpec
from forecasting.bias_audit import BiasAudit, audit, population_split, quantile_split
from forecasting.diagnostics import Diagnostics, diagnose
from forecasting.metrics import HEADLINE_COVERAGES
from forecasting.saved import forecaster_pair


def run_diagnostics(predictions, observed, areas, origins, panel: CountPanel, importance=None,
                    patrols: pl.DataFrame | None = None, coverages=HEADLINE_COVERAGES, *, model: str,
                    baseline: str | None) -> Diagnostics:
    return diagnose(forecaster_pair(predictions, model, baseline), observed, areas, origins, panel.calendar.per_day,
                    model=model, baseline=baseline, coverages=coverages, importance=importance, panel=panel,
                    patrols=patrols)


def run_audit(predictions, observed, areas, origins, panel: CountPanel, layer: AreaLayerSpec,
              shared_dir: Path | None = None, coverages=HEADLINE_COVERAGES, n_boot: int = 1000, title: str = "", *,
              model: str, baseline: str | None) -> BiasAudit:
    join = layer.join(panel.study_area, shared_dir)
    splits = [population_split(join, partition=layer.partition, name="group", label=layer.group_label or "group")]
    if layer.split:
        splits.append(quantile_split(join, layer.split, 5, label=layer.split_label or layer.split))
    return audit(forecaster_pair(predictions, model, baseline), observed, areas, origins, panel.calendar.per_day, splits,
                 coverages=coverages, baseline=baseline, n_boot=n_boot, meta={"title": title or f"Bias audit: {layer.name}",
                                                        "layer": layer.name, "join": join.summary()})
