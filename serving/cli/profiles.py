"""The profile assistant's commands: ``hotspots profile init FILE`` drafts a profile from a sample of an export,
``hotspots profile check PROFILE FILE`` dry-runs one (nothing is stored)."""

from __future__ import annotations

from pathlib import Path

import typer

from features.ingest import IngestError
from features.profile import ProfileError, load_profile
from serving.cli.common import DataDir, Resolution, console, fail, project_settings

app = typer.Typer(help="Draft and dry-run source profiles for any city's export.", no_args_is_help=True)


@app.command("init")
def init(
    file: Path = typer.Argument(..., help="The export (CSV, CSV.gz or Parquet)."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the draft (default: NAME.toml here)."),
    name: str | None = typer.Option(None, help="Source name (default: from the file name)."),
    timezone: str | None = typer.Option(None, help="The city's time zone, e.g. America/Vancouver: picks the "
                                           "projected CRS (UTM zone, state plane) near it."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Read a sample and write a commented draft profile: time columns and formats, coordinate columns and a CRS
    guess, id candidates, the category column with its top values."""
    from features.profile_assistant import AssistantError, draft_profile

    if timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            fail(f"unknown time zone {timezone!r}: give an IANA name such as America/Vancouver")
    try:
        draft = draft_profile(file, name=name, timezone=timezone)
    except AssistantError as exc:
        fail(str(exc))
    target = out or Path(f"{draft.name}.toml")
    if target.exists() and not force:
        fail(f"{target} exists: pass --force to overwrite it, or --out another file")
    target.write_text(draft.text)
    try:
        load_profile(target)
    except ProfileError as exc:  # the draft must load; if not, say what to edit
        console.print(f"[yellow]warning:[/] the draft does not load yet: {exc}", soft_wrap=True)
    console.print(f"time: {draft.time.why}", soft_wrap=True, highlight=False)
    console.print(f"coordinates: {draft.coordinates.why} ({draft.coordinates.crs})", soft_wrap=True, highlight=False)
    console.print(f"id: {draft.id_column or 'none (derived from row content)'}; category: {draft.category!r} "
                  f"({len(draft.top_values)} top values mapped)", soft_wrap=True, highlight=False)
    console.print(f"draft written to {target}; next: hotspots profile check {target} {file}", soft_wrap=True)


@app.command("check")
def check(
    profile: str = typer.Argument(..., help="Profile file or built-in name."),
    file: Path = typer.Argument(..., help="The export to dry-run."),
    png: Path | None = typer.Option(None, "--png", help="Map of accepted points (default: <data>/reports/"
                                       "profile-check/<name>.png)."),
    encoding: str | None = typer.Option(None, help="Input text encoding (default: the profile's)."),
    resolution: int | None = Resolution,
    data_dir: Path | None = DataDir,
) -> None:
    """Dry run: per-reason counts with sample rows, the time range, the share at exactly midnight, unmapped
    categories, and a PNG map of the accepted points over the derived area. Nothing is stored."""
    from features.profile_assistant import check_profile
    from serving.profile_map import write_check_map

    settings = project_settings(data_dir, resolution)
    try:
        prof = load_profile(profile)
        report = check_profile(prof, file, resolution=settings.h3_resolution, encoding=encoding)
    except (ProfileError, IngestError) as exc:
        fail(str(exc))
    for line in report.lines():
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    target = png or Path(settings.data_dir) / "reports" / "profile-check" / f"{prof.name}.png"
    write_check_map(report.latitude, report.longitude, report.cells, target, f"{prof.name}: {file.name}")
    console.print(f"map written to {target}", soft_wrap=True)
    if report.accepted == 0:
        fail(f"no row of {file.name} would be stored: see the reasons above")
