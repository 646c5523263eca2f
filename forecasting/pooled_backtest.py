"""Does pooling help the smaller cities? A rolling-origin backtest of several cities (saved panels): at every
monthly refit the pooled model is trained once on all cities' history before their cutoffs (``forecasting.pooled``)
and forecasts each city's month, beside each city's own model (the registry's per-city LightGBM, refitted as Dask
tasks by ``run_backtest``). Per city, the paired day-block bootstrap of the claim test (``forecasting.claim``,
claimed ratio 1) gives the difference in hit rate at 1% and 5% of the area with its interval, and a verdict:
"pooling helps" (an interval above zero, none below), "pooling hurts" (the reverse) or "cannot tell".
Smaller cities (fewer incidents before the test period) come first. Nothing here logs to MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from features.panel import CountPanel
from forecasting import registry
from forecasting.backtest import month_starts, run_backtest
from forecasting.claim import ClaimResult, claim_test
from forecasting.metrics import HEADLINE_COVERAGES
from forecasting.pooled import PER_CITY, City, PooledLightGBM, load_panel, train_pooled

HELPS, HURTS, CANNOT_TELL = "pooling helps", "pooling hurts", "cannot tell"


def pooling_verdict(claims: list[ClaimResult]) -> str:
    """From the paired intervals of (pooled - per-city) hit rate at each headline coverage."""
    helps = any(c.difference_low > 0 for c in claims)
    hurts = any(c.difference_high < 0 for c in claims)
    return HELPS if helps and not hurts else HURTS if hurts and not helps else CANNOT_TELL


@dataclass
class CityOutcome:
    city: str
    n_cells: int
    history_incidents: int  # before the test period: the city's size, smaller first
    test_incidents: int
    claims: list[ClaimResult]
    verdict: str
    pooled_predictions: np.ndarray = field(repr=False)
    per_city_predictions: np.ndarray = field(repr=False)
    observed: np.ndarray = field(repr=False)
    origins: np.ndarray = field(repr=False)

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"city": self.city, "cells": self.n_cells, "history_incidents": self.history_incidents,
                               "test_incidents": self.test_incidents}
        for c in self.claims:
            tag = f"{c.coverage * 100:g}pct"
            out |= {f"pooled_hit_rate_{tag}": c.candidate_hit_rate, f"per_city_hit_rate_{tag}": c.baseline_hit_rate,
                    f"difference_{tag}": c.difference, f"difference_low_{tag}": c.difference_low,
                    f"difference_high_{tag}": c.difference_high}
        return out | {"verdict": self.verdict}


@dataclass
class PooledBacktest:
    cities: list[CityOutcome]  # smaller cities first
    test_start: str
    test_end: str
    per_city: str
    params: dict[str, Any]
    n_boot: int
    refits: int
    pooled_seconds: float
    per_city_seconds: float
    fit_summaries: list[dict[str, float]] = field(default_factory=list)  # the pooled model at each refit

    def table(self) -> list[dict[str, Any]]:
        return [c.row() for c in self.cities]

    def markdown(self) -> str:
        lines = [f"Pooled model vs per-city {self.per_city}, {self.test_start} to {self.test_end} ({self.refits} monthly "
                 f"refits), hit rate at 1% and 5% of each city's area; difference = pooled - per-city with its paired "
                 f"95% day-block bootstrap interval ({self.n_boot} replicates). Smaller cities first.", "",
                 "| city | cells | incidents before | test incidents | pooled 1% | per-city 1% | difference 1% | "
                 "pooled 5% | per-city 5% | difference 5% | verdict |",
                 "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
        for c in self.cities:
            cells = []
            for claim in c.claims:
                cells += [f"{claim.candidate_hit_rate:.3f}", f"{claim.baseline_hit_rate:.3f}",
                          f"{claim.difference:+.3f} [{claim.difference_low:+.3f}, {claim.difference_high:+.3f}]"]
            lines.append(f"| {c.city} | {c.n_cells} | {c.history_incidents} | {c.test_incidents} | "
                         + " | ".join(cells) + f" | {c.verdict} |")
        return "\n".join(lines) + "\n"


def _periods(panel: CountPanel, start: date, end: date) -> tuple[np.ndarray, list[int]]:
    """The test origins and monthly cutoffs (then the end shift) in the city's own time zone, as run_backtest."""
    zone = ZoneInfo(panel.calendar.timezone)
    to_dt = lambda d: datetime(d.year, d.month, d.day, tzinfo=zone)  # noqa: E731
    origins = panel.calendar.shift_range(to_dt(start), to_dt(end))
    if origins.size == 0 or origins[-1] >= panel.end_shift:
        raise ValueError(f"the panel (shifts {panel.first_shift}..{panel.end_shift}) does not cover {start} to {end}; "
                         "choose a test period inside every city's panel")
    blocks = sorted({max(panel.calendar.shift_of(to_dt(d)), int(origins[0])) for d in month_starts(start, end)})
    return origins, blocks + [int(origins[-1]) + 1]


