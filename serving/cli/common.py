"""What every command group of the CLI shares: settings, the console, errors, progress and the panel loader.

Progress is for two readers: a person at a terminal sees rich spinners; a cron job, CI or a redirected log gets
one time-stamped line per stage and per step, so a 10-minute run is never silent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from features.paths import DataPaths
from features.profile import ProfileError, SourceProfile, load_profile
from features.settings import Settings

console = Console()

DataDir = typer.Option(None, "--data-dir", help="Data folder (default: settings data_dir, env HOTSPOTS_DATA_DIR).")
Resolution = typer.Option(None, "--resolution", help="H3 resolution (default: settings h3_resolution, 9).")


def project_settings(data_dir: Path | None = None, resolution: int | None = None) -> Settings:
    """The project's settings with the command line's overrides on top."""
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if resolution is not None:
        overrides["h3_resolution"] = resolution
    return Settings(**overrides)  # type: ignore[arg-type]


def fail(message: str) -> NoReturn:
    """A one-line error that names the problem and the fix, exit code 2, never a traceback."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=2)


def _log_line(message: str) -> None:
    stamp = datetime.now(UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    console.print(f"{stamp} {message}", soft_wrap=True, highlight=False, markup=False)


@contextmanager
def stage(label: str) -> Iterator[Callable[[str], None]]:
    """A named stage. Yields ``step(message)`` for progress inside it: a spinner's text at a terminal, a log
    line with the elapsed time otherwise."""
    started = time.perf_counter()
    if console.is_terminal:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(label, total=1)
            yield lambda message: bar.update(task, description=f"{label}: {message}")
            bar.update(task, description=label, completed=1)
        return
    _log_line(f"start {label}")
    yield lambda message: _log_line(f"  {label}: {message} ({time.perf_counter() - started:.0f} s)")
    _log_line(f"done  {label} ({time.perf_counter() - started:.1f} s)")


def source_profile(source: str, profile: str | None = None, settings: Settings | None = None) -> SourceProfile:
    """``--profile``, else SOURCE as a built-in name or a profile file, else the profile remembered for a source
    of that name at its last ingest (``<data>/profiles/<source>.toml``)."""
    remembered = DataPaths(settings or Settings()).profiles_root
    try:
        return load_profile(profile or source, remembered=remembered)
    except ProfileError as exc:
        fail(str(exc))


def load_panel(settings: Settings, source: str):
    """The saved panel of a source at the settings' resolution, or a message saying how to build it."""
    from features.panel import CountPanel

    folder = DataPaths(settings).panel(source)
    if not (folder / "panel.json").is_file():
        fail(f"no panel for {source!r} at resolution {settings.h3_resolution}: run `hotspots panel {source}` first")
    return CountPanel.load(folder)


def last_full_year(panel) -> int:
    last_day = panel.calendar.local_date(panel.end_shift - 1)
    return last_day.year if last_day >= date(last_day.year, 12, 31) else last_day.year - 1


def last_full_month(panel) -> tuple[date, date]:
    """[first day, first day of the next month) of the panel's last complete local month."""
    last_day = panel.calendar.local_date(panel.end_shift - 1)
    end = date(last_day.year, last_day.month, 1)
    if (last_day + timedelta(days=1)).month != last_day.month:
        end = last_day + timedelta(days=1)
    start = date(end.year - (end.month == 1), (end.month - 2) % 12 + 1, 1)
    return start, end


def audit_layer(preset: str | None, source: str):
    """The shipped area layer named by --audit-preset, else the source's own when its file is present."""
    from forecasting.area_join import AreaJoinError
    from forecasting.area_presets import default_layer, get_preset

    if preset is None:
        layer = default_layer(source)
        if layer is None:
            console.print(f"no area layer for {source}: the bias audit is skipped (give --audit-preset, or "
                          f"`hotspots audit {source} --layer-config F.toml` afterwards)")
        return layer
    try:
        return get_preset(preset)
    except AreaJoinError as exc:
        fail(str(exc))
