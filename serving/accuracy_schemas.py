"""Response models of the realised-accuracy record and the drift alarms (model card, transparency page, CLI).
Place-based figures only: counts and rates per shift, never a cell list."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class ShiftAccuracy(BaseModel):
    shift_id: int
    shift_start: datetime = Field(..., description="Local start of the served shift.")
    model_version: str | None = Field(None, description="The champion version that served the flags.")
    n_flagged: int = Field(..., description="Cells handed out for the shift (from its audit row).")
    area_share: float = Field(..., description="Their share of the study area.")
    crimes: float = Field(..., description="Incidents of the model's category in the shift (now in the panel).")
    hits: float = Field(..., description="Of those, incidents in the flagged cells.")
    hit_rate: float | None = None
    pai: float | None = None
    baseline_hit_rate: float | None = Field(None, description="The strongest baseline flagging as many cells.")
    rolling_hit_rate: float | None = Field(None, description="Pooled over the window's days ending at this shift.")
    rolling_pai: float | None = None


class WindowAccuracy(BaseModel):
    days: int | None = Field(None, description="Days pooled (None: every scored shift).")
    n_shifts: int
    crimes: float
    hit_rate: float | None = None
    pai: float | None = None
    baseline_hit_rate: float | None = None
    baseline_pai: float | None = None


class BacktestBand(BaseModel):
    """The saved backtest's pooled hit rate and 95% day-block bootstrap interval at the nearest coverage."""

    backtest: str = Field(..., description="The backtest folder compared with.")
    test_start: str | None = None
    test_end: str | None = None
    coverage: float
    forecaster: str
    hit_rate: float
    hit_rate_low: float
    hit_rate_high: float
    baseline: str | None = None
    baseline_hit_rate: float | None = None
    baseline_hit_rate_low: float | None = None
    baseline_hit_rate_high: float | None = None


class DriftAlarm(BaseModel):
    kind: str = Field(..., description="hit_rate, volume or category_mix.")
    fired: bool
    value: float | None = None
    threshold: float | None = None
    reason: str


class AccuracyRecord(BaseModel):
    city: str
    model_version: str | None
    category: str
    baseline: str | None = Field(None, description="The strongest baseline named by the saved backtest.")
    scored_shifts: int = Field(..., description="Served shifts that are over and have their incidents in the panel.")
    rolling: WindowAccuracy = Field(..., description="The last accuracy_window_days of scored shifts.")
    overall: WindowAccuracy = Field(..., description="Every scored shift.")
    backtest: BacktestBand | None = None
    drift: list[DriftAlarm] = Field(default_factory=list)
    degraded: bool = Field(False, description="True when any drift alarm fired (then /readyz says degraded).")
    reasons: list[str] = Field(default_factory=list, description="The fired alarms' reasons.")
    shifts: list[ShiftAccuracy] = Field(default_factory=list, description="The rolling window's shifts, oldest first.")
    data_start: datetime | None = Field(None, description="Local start of the panel's first shift.")
    data_end: datetime | None = Field(None, description="Local start of the first shift without data.")
    computed_at: datetime
    hint: str | None = None