def _predict_block(model: PooledLightGBM, folder: str, block: np.ndarray) -> np.ndarray:
    """On the city's worker: the month's forecasts from its own panel (history before each origin only)."""
    return model.predict(load_panel(folder), block)


def run_pooled_backtest(client: Any, cities: list[City], test_start: date, test_end: date, *,
                        params: dict[str, Any] | None = None, n_boot: int = 1000, seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> PooledBacktest:
    """Per-city model vs the pooled one on ``client``'s cluster. ``params`` go to both models where they
    have the parameter (``train_days``, ``valid_days``, ``learning_rate``, ...), the rest to the pooled one."""
    say = progress or (lambda message: None)
    if len(cities) < 2 or len({c.name for c in cities}) != len(cities):
        raise ValueError("a pooled backtest needs at least two cities with distinct names")
    params = dict(params or {})
    pooled = PooledLightGBM(seed=seed)
    pooled.set_params(**params)
    per_city_params = {k: v for k, v in params.items() if k in registry.make(PER_CITY).get_params(deep=False)}
    panels = [load_panel(c.panel) for c in cities]
    periods = [_periods(p, test_start, test_end) for p in panels]
    refits = {len(blocks) - 1 for _, blocks in periods}
    if len(refits) != 1:
        raise ValueError("the cities' test periods cut into different numbers of months; give whole months")
    n_refits = refits.pop()

    started = time.perf_counter()
    own: list[np.ndarray] = []
    observed: list[np.ndarray] = []
    for city, panel in zip(cities, panels):
        say(f"per-city {PER_CITY}: {city.name}")
        result = run_backtest(panel, test_start, test_end, registry.factories([PER_CITY], seed=seed,
                              params={PER_CITY: per_city_params}), cluster=client)
        own.append(result.predictions[PER_CITY])
        observed.append(result.observed)
    per_city_seconds = time.perf_counter() - started

    started = time.perf_counter()
    workers = sorted(client.scheduler_info()["workers"])
    pooled_predictions = [np.zeros_like(o) for o in observed]
    summaries = []
    for k in range(n_refits):
        cutoffs = [blocks[k] for _, blocks in periods]
        fitted = train_pooled(client, [c.panel for c in cities], cutoffs, pooled)
        summaries.append(fitted[0].fit_summary())
        futures = []
        for i, (city, model, (origins, blocks)) in enumerate(zip(cities, fitted, periods)):
            block = origins[(origins >= blocks[k]) & (origins < blocks[k + 1])]
            futures.append(client.submit(_predict_block, model, city.panel, block, pure=False,
                                         workers=[workers[i % len(workers)]]))
        for i, (future, (origins, blocks)) in enumerate(zip(futures, periods)):
            rows = np.flatnonzero((origins >= blocks[k]) & (origins < blocks[k + 1]))
            pooled_predictions[i][rows] = future.result()
        say(f"pooled refit {k + 1}/{n_refits}: {len(cities)} cities, {summaries[-1]['train_rows']:.0f} rows, "
            f"{summaries[-1]['best_iteration']:.0f} trees")
    pooled_seconds = time.perf_counter() - started

    outcomes = []
    for city, panel, (origins, _), mine, theirs, obs in zip(cities, panels, periods, pooled_predictions, own, observed):
        claims = claim_test(mine, theirs, obs, panel.study_area.areas_km2, origins, panel.calendar.per_day,
                            coverages=HEADLINE_COVERAGES, claimed_ratio=1.0, n_boot=n_boot, seed=seed,
                            names=("pooled", PER_CITY))
        history = int(panel.slice(panel.first_shift, int(origins[0]))["count"].sum())
        outcomes.append(CityOutcome(city.name, panel.n_cells, history, int(obs.sum()), claims, pooling_verdict(claims),
                                    mine, theirs, obs, origins))
    outcomes.sort(key=lambda c: (c.history_incidents, c.city))
    return PooledBacktest(outcomes, str(test_start), str(test_end), PER_CITY, params, n_boot, n_refits,
                          pooled_seconds, per_city_seconds, summaries)
