"""``hotspots pooled PANEL...``: one LightGBM pooled across cities vs each city's own, per city, smaller first."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from serving.cli.common import DataDir, console, fail, project_settings, stage

app = typer.Typer()


def parse_cities(panels: list[str]):
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder) -> City, each a folder with a saved panel."""
    from forecasting.pooled import City

    cities = []
    for spec in panels:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        path = Path(folder).expanduser().resolve()
        if not name or not (path / "panel.json").is_file():
            fail(f"{spec!r} is not a saved panel folder (no panel.json in {path}); give FOLDER or NAME=FOLDER of a "
                 "panel made by `hotspots panel` (e.g. data/panels/chicago-r9)")
        cities.append(City(name, str(path)))
    if len(cities) < 2 or len({c.name for c in cities}) != len(cities):
        fail("give at least two panels with distinct names (NAME=FOLDER to rename one)")
    return cities


@app.command()
def pooled(
    panels: list[str] = typer.Argument(..., help="Saved panel folders, FOLDER or NAME=FOLDER (two or more); the "
                                                 "same paths must be readable by every Dask worker."),
    test_start: Annotated[str, typer.Option("--test-start", help="First day of the test period (local date, "
                                                                 "YYYY-MM-DD, a month start).")] = "",
    test_end: Annotated[str, typer.Option("--test-end", help="Day after the test period (YYYY-MM-DD).")] = "",
    out: Path | None = typer.Option(None, "--out", help="Report folder (default: <data>/pooled/<start>-<end>)."),
    data_dir: Path | None = DataDir,
    cluster: Annotated[str | None, typer.Option(
        "--cluster", help="Dask scheduler address (extra `dask`; default: setting dask_scheduler, env "
                          "HOTSPOTS_DASK_SCHEDULER; unset: a local cluster of --workers).")] = None,
    workers: int = typer.Option(2, min=1, help="Without a cluster: one-thread local worker processes."),
    n_boot: int = typer.Option(1000, min=1, help="Bootstrap replicates of the paired intervals."),
    seed: int = typer.Option(0, min=0),
    train_days: int = typer.Option(730, min=2, help="Days of history each refit learns from (both models)."),
    n_estimators: int = typer.Option(300, min=1, help="Most trees of the pooled model (chosen on validation)."),
) -> None:
    """Backtest a LightGBM pooled across the cities (trained with lightgbm.dask) against each city's own LightGBM,
    monthly refits; writes pooled.json, pooled.md and forecasts.parquet and one MLflow run."""
    from forecasting.reporting.pooled_runs import run_tracked_pooled

    settings = project_settings(data_dir)
    try:
        start, end = date.fromisoformat(test_start), date.fromisoformat(test_end)
    except ValueError:
        fail(f"--test-start {test_start!r} / --test-end {test_end!r}: give both as YYYY-MM-DD, e.g. --test-start "
             "2018-10-01 --test-end 2019-01-01")
    if start >= end:
        fail("--test-start must be before --test-end")
    cities = parse_cities(panels)
    folder = out or Path(settings.data_dir) / "pooled" / f"{start:%Y%m%d}-{end:%Y%m%d}"
    address = cluster or settings.dask_scheduler
    where = f"on {address}" if address else f"on {workers} local workers"
    with stage(f"pooled backtest of {len(cities)} cities {where}") as step:
        try:
            result, run_id = run_tracked_pooled(cities, settings, folder, start, end, cluster=address, workers=workers,
                                                params={"train_days": train_days, "n_estimators": n_estimators},
                                                n_boot=n_boot, seed=seed, progress=step)
        except ValueError as exc:
            fail(str((str(exc).strip().splitlines() or [type(exc).__name__])[0]))
    console.print(result.markdown(), soft_wrap=True, highlight=False, markup=False)
    console.print(f"report in {folder} (MLflow run {run_id[:8]})")
