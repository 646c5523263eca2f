"""The realised-accuracy record of a city's served forecasts, and its drift alarms.

What was handed out is read from the audit log: every hotspots response (JSON, GeoJSON, PNG) records the H3 ids
it flagged and the shift they were for. A shift is scored once it is over and its incidents are in the panel
(shift < the panel's end); an entry counts as a served forecast when it was asked as ``next`` or before the
shift ended (a look-up of a past shift is not a forecast), and when a shift was served several times the latest
entry counts. The scoring is :mod:`forecasting.realised`; the comparison is the latest saved backtest of the city
(its interval at the coverage nearest the flags' area, and its strongest baseline, refitted here through the
registry and flagging as many cells on the same shifts); the alarms are :mod:`forecasting.drift`.

Records are computed on demand (model card, transparency page, metrics, CLI) and cached per panel, champion,
backtest and audit head; ``/readyz`` never computes: it reads the last record and starts a background refresh.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import h3
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting import registry
from forecasting.drift import DriftCheck, hit_rate_check, volume_and_mix
from forecasting.realised import (
    BacktestInterval,
    SavedSummary,
    baseline_flags,
    flag_matrix,
    last_window,
    observed_counts,
    pooled,
    rolling,
    score_flags,
)
from serving.accuracy_schemas import AccuracyRecord, BacktestBand, DriftAlarm, ShiftAccuracy, WindowAccuracy
from serving.db import AuditRow, Database, as_utc
from serving.models_store import CityState, ModelStore
from serving.shifts import shift_start_local, shift_times

log = logging.getLogger("hotspots.serving")
HOTSPOT_ROUTES = frozenset({"hotspots", "hotspots.geojson", "hotspots.png"})
# /readyz and scrapes start a background recheck per city at most every model_refresh_seconds, and at least
# this long apart: a recheck reads the city's flagged audit rows, which must not compete with a busy service
MIN_RECHECK_SECONDS = 5.0


@dataclass(frozen=True)
class Served:
    """One served flag set, from its audit row."""

    audit_id: int
    shift_id: int
    category: str
    model_version: str | None
    cells: list[str]


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def served_flags(db: Database, city: str, panel: CountPanel) -> list[Served]:
    """The flag set served for each (shift, category) of ``city``: the latest hotspots entry asked as 'next' or
    before the shift ended."""
    query = (select(AuditRow.id, AuditRow.at, AuditRow.endpoint, AuditRow.params, AuditRow.model_version,
                    AuditRow.flagged)
             .where(AuditRow.city == city, AuditRow.flagged.is_not(None)).order_by(AuditRow.id))
    latest: dict[tuple[int, str], Served] = {}
    with db.engine.connect() as conn:
        for row in conn.execute(query):
            if row.endpoint.rsplit("/", 1)[-1] not in HOTSPOT_ROUTES:
                continue
            params = json.loads(row.params)
            shift_id = int(params["shift_id"])
            if params.get("shift") != "next" and as_utc(row.at) >= shift_times(panel.calendar, shift_id).end:
                continue
            latest[(shift_id, str(params.get("category")))] = Served(
                row.id, shift_id, str(params.get("category")), row.model_version, json.loads(row.flagged))
    return sorted(latest.values(), key=lambda s: s.shift_id)


def panel_category(target: str) -> str | list[str] | None:
    """The panel categories a model target names ('all', one, or several joined by '+')."""
    return None if target == "all" else (target.split("+") if "+" in target else target)


def cell_indices(panel: CountPanel, cells: list[str]) -> np.ndarray:
    """Study-area rows of H3 ids (cells no longer in the study area are dropped)."""
    idx = panel.study_area.index_of(np.array([h3.str_to_int(c) for c in cells], dtype=np.uint64))
    return idx[idx >= 0]


def latest_summary(settings: Settings, city: str, resolution: int) -> SavedSummary | None:
    try:
        return SavedSummary.load(DataPaths(settings).latest_backtest(city, resolution))
    except FileNotFoundError:
        return None


def _band(summary: SavedSummary, model: BacktestInterval | None, baseline: BacktestInterval | None) -> BacktestBand | None:
    if model is None:
        return None
    return BacktestBand(backtest=summary.folder, test_start=summary.test_start, test_end=summary.test_end,
                        coverage=model.coverage, forecaster=model.forecaster, hit_rate=model.hit_rate,
                        hit_rate_low=model.low, hit_rate_high=model.high, baseline=summary.strongest,
                        baseline_hit_rate=baseline.hit_rate if baseline else None,
                        baseline_hit_rate_low=baseline.low if baseline else None,
                        baseline_hit_rate_high=baseline.high if baseline else None)


def compute_record(city: str, panel: CountPanel, model_version: str | None, target: str, forecaster_name: str | None,
                   served: list[Served], summary: SavedSummary | None, settings: Settings) -> AccuracyRecord:
    """Score ``served`` (the model target's flags only) against ``panel``, beside ``summary``'s backtest and its
    strongest baseline; run the drift checks."""
    per_day = panel.calendar.per_day
    category = panel_category(target)
    done = [s for s in served if s.category == target and panel.first_shift < s.shift_id < panel.end_shift]
    cells = [cell_indices(panel, s.cells) for s in done]
    keep = [i for i, c in enumerate(cells) if c.size]
    done, cells = [done[i] for i in keep], [cells[i] for i in keep]
    shift_ids = np.array([s.shift_id for s in done], dtype=np.int64)
    observed = observed_counts(panel, shift_ids, category)
    areas = panel.study_area.areas_km2
    scores = score_flags(shift_ids, flag_matrix(cells, panel.n_cells), observed, areas)
    window = last_window(scores, per_day, settings.accuracy_window_days)
    roll_rate, roll_pai = rolling(scores, per_day, settings.accuracy_window_days)
    hints: list[str] = []

    baseline_name = summary.strongest if summary is not None else None
    base_scores = None
    if baseline_name is not None and shift_ids.size:
        try:
            make = registry.factories([baseline_name], params={baseline_name: {"category": category}})[baseline_name]
            flags = baseline_flags(make, panel, scores.shift_ids, scores.n_flagged)
            base_scores = score_flags(scores.shift_ids, flags, observed_counts(panel, scores.shift_ids, category), areas)
        except KeyError as exc:
            hints.append(f"the saved backtest's strongest baseline cannot be refitted here ({exc})")

    def window_accuracy(mask: np.ndarray, days: int | None) -> WindowAccuracy:
        mine = pooled(scores, mask)
        theirs = pooled(base_scores, mask) if base_scores is not None else None
        return WindowAccuracy(days=days, n_shifts=mine.n_shifts, crimes=mine.crimes, hit_rate=mine.hit_rate,
                              pai=mine.pai, baseline_hit_rate=theirs.hit_rate if theirs else None,
                              baseline_pai=theirs.pai if theirs else None)

    rolling_window = window_accuracy(window, settings.accuracy_window_days)
    mean_area = float(scores.area_share[window].mean()) if window.any() else None
    band = None
    if summary is None:
        hints.append(f"no saved backtest of {city} to compare with: run `hotspots backtest {city}`")
    else:
        name = forecaster_name if forecaster_name in summary.forecasters else _promoted(summary, settings, city)
        band = _band(summary, summary.interval(name, mean_area), summary.interval(baseline_name, mean_area))
        if band is None and mean_area is not None:
            hints.append(f"the backtest {summary.folder} has no figures for the served forecaster")
    if not done:
        hints.append("no served shift is over with its incidents in the panel yet: flags are scored once the panel "
                     "holds their shift (`hotspots update`)")

    checks: list[DriftCheck] = [hit_rate_check(rolling_window.hit_rate, rolling_window.n_shifts,
                                               band.hit_rate_low if band else None, band.coverage if band else None,
                                               settings.drift_min_shifts)]
    checks += volume_and_mix(panel, settings.drift_recent_days, settings.drift_reference_days,
                             settings.drift_volume_change, settings.drift_mix_distance)
    alarms = [DriftAlarm(kind=c.kind, fired=c.fired, value=_number(c.value) if c.value is not None else None,
                         threshold=c.threshold, reason=c.reason) for c in checks]
    base_rate = base_scores.hit_rate if base_scores is not None else None
    by_id = {s.shift_id: s for s in done}
    shifts = [
        ShiftAccuracy(shift_id=int(sid), shift_start=shift_start_local(panel, int(sid)),
                      model_version=by_id[int(sid)].model_version, n_flagged=int(scores.n_flagged[i]),
                      area_share=float(scores.area_share[i]), crimes=float(scores.crimes[i]), hits=float(scores.hits[i]),
                      hit_rate=_number(scores.hit_rate[i]), pai=_number(scores.pai[i]),
                      baseline_hit_rate=_number(base_rate[i]) if base_rate is not None else None,
                      rolling_hit_rate=_number(roll_rate[i]), rolling_pai=_number(roll_pai[i]))
        for i, sid in enumerate(scores.shift_ids) if window[i]
    ]
    return AccuracyRecord(
        city=city, model_version=model_version, category=target, baseline=baseline_name, scored_shifts=len(done),
        rolling=rolling_window, overall=window_accuracy(np.ones(len(done), dtype=bool), None), backtest=band,
        drift=alarms, degraded=any(a.fired for a in alarms), reasons=[a.reason for a in alarms if a.fired],
        shifts=shifts, data_start=shift_start_local(panel, panel.first_shift),
        data_end=shift_start_local(panel, panel.end_shift), computed_at=datetime.now(UTC),
        hint="; ".join(hints) or None)


def _promoted(summary: SavedSummary, settings: Settings, city: str) -> str | None:
    """The winner the backtest promoted (promotion.json), when the served forecaster's own name is not in it."""
    path = DataPaths(settings).backtests_root / summary.folder / "promotion.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("winner")


class AccuracyRecords:
    """Each city's record, cached until its panel, champion, backtest or served flags change."""

    def __init__(self, db: Database, models: ModelStore, settings: Settings):
        self.db, self.models, self.settings = db, models, settings
        self._records: dict[str, tuple[tuple, AccuracyRecord]] = {}
        self._lock = threading.Lock()
        self._city_locks: dict[str, threading.Lock] = {}
        self._checked: dict[str, float] = {}
        self.recheck_seconds = max(settings.model_refresh_seconds, MIN_RECHECK_SECONDS)

    def _key(self, state: CityState) -> tuple:
        with self.db.engine.connect() as conn:
            head = conn.execute(select(func.max(AuditRow.id)).where(AuditRow.city == state.city,
                                                                    AuditRow.flagged.is_not(None))).scalar()
        try:
            backtest = DataPaths(self.settings).latest_backtest(state.city, self._resolution(state))
            folder: tuple = (backtest.name, (backtest / "summary.json").stat().st_mtime_ns)
        except (FileNotFoundError, OSError):
            folder = ()
        return (state.panel_token, state.model.version if state.model else None, folder, head)

    @staticmethod
    def _resolution(state: CityState) -> int | None:
        return state.panel.study_area.resolution if state.panel is not None else None

    def cached(self, city: str) -> AccuracyRecord | None:
        found = self._records.get(city)
        return found[1] if found else None

    def record(self, city: str) -> AccuracyRecord | None:
        """The city's record, computed now when anything it depends on changed; None without panel or champion."""
        state = self.models.get(city)
        if state is None or not state.ready or state.panel is None or state.model is None:
            return None
        with self._lock:
            lock = self._city_locks.setdefault(city, threading.Lock())
        with lock:  # one computation per city at a time; the others then find it cached
            key = self._key(state)
            found = self._records.get(city)
            if found is not None and found[0] == key:
                return found[1]
            started = time.perf_counter()
            model = state.model
            summary = latest_summary(self.settings, city, state.panel.study_area.resolution)
            record = compute_record(city, state.panel, model.version, model.target,
                                    getattr(model.forecaster, "name", None),
                                    served_flags(self.db, city, state.panel), summary, self.settings)
            self._records[city] = (key, record)
            log.info("accuracy record of %s: %d scored shifts in %.2f s%s", city, record.scored_shifts,
                     time.perf_counter() - started, f"; degraded: {'; '.join(record.reasons)}" if record.degraded else "")
            return record

    def try_record(self, city: str) -> AccuracyRecord | None:
        """:meth:`record`, or None (logged) when it cannot be computed: a card or page still shows the rest."""
        try:
            return self.record(city)
        except (OSError, ValueError, KeyError, SQLAlchemyError):
            log.exception("computing the accuracy record of %s failed", city)
            return None

    def maybe_refresh(self, city: str) -> None:
        """Recompute the city's record in a background thread (at most every recheck_seconds): for /readyz and
        the metrics, which only ever read the last record."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked.get(city, -np.inf) < self.recheck_seconds:
                return
            self._checked[city] = now
        threading.Thread(target=self._refresh_quietly, args=(city,), name="accuracy-refresh", daemon=True).start()

    def _refresh_quietly(self, city: str) -> None:
        self.try_record(city)  # a failure keeps the last record; the log says why
