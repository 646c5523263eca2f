"""Live operation: ``hotspots update`` keeps a source's store and panel current (cron or a systemd timer), and
``hotspots retrain`` backtests the latest months and moves the champion only when the promotion gate passes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from features.paths import DataPaths
from serving.cli.common import (
    DataDir,
    Resolution,
    console,
    fail,
    load_panel,
    project_settings,
    source_profile,
    stage,
)
from serving.cli.models import Params, chosen_factories

app = typer.Typer()


@app.command()
def update(
    source: str = typer.Argument(..., help="Source name (chicago pulls from the city's Socrata API unless "
                                 "--drop-dir is given; any other source needs --drop-dir)."),
    drop_dir: Annotated[Path | None, typer.Option(
        "--drop-dir", help="Folder new export files are put in (write elsewhere, then move them in). Each file is "
                           "ingested once, then moved to done/ (or failed/, with the reason logged). Default: "
                           "setting update_drop_dir.")] = None,
    overlap_days: Annotated[float | None, typer.Option(
        "--overlap-days", min=0, help="API pulls start this long before the last stored time, so late and revised "
                                      "rows are read again (default: setting update_overlap_days, 7).")] = None,
    resolution: int | None = Resolution,
    profile: str | None = typer.Option(None, help="Profile name or file, if not the source name."),
    data_dir: Path | None = DataDir,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Refuse (exit 2) instead of waiting when another "
                                          "process is writing the data folder.")] = False,
) -> None:
    """Fetch or pick up new incidents, ingest them (revisions and quarantine as usual) and append the new shifts to
    the panel (only changed and new shifts are recounted); a running service serves the new panel at its next
    refresh, so 'next' is the real next shift. One log line per step."""
    from features.ingest import IngestError
    from features.sources.socrata import SocrataError, fetch_to_csv
    from features.store import IncidentStore
    from features.storelock import StoreError
    from features.update import UpdateError, update_from_drop_folder, update_from_fetch

    settings = project_settings(data_dir, resolution)
    prof = source_profile(source, profile, settings)
    store = IncidentStore(settings.data_dir, wait=not no_wait, on_wait=console.print)
    panel_dir = DataPaths(settings).panel(prof.name)
    drop_dir = drop_dir or settings.update_drop_dir
    overlap = timedelta(days=settings.update_overlap_days if overlap_days is None else overlap_days)
    common = dict(future_tolerance=timedelta(minutes=settings.future_tolerance_minutes))
    if drop_dir is None and prof.name != "chicago":
        fail(f"{prof.name} has no API to pull from: give --drop-dir (or the setting update_drop_dir), the folder "
             f"its new export files are put in")
    try:
        with stage(f"update {prof.name}") as step:
            if drop_dir is not None:
                report = update_from_drop_folder(prof, store, panel_dir, drop_dir, log=step, **common)
            else:
                def pull(target: Path, since) -> int:
                    return fetch_to_csv(target, since=since, app_token=settings.socrata_app_token)

                report = update_from_fetch(prof, store, panel_dir, pull, overlap=overlap, log=step,
                                           **common)
    except (UpdateError, StoreError, IngestError) as exc:
        fail(str(exc))
    except SocrataError as exc:
        fail(f"{exc}; nothing was ingested: rerun later (the next run starts from the last stored time)")
    if report.failed:
        fail("; ".join(f"{f.file} was not ingested ({f.error}); it is in {f.moved_to or 'the drop folder'}"
                       for f in report.failed))


@app.command()
def retrain(
    source: str = typer.Argument(..., help="Source (city) whose champion to retrain."),
    months: Annotated[int, typer.Option("--months", min=1, help="Backtest the latest N complete months.")] = 3,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Backtest and report what the gate decides; register "
                                          "nothing and move no alias.")] = False,
    forecaster: list[str] | None = typer.Option(None, help="Forecasters to compare, by registry name (default: all)."),
    param: list[str] | None = Params,
    n_boot: int = typer.Option(1000, help="Bootstrap draws of the intervals."),
    resolution: int | None = Resolution,
    data_dir: Path | None = DataDir,
) -> None:
    """Backtest the latest months with every registered forecaster against the strongest baseline; the learned
    candidate is refitted, registered and made champion only when it passes the promotion gate. Logged to MLflow."""
    from forecasting.reporting.retrain import retrain as run_retrain

    available = chosen_factories(forecaster, param)
    settings = project_settings(data_dir, resolution)
    built = load_panel(settings, source)
    with stage(f"retrain {source} on the latest {months} month(s)" + (" (dry run)" if dry_run else "")) as step:
        try:
            result = run_retrain(built, source, settings, available, months=months, dry_run=dry_run, n_boot=n_boot,
                                 progress=step)
        except ValueError as exc:
            fail(str(exc))
    console.print(result.sentence(), soft_wrap=True, highlight=False, markup=False)
    console.print(f"MLflow run {result.tracked.run_id}", highlight=False)
