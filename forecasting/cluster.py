"""A backtest's refit groups as tasks on a Dask cluster (the optional extra ``dask``).

The panel is scattered to every worker once; each group (``forecasting.refits``) is one task with ``retries``
and a key made of (run, forecaster, first refit), and results are stored by that key, so a task recomputed after
a lost worker replaces its result instead of adding one. The caller assembles them in a fixed order, which keeps
the backtest identical to the local run. Nothing here logs to MLflow: the tracked run logs once, after gathering.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from features.panel import CountPanel
from forecasting.base import Forecaster
from forecasting.refits import GroupResult, RefitGroup, refit_group

INSTALL = "install the extra: pip install 'hotspots[dask]'"


@contextmanager
def connect(cluster: Any, timeout: str = "10s") -> Iterator[Any]:
    """A ``distributed.Client`` for a scheduler address (opened and closed here) or an existing Client (left
    open). A missing extra or an unreachable scheduler is a one-line ValueError naming the fix."""
    try:
        from distributed import Client
    except ImportError as exc:
        raise ValueError(f"--cluster / HOTSPOTS_DASK_SCHEDULER needs Dask's `distributed` ({exc}); {INSTALL}") from None
    if isinstance(cluster, Client):
        yield cluster
        return
    try:
        client = Client(str(cluster), timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ValueError(
            f"cannot reach the Dask scheduler at {cluster!r} ({type(exc).__name__}: {exc}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS`, or drop --cluster / unset HOTSPOTS_DASK_SCHEDULER "
            "to run locally") from None
    try:
        yield client
    finally:
        client.close()


def address_of(cluster: Any) -> str:
    """The scheduler address of an address or a Client (what a tracked run records)."""
    return cluster if isinstance(cluster, str) else str(getattr(getattr(cluster, "scheduler", None), "address", cluster))


def worker_threads(client: Any) -> int:
    """Task slots on the cluster now (threads over all workers), at least 1."""
    return max(1, sum(client.nthreads().values()))


def run_groups(client: Any, panel: CountPanel, origins: np.ndarray, blocks: list[int], groups: list[RefitGroup],
               forecasters: dict[str, Callable[[], Forecaster]], category: str | None = None, retries: int = 3,
               progress: Callable[[str], None] | None = None) -> dict[tuple[str, int], GroupResult]:
    """Every group as one task; results by ``RefitGroup.key``. A task that raises is retried ``retries`` times;
    a task whose worker dies is rescheduled by the scheduler (up to ``distributed.scheduler.allowed-failures``)."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    run = uuid.uuid4().hex[:12]
    shared = client.scatter(panel, broadcast=True, hash=False)
    futures = {
        client.submit(refit_group, shared, origins, blocks, group, forecasters[group.forecaster], category,
                      key=f"refit-{run}-{group.forecaster}-{group.first}", retries=retries, pure=False): group
        for group in groups
    }
    results: dict[tuple[str, int], GroupResult] = {}
    n_refits = len(blocks) - 1
    try:
        for done, future in enumerate(as_completed(futures), start=1):
            group = futures[future]
            try:
                result = future.result()
            except KilledWorker as exc:
                raise RuntimeError(f"the task for {group.forecaster} refits {group.first + 1}-{group.stop} killed "
                                   f"every worker it ran on ({exc}); give the workers more memory "
                                   "(`dask worker --memory-limit`) or run locally") from None
            results[group.key] = result
            if progress:
                progress(f"task {done}/{len(futures)}: {group.forecaster} refits {group.first + 1}-{group.stop} of "
                         f"{n_refits} ({sum(result.step_seconds):.1f} s)")
    finally:
        for future in futures:
            future.cancel()
        client.cancel([shared])
    return results
