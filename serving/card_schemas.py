"""Response models of the model card, the models overview and the diagnostics endpoint: the public accuracy
and fairness record of the models the service runs on."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ForecasterScore(BaseModel):
    forecaster: str
    coverage: float = Field(..., description="Share of the study area flagged (0.01 = 1%).")
    hit_rate: float | None = Field(None, description="Share of the test period's crimes inside the flagged cells.")
    hit_rate_low: float | None = Field(None, description="95% day-block bootstrap interval, lower end.")
    hit_rate_high: float | None = None
    pai: float | None = Field(None, description="Predictive accuracy index: hit rate over area share.")
    pei: float | None = Field(None, description="Hits over the best possible hits with the same area (PEI*).")


class ClaimVerdict(BaseModel):
    coverage: float
    ratio: float | None = Field(None, description="Model hit rate over the strongest baseline's.")
    verdict: str | None = Field(None, description="supported, refuted or undetermined, for the claimed ratio.")


class BacktestRecord(BaseModel):
    run_id: str
    test_start: str | None = None
    test_end: str | None = None
    n_cells: int | None = None
    scores: list[ForecasterScore]
    claims: list[ClaimVerdict]
    best_by_coverage: dict[str, str] = Field(
        default_factory=dict,
        description="Coverage -> the forecaster with the highest backtest hit rate, baselines included.")
    champion_forecaster: str | None = Field(None, description="The forecaster the backtest promoted (its winner).")
    strongest_baseline: str | None = Field(
        None, description="The strongest traditional baseline, chosen on the validation window before the test period.")


class Assessment(BaseModel):
    name: str = Field(..., description="diagnostics, bias_audit, patrol_diagnostics or patrol_overrides.")
    updated_at: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Flat headline figures.")
    detail: dict[str, Any] = Field(default_factory=dict, description="Tables with intervals, as logged.")


class ModelCard(BaseModel):
    city: str
    version: str
    run_id: str | None
    backtest: BacktestRecord | None
    assessments: list[Assessment]
    hint: str | None = None


class DiagnosticsResponse(BaseModel):
    city: str
    model_version: str
    run_id: str | None
    diagnostics: Assessment | None = Field(None, description="Concentration, churn and persistence of the flags.")
    bias_audit: Assessment | None = Field(None, description="Exposure, hit rate and calibration by population group.")
    patrol_diagnostics: Assessment | None = Field(None, description="Recorded crime by patrol dose (patrol log).")
    patrol_overrides: Assessment | None = Field(None, description="Human oversight: the share of flags planners "
                                                                  "recorded as not patrolled, by reason.")
    hint: str | None = None


class CityModelSummary(BaseModel):
    city: str
    registered_name: str
    champion_version: str | None
    loaded_version: str | None
    headline: list[ForecasterScore] = Field(default_factory=list,
                                            description="The champion's backtest scores beside the strongest "
                                                        "baseline's (the backtest's own choice).")


class ModelsOverview(BaseModel):
    cities: list[CityModelSummary]
    generated_at: datetime
