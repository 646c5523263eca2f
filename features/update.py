"""Live operation: bring a source's incident store and count panel up to date without a full rebuild.

New incidents come from a drop folder of export files (any profile) or from a pull of the Socrata API (Chicago).
They go through the usual ingest (revisions, quarantine, the writer lock). The panel keeps its cells and is
extended by *appending* shifts; only the shifts whose incidents changed (new rows, revised rows, the shifts a
revised row left) and the new shifts are recounted, from the store, so the result equals a full rebuild on the
same cells. A service reading the panels folder picks the new panel up at its next refresh.

Crash safety: a marker in the panel folder is written before the first ingest and removed once the new panel is
saved; an update that finds it recounts the whole panel (the store may hold rows the panel never saw). Drop files
move to ``done/`` (or ``failed/``, with the reason logged) only after the panel is saved, so nothing is lost and
nothing is counted twice: a file ingested again is "already stored".
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from features.ingest import IngestError
from features.panel import CountPanel, build_panel, with_cells
from features.pipeline import IngestSummary, ingest_file
from features.profile import SourceProfile
from features.store import IncidentStore
from features.storelock import StoreError, atomic_write_text
from features.validation import CANONICAL_SCHEMA

Log = Callable[[str], None]

DONE, FAILED = "done", "failed"
MARKER = ".update-in-progress"
PARTIAL_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")  # a writer still at work: left for the next run
DEFAULT_OVERLAP = timedelta(days=7)  # re-read this much before the last stored time: late and revised rows


class UpdateError(RuntimeError):
    """The update cannot start (no panel, no drop folder, ...): the message names the fix."""


@dataclass(frozen=True)
class PanelUpdate:
    """What one update did to the panel."""

    old_end: int
    new_end: int
    recounted_shifts: int  # old shifts recounted because their incidents changed, plus the appended ones
    changed_incidents: int  # incident versions added, revised or removed in the store since the last update
    full_recount: bool = False

    @property
    def appended(self) -> int:
        return self.new_end - self.old_end


@dataclass
class FileOutcome:
    file: str
    summary: IngestSummary | None = None
    error: str | None = None
    moved_to: str | None = None


@dataclass
class UpdateReport:
    source: str
    files: list[FileOutcome] = field(default_factory=list)
    panel: PanelUpdate | None = None

    @property
    def failed(self) -> list[FileOutcome]:
        return [f for f in self.files if f.error is not None]


# --- the drop folder -------------------------------------------------------------------------------------
def pending_files(drop_dir: Path) -> list[Path]:
    """Export files waiting in ``drop_dir`` (not in done/ or failed/), oldest name first. Hidden files and
    half-written ones (``.part``, ``.tmp``) are left alone: a writer should write elsewhere, then move the file in."""
    if not drop_dir.is_dir():
        raise UpdateError(f"drop folder {drop_dir} does not exist: create it, or give --drop-dir the folder the "
                          f"new export files are put in")
    return sorted(p for p in drop_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(PARTIAL_SUFFIXES))


def _move(path: Path, folder: Path) -> Path:
    """Move into ``folder``, never over an earlier file of the same name (a suffix is added)."""
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    shutil.move(str(path), target)
    return target


# --- the panel ------------------------------------------------------------------------------------------
_KEY = list(CANONICAL_SCHEMA)


def changed_times(before: pl.DataFrame, after: pl.DataFrame) -> pl.Series:
    """Occurrence times of every incident version in one snapshot of the store and not the other: new rows,
    both versions of a revised row, removed rows. Their shifts are the ones whose counts may have changed.
    Rows are compared by a 64-bit hash of every canonical field (a join on all seven is ~9x slower on Toronto)."""
    def hashed(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.select("occurred_at").with_columns(frame.select(_KEY).hash_rows().alias("_row"))

    old, new = hashed(before), hashed(after)
    gone = old.join(new.select("_row"), on="_row", how="anti")
    came = new.join(old.select("_row"), on="_row", how="anti")
    return pl.concat([gone["occurred_at"], came["occurred_at"]])


def _shift_windows(panel: CountPanel, shifts: np.ndarray) -> list[tuple[np.datetime64, np.datetime64]]:
    """[start, end) in UTC of each run of consecutive shift ids."""
    if shifts.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(shifts) != 1)
    firsts = np.concatenate([shifts[:1], shifts[breaks + 1]])
    lasts = np.concatenate([shifts[breaks], shifts[-1:]])
    starts = panel.calendar.starts_utc(firsts)
    ends = panel.calendar.starts_utc(lasts + 1)
    return list(zip(starts, ends, strict=True))


def extend_panel(panel: CountPanel, incidents: pl.DataFrame, changed: pl.Series | None, now: datetime,
                 ) -> tuple[CountPanel, PanelUpdate]:
    """The panel with new shifts appended up to the latest stored incident's shift (never past the shift in
    progress at ``now``) and every shift touched by ``changed`` recounted from ``incidents`` (the whole store of
    the source). ``changed`` None recounts every shift. Cells, categories and the first shift stay fixed."""
    cal = panel.calendar
    old_end = panel.end_shift
    new_end = old_end
    if incidents.height:
        latest = incidents["occurred_at"].max()
        data_end = cal.shift_of(latest) + 1  # type: ignore[arg-type]  # a Datetime column's max is a datetime
        new_end = max(old_end, min(data_end, cal.shift_of(now) + 1))
    if changed is None:
        affected = np.arange(panel.first_shift, new_end, dtype=np.int64)
    else:
        touched = cal.shift_ids(changed) if changed.len() else np.empty(0, np.int64)
        affected = np.union1d(touched, np.arange(old_end, new_end, dtype=np.int64))
        affected = affected[(affected >= panel.first_shift) & (affected < new_end)]
    times = incidents["occurred_at"]
    if not times.is_sorted():
        incidents = incidents.sort("occurred_at")
        times = incidents["occurred_at"]
    instants = times.dt.replace_time_zone(None).to_numpy()
    windows = _shift_windows(panel, affected)
    rows = [np.arange(*np.searchsorted(instants, [lo, hi])) for lo, hi in windows]
    subset = incidents[np.concatenate(rows)] if rows else incidents.clear()
    recount, _ = build_panel(with_cells(subset, panel.study_area.resolution), panel.study_area, cal, panel.categories,
                             first_shift=panel.first_shift, end_shift=new_end)
    wanted_list = affected.tolist()
    counts = pl.concat([panel.counts.filter(~pl.col("shift").is_in(wanted_list)),
                        recount.counts.filter(pl.col("shift").is_in(wanted_list))]).sort("shift", "cell", "category")
    meta = {**panel.meta, "updated_at": now.astimezone(UTC).isoformat(timespec="seconds"),
            "data_through": None if not incidents.height else str(times.max())}
    extended = CountPanel(panel.study_area, cal, panel.categories, panel.first_shift, new_end, counts, meta)
    return extended, PanelUpdate(old_end, new_end, int(affected.size),
                                 -1 if changed is None else int(changed.len()), changed is None)


# --- one update -------------------------------------------------------------------------------------------
def _read(store: IncidentStore, source: str) -> pl.DataFrame:
    try:
        return store.read(source)
    except FileNotFoundError:
        return pl.DataFrame(schema=CANONICAL_SCHEMA)


def update_source(
    profile: SourceProfile,
    store: IncidentStore,
    panel_dir: Path,
    files: Sequence[Path],
    *,
    drop_dir: Path | None = None,
    now: datetime | None = None,
    future_tolerance: timedelta = timedelta(hours=1),
    boundary=None,
    log: Log = lambda message: None,
) -> UpdateReport:
    """Ingest ``files`` (each once; a file that cannot be read is reported, never fatal to the others), then
    append to and recount the panel at ``panel_dir``, all under the data folder's writer lock. Files inside
    ``drop_dir`` move to its done/ or failed/ folder once the panel is saved."""
    now = now or datetime.now(UTC)
    source = profile.name
    _require_panel(panel_dir, source)
    report = UpdateReport(source)
    marker = panel_dir / MARKER
    with store.writing(f"update of {source}"):
        interrupted = marker.exists()
        if interrupted:
            log("the previous update did not finish; recounting the whole panel from the store")
        before = _read(store, source)
        atomic_write_text(f"update started {now.isoformat()}\n", marker)
        for path in files:
            try:
                summary = ingest_file(path, profile, store, now=now, future_tolerance=future_tolerance,
                                      boundary=boundary)
            except IngestError as exc:
                report.files.append(FileOutcome(path.name, error=str(exc)))
                log(f"{path.name}: not ingested: {exc}")
                continue
            report.files.append(FileOutcome(path.name, summary=summary))
            log(f"{path.name}: {summary.input_rows:,} rows, {summary.stored_new:,} new, "
                f"{summary.updated:,} revised, {summary.already_stored:,} already stored, "
                f"{summary.quarantined_total:,} quarantined")
        after = _read(store, source)
        panel = CountPanel.load(panel_dir)
        changed = None if interrupted else changed_times(before, after)
        extended, change = extend_panel(panel, after, changed, now)
        if change.new_end != change.old_end or change.recounted_shifts:
            extended.save(panel_dir)
        marker.unlink()
        report.panel = change
        log(f"panel {change.appended:,} shifts appended, {change.recounted_shifts:,} shifts "
            f"recounted ({'whole panel' if change.full_recount else f'{change.changed_incidents:,} incident versions changed'})"
            f"; data through shift {change.new_end - 1} starting {_local_start(panel, change.new_end - 1)}")
    if drop_dir is not None:
        for outcome, path in zip(report.files, files, strict=True):
            if path.parent.resolve() == drop_dir.resolve() and path.exists():
                outcome.moved_to = str(_move(path, drop_dir / (FAILED if outcome.error else DONE)))
    return report


def _require_panel(panel_dir: Path, source: str) -> None:
    if not (panel_dir / "panel.json").is_file():
        raise UpdateError(f"no panel for {source!r} at {panel_dir}: run `hotspots panel {source}` once first "
                          f"(update appends to it)")


def _local_start(panel: CountPanel, shift_id: int) -> str:
    start = panel.calendar.bounds([shift_id])["start_local"][0]
    return start.isoformat(timespec="minutes")


def update_from_drop_folder(profile: SourceProfile, store: IncidentStore, panel_dir: Path, drop_dir: Path,
                            **kwargs) -> UpdateReport:
    """Every pending file of the drop folder, in name order (date-stamped names ingest in time order)."""
    _require_panel(panel_dir, profile.name)
    files = pending_files(drop_dir)
    log: Log = kwargs.get("log") or (lambda message: None)
    log(f"{len(files)} new file(s) in {drop_dir}")
    return update_source(profile, store, panel_dir, files, drop_dir=drop_dir, **kwargs)


def fetch_since(store: IncidentStore, source: str, overlap: timedelta = DEFAULT_OVERLAP) -> datetime | None:
    """Where a pull starts: the last stored time minus ``overlap`` (late and revised rows come back and are
    stored as revisions or recognised as already stored); None when nothing is stored."""
    try:
        latest = store.scan(source).select(pl.col("occurred_at").max()).collect().item()
    except FileNotFoundError:
        return None
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise StoreError(f"the incident store of {source} is unreadable ({exc}): run `hotspots verify`") from None
    return None if latest is None else latest - overlap


def update_from_fetch(profile: SourceProfile, store: IncidentStore, panel_dir: Path,
                      fetch: Callable[[Path, datetime | None], int], *, overlap: timedelta = DEFAULT_OVERLAP,
                      **kwargs) -> UpdateReport:
    """Pull new rows with ``fetch(path, since)`` (e.g. the Socrata client's ``fetch_to_csv``) into a temporary
    file in the data folder, update from it, then delete it: the raw pull carries addresses the store never keeps."""
    log: Log = kwargs.get("log") or (lambda message: None)
    _require_panel(panel_dir, profile.name)
    since = fetch_since(store, profile.name, overlap)
    folder = store.data_dir / "raw" / "updates"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = (kwargs.get("now") or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = folder / f"{profile.name}-{stamp}.csv"
    try:
        rows = fetch(target, since)
        log(f"fetched {rows:,} rows since {since.isoformat() if since else 'the beginning'}")
        return update_source(profile, store, panel_dir, [target], **kwargs)
    finally:
        target.unlink(missing_ok=True)
