"""The monthly retrain: backtest the latest months with every forecaster, apply the promotion gate, and move the
champion only when the gate passes.

The gate is the project's one gate (:func:`forecasting.promotion.promotion_decision`) with the learned forecaster
as the candidate: it is refitted on all data, registered and made champion only when it beats the strongest
traditional baseline (chosen on the weeks before the test period) at every gate coverage. When it does not, nothing
is registered and the champion stays. A retrain of baselines only has no learned candidate: the backtest's winner
(the strongest baseline) is the candidate, as in ``hotspots backtest``. Everything is one MLflow run (the backtest's),
tagged ``kind=retrain``; a dry run logs the same run (tag ``retrain=dry-run``), keeps its backtest files out of the
data folder and changes no model version or alias.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import mlflow

from features.panel import CountPanel
from features.settings import Settings
from forecasting.base import Forecaster
from forecasting.promotion import GATE_COVERAGES, PromotionDecision, promotion_decision
from forecasting.reporting.runs import TrackedBacktest, run_tracked_backtest
from forecasting.reporting.tracking import apply_promotion, champion_version, configure, log_model
from forecasting.strongest import VALIDATION_DAYS

DEFAULT_MONTHS = 3


@dataclass
class Retrain:
    test_start: date
    test_end: date
    dry_run: bool
    decision: PromotionDecision
    tracked: TrackedBacktest
    champion_before: str | None
    champion_after: str | None
    version: str | None  # the version registered by this retrain (None: nothing registered)

    @property
    def moved(self) -> bool:
        return self.champion_after != self.champion_before

    def sentence(self) -> str:
        d = self.decision
        period = f"{self.test_start} to {self.test_end}"
        if self.dry_run:
            verb = "would promote" if d.promote else "would not promote"
            return f"dry run, {period}: {verb} {d.candidate} ({d.reason}); nothing registered, the champion is unchanged"
        if d.promote:
            return (f"{period}: promoted {d.candidate} as version {self.version} (champion was "
                    f"{self.champion_before or 'none'}): {d.reason}")
        return f"{period}: not promoted, the champion stays {self.champion_before or 'none'}: {d.reason}"


def latest_months(panel: CountPanel, months: int) -> tuple[date, date]:
    """[first day, end) of the panel's last ``months`` complete local months."""
    if months < 1:
        raise ValueError(f"--months must be at least 1, got {months}")
    last_day = panel.calendar.local_date(panel.end_shift - 1)
    after = date(last_day.year + (last_day.month == 12), last_day.month % 12 + 1, 1)
    complete = panel.calendar.local_date(panel.end_shift) >= after  # the panel reaches into the next month's first day
    end = after if complete else date(last_day.year, last_day.month, 1)
    index = end.year * 12 + end.month - 1 - months
    return date(index // 12, index % 12 + 1, 1), end


def retrain(
    panel: CountPanel,
    source: str,
    settings: Settings,
    forecasters: dict[str, Callable[[], Forecaster]],
    *,
    months: int = DEFAULT_MONTHS,
    dry_run: bool = False,
    n_boot: int = 1000,
    strongest_days: int = VALIDATION_DAYS,
    progress: Callable[[str], None] | None = None,
) -> Retrain:
    """Backtest the latest ``months`` (tracked), then the gate; a passing candidate is refitted on all data,
    registered and promoted unless ``dry_run``."""
    start, end = latest_months(panel, months)
    say = progress or (lambda message: None)
    configure(settings)
    before = champion_version(source)
    scratch = Path(tempfile.mkdtemp(prefix="hotspots-retrain-dry-")) if dry_run else None
    try:
        tracked = run_tracked_backtest(panel, source, settings, start, end, forecasters=forecasters, register=False,
                                       n_boot=n_boot, strongest_days=strongest_days, progress=say, out_dir=scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if tracked.strongest is None:
        raise ValueError("retrain needs at least one traditional baseline to gate against (e.g. --forecaster naive)")
    decision = promotion_decision(tracked.summaries, tracked.strongest.name, GATE_COVERAGES, candidate=tracked.candidate,
                                  leads=tracked.leads)
    version = None
    with mlflow.start_run(run_id=tracked.run_id):
        mlflow.set_tags({"kind": "retrain", "retrain": "dry-run" if dry_run else "run",
                         "promotion": "promoted" if decision.promote else "rejected",
                         "retrain.candidate": str(decision.candidate)})
        mlflow.log_dict(decision.as_dict(), "promotion.json")
        if decision.promote and not dry_run:
            winner = str(decision.candidate)
            say(f"the gate passes: fit {winner} on all data and register it")
            model = forecasters[winner]().fit(panel, panel.end_shift)
            info = log_model(model, model.model_inputs(panel, panel.end_shift - 1).head(200), source)
            version = str(info.registered_model_version)
            apply_promotion(source, version, decision, tracked.run_id)
            mlflow.set_tags({"model_version": version, "champion_forecaster": winner})
    return Retrain(start, end, dry_run, decision, tracked, before, champion_version(source), version)
