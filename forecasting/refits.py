"""The units of work of a rolling-origin backtest, as pure functions, so the same code runs in this process or
as tasks on a cluster (``forecasting.cluster``).

A backtest is, per forecaster, a series of (fit before the cutoff, predict the block) steps. A forecaster with
a warm start (SEPP's ``warm_start``) makes each refit depend on the previous one, so its whole series is one
group; the others only carry caches that change speed, never values (LightGBM's feature chunks are keyed by
their origin range and sampled with their own seed), so their series may be cut into contiguous groups that
run in parallel and still give the same numbers, to the bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from features.panel import CountPanel
from forecasting.base import Forecaster


@dataclass(frozen=True)
class RefitGroup:
    """Refits ``first`` .. ``stop - 1`` (indices into the backtest's cutoffs) of one forecaster: one task."""

    forecaster: str
    first: int
    stop: int

    @property
    def key(self) -> tuple[str, int]:
        """What a result is stored under: a retried task overwrites, never duplicates."""
        return self.forecaster, self.first


@dataclass
class StepResult:
    predictions: np.ndarray  # (block shifts, n_cells)
    fit_seconds: float
    predict_seconds: float


@dataclass
class GroupResult:
    group: RefitGroup
    predictions: np.ndarray  # (shifts of the group's blocks, n_cells), in origin order
    fit_seconds: float
    predict_seconds: float
    step_seconds: list[float]
    model: Forecaster  # as fitted at the group's last refit


def refit_step(model: Forecaster, panel: CountPanel, cutoff: int, block: np.ndarray,
               category: str | None = None) -> StepResult:
    """Fit ``model`` in place on the shifts before ``cutoff`` and forecast ``block``."""
    t0 = time.perf_counter()
    if category is not None:
        model.category = category
    model.fit(panel, cutoff)
    t1 = time.perf_counter()
    predictions = model.predict(panel, block)
    return StepResult(predictions, t1 - t0, time.perf_counter() - t1)


def refit_group(panel: CountPanel, origins: np.ndarray, blocks: list[int], group: RefitGroup,
                make: Callable[[], Forecaster], category: str | None = None) -> GroupResult:
    """Run one group's refits with a fresh instance (caches and warm starts carry over inside the group only).
    ``blocks`` are the backtest's cutoffs followed by its end shift."""
    model = make()
    parts, steps, fit_s, predict_s = [], [], 0.0, 0.0
    for i in range(group.first, group.stop):
        block = origins[(origins >= blocks[i]) & (origins < blocks[i + 1])]
        step = refit_step(model, panel, blocks[i], block, category)
        parts.append(step.predictions)
        steps.append(step.fit_seconds + step.predict_seconds)
        fit_s += step.fit_seconds
        predict_s += step.predict_seconds
    return GroupResult(group, np.concatenate(parts), fit_s, predict_s, steps, model)


def chained(model: Forecaster) -> bool:
    """Whether a refit starts from the previous refit's fit (a warm start), so the series cannot be cut."""
    return bool(model.get_params(deep=False).get("warm_start", False))


def plan_groups(forecasters: dict[str, Callable[[], Forecaster]], n_refits: int, pieces: int = 1) -> list[RefitGroup]:
    """Groups in a fixed order (forecaster, then refit): warm-started series whole, the others cut into up to
    ``pieces`` contiguous runs of near-equal length."""
    out = []
    for name, make in forecasters.items():
        n = 1 if chained(make()) else max(1, min(pieces, n_refits))
        edges = np.linspace(0, n_refits, n + 1).round().astype(int)
        out += [RefitGroup(name, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return out


def run_in_processes(panel: CountPanel, origins: np.ndarray, blocks: list[int], groups: list[RefitGroup],
                     forecasters: dict[str, Callable[[], Forecaster]], category: str | None = None,
                     processes: int = 2, progress: Callable[[str], None] | None = None,
                     side: Mapping[str, Callable[[], Any]] | None = None,
                     ) -> tuple[dict[tuple[str, int], GroupResult], dict[str, Any]]:
    """Every group in a pool of ``processes`` local processes (both cores of a laptop), with ``side`` jobs
    (picklable calls, such as the strongest-baseline scores) in the same pool; group results by
    ``RefitGroup.key``, so the caller assembles them exactly as the sequential run would, and side results by
    name. Learned forecasters' pieces (the longest) start first, then warm-started series (uncuttable), the
    side jobs, the rest longest first. Workers are spawned, never forked: a forked child of a process that has
    run LightGBM's OpenMP threads can hang."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    made = {name: make() for name, make in forecasters.items()}
    ordered = sorted(groups, key=lambda g: (not made[g.forecaster].learned, not chained(made[g.forecaster]),
                                            g.first - g.stop))
    n_chained = sum(chained(made[g.forecaster]) or made[g.forecaster].learned for g in ordered)
    jobs: list[tuple[RefitGroup | str, Callable[[], Any]]] = [
        (g, partial(refit_group, panel, origins, blocks, g, forecasters[g.forecaster], category)) for g in ordered]
    jobs[n_chained:n_chained] = [(name, job) for name, job in (side or {}).items()]
    results: dict[tuple[str, int], GroupResult] = {}
    side_results: dict[str, Any] = {}
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_timed, job): key for key, job in jobs}
        for done, future in enumerate(as_completed(futures), start=1):
            key = futures[future]
            result, seconds = future.result()
            if isinstance(key, RefitGroup):
                results[key.key] = result
                what = f"{key.forecaster} refits {key.first + 1}-{key.stop} of {len(blocks) - 1}"
            else:
                side_results[key] = result
                what = key
            if progress:
                progress(f"task {done}/{len(futures)}: {what} ({seconds:.1f} s)")
    return results, side_results


def _timed(job: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return job(), time.perf_counter() - t0
