"""Rolling-origin backtest: every forecaster on identical inputs, a forecast for every shift of the test
period, refitted on a cadence (monthly by default) with only the data before each refit.

Model selection happens inside ``fit`` on the validation period that precedes each cutoff; the test period
is touched once, here, after the forecasters' settings are fixed.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from features.matrix import build_targets
from features.panel import CountPanel
from forecasting import registry
from forecasting.base import Forecaster
from forecasting.cluster import connect, run_groups, worker_threads
from forecasting.metrics import (
    DEFAULT_COVERAGES,
    HEADLINE_COVERAGES,
    MetricSummary,
    ranking,
    shift_hits,
    summarise_all,
)
from forecasting.refits import plan_groups, refit_step, run_in_processes
from forecasting.strongest import (
    VALIDATION_DAYS,
    StrongestChoice,
    choose_strongest,
    score_baseline,
    strongest_of,
    validation_origins,
)


def default_forecasters(seed: int = 0, lightgbm: dict | None = None) -> dict[str, Callable[[], Forecaster]]:
    """Every registered forecaster a backtest compares, as factories (a refit series builds its own instance)."""
    return registry.factories(seed=seed, params={"lightgbm": lightgbm or {}})


def month_starts(start: date, end: date) -> list[date]:
    out, d = [], date(start.year, start.month, 1)
    while d < end:
        out.append(max(d, start))
        d = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    return out


@dataclass
class BacktestResult:
    origins: np.ndarray  # (n_shifts,)
    observed: np.ndarray  # (n_shifts, n_cells)
    predictions: dict[str, np.ndarray]  # name -> (n_shifts, n_cells)
    areas: np.ndarray
    per_day: int
    cutoffs: list[int]
    fit_seconds: dict[str, float]
    predict_seconds: dict[str, float]
    last_models: dict[str, Forecaster] = field(default_factory=dict)
    strongest: StrongestChoice | None = None  # chosen on the validation window when the backtest was asked to

    def __post_init__(self) -> None:
        """Forecasts and counts are final once the backtest has run: frozen, so every score of them (summaries,
        claim tests, report) can reuse one ranking per forecaster (``forecasting.metrics.shift_hits``)."""
        self.observed = _frozen(self.observed)
        self.predictions = {name: _frozen(pred) for name, pred in self.predictions.items()}

    def summaries(self, coverages=DEFAULT_COVERAGES, n_boot: int = 1000, seed: int = 0) -> dict[str, MetricSummary]:
        return summarise_all(self.predictions, self.observed, self.areas, self.origins, self.per_day, coverages,
                             n_boot, seed=seed)

    def tidy(self, coverages=DEFAULT_COVERAGES) -> pl.DataFrame:
        """One row per (forecaster, shift, coverage): the per-shift ingredients every pooled metric uses."""
        frames = []
        for name, pred in self.predictions.items():
            h = shift_hits(pred, self.observed, self.areas, self.origins, coverages)
            n_cov = len(h.coverages)
            frames.append(
                pl.DataFrame(
                    {
                        "forecaster": name,
                        "shift_id": np.repeat(self.origins, n_cov),
                        "coverage": np.tile(h.coverages, self.origins.size),
                        "cells_flagged": h.n_flagged.ravel(),
                        "area_share": h.area_share.ravel(),
                        "hits": h.hits.ravel(),
                        "best_possible_hits": h.best.ravel(),
                        "crimes": np.repeat(h.crimes, n_cov),
                        "predicted_in_flagged": h.predicted_in.ravel(),
                        "predicted_total": np.repeat(h.predicted, n_cov),
                    }
                )
            )
        return pl.concat(frames)


def _frozen(a: np.ndarray) -> np.ndarray:
    out = np.array(a, dtype=np.float64, copy=a.base is not None or a.dtype != np.float64)
    out.setflags(write=False)
    return out


def run_backtest(
    panel: CountPanel,
    test_start: date,
    test_end: date,
    forecasters: dict[str, Callable[[], Forecaster]] | None = None,
    category: str | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    cluster: Any = None,
    pieces: int | None = None,
    retries: int = 3,
    processes: int | None = None,
    strongest_from: dict[str, Callable[[], Forecaster]] | None = None,
    strongest_days: int = VALIDATION_DAYS,
) -> BacktestResult:
    """Forecast every shift starting in [test_start, test_end) (local dates), refitting monthly.

    ``cluster`` (a Dask scheduler address or ``distributed.Client``) runs the refit series as tasks
    (``forecasting.cluster``): warm-started series whole, the others cut into up to ``pieces`` runs (default: the
    cluster's threads); the result is identical to the local run. Without it the refit series run here, in
    ``processes`` local processes (default: both cores of a 2-core machine for a backtest big enough to repay a
    worker's start-up, ``local_processes``), cut the same way and identical to the run in one process.
    ``strongest_from`` (baselines by name) also chooses the strongest baseline on the ``strongest_days`` before
    the test period (``forecasting.strongest``), in the same pool as the refits when there is one, with the
    choice of the sequential ``choose_strongest``: ``BacktestResult.strongest``."""
    forecasters = forecasters or default_forecasters()
    zone = ZoneInfo(panel.calendar.timezone)
    to_dt = lambda d: datetime(d.year, d.month, d.day, tzinfo=zone)  # noqa: E731
    origins = panel.calendar.shift_range(to_dt(test_start), to_dt(test_end))
    if origins.size == 0 or origins[-1] >= panel.end_shift:
        raise ValueError(f"the panel (shifts {panel.first_shift}..{panel.end_shift}) does not cover the test period")
    blocks = [panel.calendar.shift_of(to_dt(d)) for d in month_starts(test_start, test_end)]
    blocks = sorted({max(b, int(origins[0])) for b in blocks}) + [int(origins[-1]) + 1]
    predictions = {name: np.zeros((origins.size, panel.n_cells)) for name in forecasters}
    fit_seconds = {name: 0.0 for name in forecasters}
    predict_seconds = {name: 0.0 for name in forecasters}
    strongest = None
    if strongest_from and (cluster is not None or (processes or local_processes(panel, origins.size)) == 1):
        strongest = choose_strongest(panel, int(origins[0]), strongest_from, strongest_days)
    if cluster is not None:
        models = _run_on_cluster(cluster, panel, origins, blocks, forecasters, category, predictions, fit_seconds,
                                 predict_seconds, pieces, retries, progress)
    elif (processes or local_processes(panel, origins.size)) > 1:
        workers = processes or local_processes(panel, origins.size)
        groups = plan_groups(forecasters, len(blocks) - 1, workers)
        window = validation_origins(panel, int(origins[0]), strongest_days) if strongest_from else origins[:0]
        side = {f"strongest baseline: score {name}": partial(score_baseline, panel, int(origins[0]), window, make)
                for name, make in (strongest_from or {}).items()}
        results, scored = run_in_processes(panel, origins, blocks, groups, forecasters, category, workers, progress,
                                           side)
        if strongest_from:
            strongest = strongest_of(panel, int(origins[0]), window, {name: scored[key] for key, name in
                                                                      zip(side, strongest_from)})
        models = _assemble(groups, results, origins, blocks, predictions, fit_seconds, predict_seconds)
    else:
        models = {name: make() for name, make in forecasters.items()}  # refitted in place: caches and warm starts carry over
        for refit, (cutoff, stop) in enumerate(zip(blocks[:-1], blocks[1:]), start=1):
            block = origins[(origins >= cutoff) & (origins < stop)]
            rows = np.searchsorted(origins, block)
            took = {}
            for name, model in models.items():
                step = refit_step(model, panel, cutoff, block, category)
                predictions[name][rows] = step.predictions
                fit_seconds[name] += step.fit_seconds
                predict_seconds[name] += step.predict_seconds
                took[name] = step.fit_seconds + step.predict_seconds
            if progress:
                times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items())
                progress(f"refit {refit}/{len(blocks) - 1} at {panel.calendar.local_date(cutoff)}: "
                         f"{block.size} shifts forecast ({times})")
    observed = build_targets(panel, origins, category).reshape(origins.size, panel.n_cells).astype(np.float64)
    return BacktestResult(
        origins=origins, observed=observed, predictions=predictions, areas=panel.study_area.areas_km2,
        per_day=panel.calendar.per_day, cutoffs=blocks[:-1], fit_seconds=fit_seconds,
        predict_seconds=predict_seconds, last_models=models, strongest=strongest,
    )


def _run_on_cluster(cluster, panel, origins, blocks, forecasters, category, predictions, fit_seconds,
                    predict_seconds, pieces, retries, progress) -> dict[str, Forecaster]:
    """The refit groups as Dask tasks, written into ``predictions`` in the plan's fixed order; returns the model
    of each forecaster's last group (as the local run's last refit)."""
    with connect(cluster) as client:
        groups = plan_groups(forecasters, len(blocks) - 1, pieces or worker_threads(client))
        results = run_groups(client, panel, origins, blocks, groups, forecasters, category, retries, progress)
    return _assemble(groups, results, origins, blocks, predictions, fit_seconds, predict_seconds)


def _assemble(groups, results, origins, blocks, predictions, fit_seconds, predict_seconds) -> dict[str, Forecaster]:
    """Write each group's forecasts into ``predictions`` in the plan's fixed order; returns the model of each
    forecaster's last group (as the sequential run's last refit)."""
    models: dict[str, Forecaster] = {}
    missing = [g for g in groups if g.key not in results]
    if missing or len(results) != len(groups):
        raise RuntimeError(f"the refits returned {len(results)} results for {len(groups)} tasks (missing {missing})")
    for group in groups:
        result = results[group.key]
        rows = np.flatnonzero((origins >= blocks[group.first]) & (origins < blocks[group.stop]))
        predictions[group.forecaster][rows] = result.predictions
        fit_seconds[group.forecaster] += result.fit_seconds
        predict_seconds[group.forecaster] += result.predict_seconds
        models[group.forecaster] = result.model
    return models


def local_processes(panel: CountPanel, n_shifts: int) -> int:
    """Processes for a local backtest: 2 when the machine has 2 cores and the backtest is big (a city-sized
    panel over months: a worker's start-up is a few seconds), else 1 (tests, small panels, and inside a daemonic
    process such as a Dask worker, which may not start processes of its own)."""
    if multiprocessing.current_process().daemon:
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 and panel.n_cells * n_shifts >= LOCAL_PARALLEL_CELL_SHIFTS else 1


LOCAL_PARALLEL_CELL_SHIFTS = 1_000_000  # Toronto res 9 over a year: 6.8 M


def per_category_hit_rates(result: BacktestResult, panel: CountPanel, coverages=HEADLINE_COVERAGES) -> pl.DataFrame:
    """Hit rate of each forecaster's (all-crime) map against each category's incidents."""
    # frozen, so each category's best-possible cumulative counts are sorted once, not once per forecaster
    observed = {category: _frozen(build_targets(panel, result.origins, category).reshape(result.origins.size,
                                                                                          panel.n_cells))
                for category in panel.categories}
    observed = {category: counts for category, counts in observed.items() if counts.sum() > 0}
    found: dict[tuple[str, str], list[dict]] = {}
    for name, pred in result.predictions.items():
        order = ranking(pred, result.origins)  # the random tie order does not depend on the counts: the summaries' ranking
        for category, counts in observed.items():
            h = shift_hits(pred, counts, result.areas, result.origins, coverages, order=order)
            rates = h.hits.sum(axis=0) / h.crimes.sum()
            found[category, name] = [
                {"category": category, "forecaster": name, "coverage": float(c), "hit_rate": float(r),
                 "crimes": float(h.crimes.sum())}
                for c, r in zip(h.coverages, rates)
            ]
    return pl.DataFrame([row for category in observed for name in result.predictions for row in found[category, name]])
