"""Drift checks for a served model: the realised hit rate against the backtest's interval, and the incident
volume and category mix of the latest weeks against the months before them. Thresholds are settings
(features.settings: drift_*); each check says what it compared, so an alarm names its reason."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.panel import CountPanel


@dataclass(frozen=True)
class DriftCheck:
    kind: str  # hit_rate | volume | category_mix
    fired: bool
    value: float | None
    threshold: float | None
    reason: str


def hit_rate_check(rolling_hit_rate: float | None, n_shifts: int, backtest_low: float | None, coverage: float | None,
                   min_shifts: int) -> DriftCheck:
    """Fires when the rolling realised hit rate is below the lower end of the backtest's interval."""
    if rolling_hit_rate is None or backtest_low is None:
        missing = "no realised hit rate yet" if rolling_hit_rate is None else "no backtest interval to compare with"
        return DriftCheck("hit_rate", False, rolling_hit_rate, backtest_low, missing)
    if n_shifts < min_shifts:
        return DriftCheck("hit_rate", False, rolling_hit_rate, backtest_low,
                          f"only {n_shifts} scored shifts (the alarm needs {min_shifts})")
    fired = rolling_hit_rate < backtest_low
    where = f" at {coverage:.1%} of the area" if coverage is not None else ""
    verdict = "is below" if fired else "is within or above"
    return DriftCheck("hit_rate", fired, rolling_hit_rate, backtest_low,
                      f"rolling realised hit rate {rolling_hit_rate:.3f} {verdict} the backtest interval's lower end "
                      f"{backtest_low:.3f}{where}")


def _category_totals(panel: CountPanel, start: int, stop: int) -> np.ndarray:
    rows = panel.slice(max(start, panel.first_shift), stop)
    return np.bincount(rows["category"].to_numpy(), weights=rows["count"].to_numpy(),
                       minlength=len(panel.categories)).astype(np.float64)


def volume_and_mix(panel: CountPanel, recent_days: int, reference_days: int, volume_change: float,
                   mix_distance: float) -> list[DriftCheck]:
    """The panel's last ``recent_days`` against the ``reference_days`` before them: the daily incident rate's
    relative change (fires beyond +-``volume_change``) and the category shares' total variation distance (fires
    beyond ``mix_distance``)."""
    per_day = panel.calendar.per_day
    end = panel.end_shift
    recent_start = max(panel.first_shift, end - recent_days * per_day)
    reference_start = max(panel.first_shift, recent_start - reference_days * per_day)
    if recent_start - reference_start < per_day or end - recent_start < per_day:
        note = "the panel is too short for a reference period"
        return [DriftCheck("volume", False, None, volume_change, note),
                DriftCheck("category_mix", False, None, mix_distance, note)]
    recent, reference = _category_totals(panel, recent_start, end), _category_totals(panel, reference_start, recent_start)
    recent_rate = recent.sum() / (end - recent_start) * per_day
    reference_rate = reference.sum() / (recent_start - reference_start) * per_day
    change = recent_rate / reference_rate - 1 if reference_rate > 0 else (0.0 if recent_rate == 0 else np.inf)
    fired = bool(abs(change) > volume_change)
    volume = DriftCheck("volume", fired, float(change), volume_change,
                        f"incidents per day {recent_rate:.1f} in the last {recent_days} days vs {reference_rate:.1f} in "
                        f"the {reference_days} days before: {change:+.0%} ({'beyond' if fired else 'within'} "
                        f"+-{volume_change:.0%})")
    if recent.sum() == 0 or reference.sum() == 0:
        return [volume, DriftCheck("category_mix", False, None, mix_distance, "no incidents to compare")]
    distance = float(0.5 * np.abs(recent / recent.sum() - reference / reference.sum()).sum())
    moved = int(np.argmax(np.abs(recent / recent.sum() - reference / reference.sum())))
    mix_fired = distance > mix_distance
    mix = DriftCheck("category_mix", mix_fired, distance, mix_distance,
                     f"category shares moved by {distance:.3f} (total variation; {'beyond' if mix_fired else 'within'} "
                     f"{mix_distance:g}), most in {panel.categories[moved]}: "
                     f"{reference[moved] / reference.sum():.1%} -> {recent[moved] / recent.sum():.1%}")
    return [volume, mix]
