"""Data commands: from a city's export to the incident store, the count panel and feature matrices."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from features.grid import read_boundary
from features.ingest import IngestError
from features.paths import DataPaths
from features.pipeline import build_city_panel
from features.profile import builtin_profiles, load_profile
from features.settings import Settings
from serving.cli.common import (
    DataDir,
    Resolution,
    console,
    fail,
    last_full_year,
    load_panel,
    project_settings,
    source_profile,
    stage,
)

app = typer.Typer()


def input_path(source: str, path: Path | None, settings: Settings) -> Path:
    if path is not None:
        return path
    if source == "toronto-mci":
        from features.sources.toronto import materialise
        from features.storelock import StoreError, cannot_write, data_folder

        target = settings.data_dir / "raw" / "toronto-mci.csv"
        try:
            data_folder(settings.data_dir)
            return materialise(target)
        except FileNotFoundError as exc:  # the toronto extra is not installed
            fail(str(exc))
        except StoreError as exc:
            fail(str(exc))
        except OSError as exc:  # read-only or full
            fail(str(cannot_write(target.parent, exc)))
    fail(f"give the input file for source {source!r} (CSV, CSV.gz or Parquet)")


@app.command()
def profiles() -> None:
    """List the built-in source profiles."""
    table = Table("name", "description", "time zone", "licence")
    for name in builtin_profiles():
        p = load_profile(name)
        table.add_row(name, p.description, p.timezone, p.licence)
    console.print(table)


@app.command()
def ingest(
    source: str = typer.Argument(..., help="Profile name (chicago, toronto-mci), a profile file for any city, or "
                                 "a source ingested before (its profile is remembered)."),
    path: Path | None = typer.Argument(None, help="Input CSV/CSV.gz/Parquet (toronto-mci: read from its wheel)."),
    profile: str | None = typer.Option(None, help="Profile name or file, if not the source name."),
    encoding: str | None = typer.Option(None, help="Input text encoding (default: the profile's, utf-8)."),
    boundary: Path | None = typer.Option(None, help="GeoJSON/GeoPackage polygon: points outside are out_of_area."),
    data_dir: Path | None = DataDir,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Refuse (exit 2) instead of waiting when another "
                                          "process is writing the data folder.")] = False,
    cluster: Annotated[str | None, typer.Option(
        "--cluster", help="Read, validate and spill a large export's chunks as tasks on this Dask scheduler, e.g. "
                          "tcp://10.0.0.5:8786 (extra `dask`; default: setting dask_scheduler, env "
                          "HOTSPOTS_DASK_SCHEDULER; unset: in this process). The workers must see the input file "
                          "and the data folder at the same paths. The store is the same as a local ingest's.")] = None,
) -> None:
    """Validate a city export into the incident store; rejected rows go to quarantine with a reason."""
    from contextlib import ExitStack

    from features.pipeline import ingest_file, ingest_on_cluster
    from features.store import IncidentStore
    from features.storelock import StoreError
    from forecasting.cluster import connect

    settings = project_settings(data_dir)
    prof = source_profile(source, profile, settings)
    file = input_path(prof.name, path, settings)
    shape = read_boundary(boundary) if boundary else None
    store = IncidentStore(settings.data_dir, wait=not no_wait, on_wait=console.print)
    tolerance = timedelta(minutes=settings.future_tolerance_minutes)
    address = cluster or settings.dask_scheduler
    with ExitStack() as open_client:
        client = None
        if address:
            try:  # before any work: a wrong address fails in seconds
                client = open_client.enter_context(connect(address))
            except ValueError as exc:
                fail(str(exc))
        try:
            with stage(f"ingest {file.name}"):
                summary = (ingest_on_cluster(file, prof, store, client, encoding=encoding, boundary=shape,
                                             future_tolerance=tolerance) if client is not None
                           else ingest_file(file, prof, store, encoding=encoding, boundary=shape,
                                            future_tolerance=tolerance))
        except (IngestError, StoreError) as exc:
            fail(str(exc))
    for line in summary.lines():
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    console.print(f"summary written to {summary.report_path}")
    if summary.profile_path:
        console.print(f"profile remembered as {summary.profile_path}: later commands take the source name "
                      f"{prof.name!r}", soft_wrap=True)
    if summary.hint:
        fail(summary.hint)


@app.command()
def fetch(
    out: Path = typer.Option(..., help="CSV file to write (portal export columns)."),
    since: datetime | None = typer.Option(None, help="Local time, inclusive."),
    until: datetime | None = typer.Option(None, help="Local time, exclusive."),
    page_size: int = typer.Option(50_000),
    data_dir: Path | None = DataDir,
) -> None:
    """Download Chicago incidents from the city's Socrata API into a CSV ready for `hotspots ingest chicago`."""
    from features.sources.socrata import SocrataError, fetch_to_csv

    settings = project_settings(data_dir)
    try:
        with stage("fetch from the Chicago data portal"):
            n = fetch_to_csv(out, since=since, until=until, app_token=settings.socrata_app_token, page_size=page_size)
    except SocrataError as exc:
        fail(str(exc))
    except ValueError as exc:  # a page the portal sent in an unexpected shape
        fail(f"the portal's rows could not be read ({exc}); nothing was written to {out}: rerun later, or report it")
    except OSError as exc:
        fail(f"cannot write {out} ({exc.strerror}): give --out a writable path")
    console.print(f"wrote {n:,} rows to {out}")


