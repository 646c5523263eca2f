"""``hotspots batch GRID.toml``: a backtest grid of sources x resolutions x shift schemes, one task per point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serving.cli.common import DataDir, console, fail, project_settings, stage

app = typer.Typer()


@app.command()
def batch(
    grid: Path = typer.Argument(..., help="The grid file (TOML): sources, resolutions, shift_starts and optionally "
                                          "forecasters, test_start/test_end, n_boot, [params.NAME]."),
    data_dir: Path | None = DataDir,
    cluster: Annotated[str | None, typer.Option(
        "--cluster", help="Run the points as tasks on this Dask scheduler, e.g. tcp://10.0.0.5:8786 (extra `dask`; "
                          "default: setting dask_scheduler, env HOTSPOTS_DASK_SCHEDULER; unset: in this process). "
                          "The data folder must be the same path on every worker.")] = None,
    workers: int = typer.Option(0, min=0, help="Without a cluster: start a local Dask cluster of this many "
                                               "one-thread worker processes (0: run the points in this process)."),
    retries: int = typer.Option(3, min=0, help="Retries of a task that raises (a lost worker is rescheduled anyway)."),
) -> None:
    """Backtest every point of a grid: each reads the data folder's store and writes batches/<name>/<point>/
    (results.parquet, forecasts.parquet, point.json); a point already done with the same inputs is not re-run,
    and each point is logged to MLflow once, by this process."""
    from forecasting.batch import GridError, load_grid
    from forecasting.reporting.batch_runs import run_tracked_batch

    settings = project_settings(data_dir)
    try:
        loaded = load_grid(grid, settings)
    except GridError as exc:
        fail(str(exc))
    address = cluster or settings.dask_scheduler
    if address and workers:
        fail("give either --cluster (or HOTSPOTS_DASK_SCHEDULER) or --workers, not both")
    where = f"on {address}" if address else f"on {workers} local workers" if workers else "in this process"
    with stage(f"batch {loaded.name}: {len(loaded.points)} points {where}") as step:
        try:
            if workers:
                tracked = _on_local_cluster(loaded, settings, workers, retries, step)
            else:
                tracked = run_tracked_batch(loaded, settings, cluster=address, retries=retries, progress=step)
        except ValueError as exc:
            fail(str(exc))
    done = len(tracked.results) - len(tracked.failed)
    console.print(f"{done} of {len(tracked.results)} points done ({tracked.logged} new MLflow runs); results in "
                  f"{Path(settings.data_dir) / 'batches' / loaded.name}")
    if tracked.failed:
        for result in tracked.failed:
            console.print(f"[bold red]failed:[/] {result.error}", soft_wrap=True)
        raise typer.Exit(code=1)


def _on_local_cluster(loaded, settings, workers: int, retries: int, step):
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        fail(f"--workers needs Dask's `distributed` ({exc}); install the extra: pip install 'hotspots[dask]'")
    from forecasting.reporting.batch_runs import run_tracked_batch

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        return run_tracked_batch(loaded, settings, cluster=client, retries=retries, progress=step)