@app.command()
def panel(
    source: str = typer.Argument(..., help="Source name in the store (or its profile file)."),
    resolution: int | None = Resolution,
    boundary: Path | None = typer.Option(None, help="Study-area polygon file (default: derived from the data)."),
    layer: str | None = typer.Option(None, help="Layer of the boundary GeoPackage."),
    profile: str | None = typer.Option(None, help="Profile name or file, if not the source name."),
    data_dir: Path | None = DataDir,
) -> None:
    """Bin stored incidents into the H3 x shift count panel."""
    from features.store import IncidentStore
    from features.storelock import StoreError

    settings = project_settings(data_dir, resolution)
    prof = source_profile(source, profile, settings)
    source = prof.name
    store = IncidentStore(settings.data_dir)
    try:
        incidents = store.read(source)
    except (FileNotFoundError, StoreError) as exc:
        fail(str(exc))
    shape = read_boundary(boundary, layer) if boundary else None
    with stage(f"panel of {incidents.height:,} incidents at H3 resolution {settings.h3_resolution}"):
        built = build_city_panel(incidents, prof, settings, boundary=shape, name=source)
    folder = DataPaths(settings).panel(source)
    try:
        with store.writing(f"panel of {source}"):
            built.panel.save(folder)
    except StoreError as exc:
        fail(str(exc))
    p, report = built.panel, built.report
    console.print(
        f"{p.n_cells:,} cells, {p.n_shifts:,} shifts ({', '.join(p.calendar.labels)} {prof.timezone}), "
        f"{p.counts.height:,} non-zero (cell, shift, category) counts"
    )
    console.print(
        f"binned {report.binned:,}; outside study area {report.outside_study_area:,}; "
        f"outside period {report.outside_period:,} (of {report.incidents:,})"
    )
    console.print(f"panel saved to {folder}")


@app.command()
def features(
    source: str = typer.Argument(...),
    start: datetime = typer.Option(..., help="First forecast origin (local date or time)."),
    end: datetime = typer.Option(..., help="End of the origin range (exclusive)."),
    resolution: int | None = Resolution,
    data_dir: Path | None = DataDir,
) -> None:
    """Build the feature matrix for every shift starting in [start, end) and save it as Parquet."""
    from zoneinfo import ZoneInfo

    from features.matrix import build_features, build_targets

    settings = project_settings(data_dir, resolution)
    built = load_panel(settings, source)
    zone = ZoneInfo(built.calendar.timezone)
    origins = built.calendar.shift_range(start.replace(tzinfo=start.tzinfo or zone), end.replace(tzinfo=end.tzinfo or zone))
    if origins.size == 0:
        fail("no shift starts in that range")
    with stage(f"features for {origins.size:,} shifts x {built.n_cells:,} cells"):
        matrix = build_features(built, origins)
        frame = matrix.frame()
        if origins[-1] < built.end_shift:
            frame = frame.with_columns(target=build_targets(built, origins))
    out = DataPaths(settings).features(source, start, end)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out)
    console.print(f"{frame.height:,} rows x {len(matrix.columns)} features written to {out}")


@app.command()
def prepare(
    source: str = typer.Argument("toronto-mci", help="Source to prepare end to end: a built-in name or a profile file."),
    path: Path | None = typer.Argument(None, help="Input file (toronto-mci: read from its wheel)."),
    feature_year: int | None = typer.Option(None, help="Year of origins to build features for (default: last full year)."),
    resolution: int | None = Resolution,
    data_dir: Path | None = DataDir,
) -> None:
    """Ingest, validate, bin and build features in one go: the analyst's first run."""
    ingest(source=source, path=path, profile=None, encoding=None, boundary=None, data_dir=data_dir, no_wait=False)
    source = source_profile(source, None, project_settings(data_dir)).name  # a profile file's source name
    panel(source=source, resolution=resolution, boundary=None, layer=None, profile=None, data_dir=data_dir)
    settings = project_settings(data_dir, resolution)
    year = feature_year or last_full_year(load_panel(settings, source))
    features(source=source, start=datetime(year, 1, 1), end=datetime(year + 1, 1, 1), resolution=resolution,
             data_dir=data_dir)


@app.command()
def quarantine(source: str, data_dir: Path | None = DataDir) -> None:
    """Show quarantined rows by reason."""
    from features.store import IncidentStore
    from features.storelock import StoreError

    try:
        rows = IncidentStore(project_settings(data_dir).data_dir).read_quarantine(source)
    except StoreError as exc:
        fail(str(exc))
    if rows.height == 0:
        console.print(f"nothing quarantined for {source!r}")
        return
    table = Table("file", "reason", "rows")
    for file, reason, n in rows.group_by("file", "reason").len().sort("file", "len", descending=[False, True]).iter_rows():
        table.add_row(file, reason, f"{n:,}")
    console.print(table)


@app.command()
def retention(
    max_age_days: int = typer.Option(..., min=1, help="Delete incidents that occurred more than this many days ago."),
    data_dir: Path | None = DataDir,
) -> None:
    """Data-protection retention: delete old incidents (and quarantine files) from the store."""
    from features.store import IncidentStore
    from features.storelock import StoreError

    try:
        deleted = IncidentStore(project_settings(data_dir).data_dir).delete_older_than(timedelta(days=max_age_days))
    except StoreError as exc:
        fail(str(exc))
    console.print(json.dumps(deleted))
