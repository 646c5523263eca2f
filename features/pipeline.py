"""The data pipeline's two entry points: ingest one file end to end (read, validate, store, quarantine, and
account for every row: input = stored new + updated + already stored + quarantined), and build a city's count
panel from its stored incidents."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from features.area_rule import BulkRule, FixedBulk, span_note
from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.hints import nothing_stored_hint
from features.ingest import Chunk, ChunkRows, InputPlan, chunk_notes, plan_input, read_chunk, read_raw
from features.panel import COUNTS_SCHEMA, BinningReport, CountPanel, build_panel, with_cells
from features.profile import SourceProfile
from features.settings import Settings
from features.store import IncidentStore, spill
from features.storelock import atomic_write_text, cannot_write
from features.validation import (
    UNMAPPED_SHOWN,
    ChunkContext,
    ValidationResult,
    reason_counts,
    stable_digests,
    validate,
)


class AccountingError(RuntimeError):
    """Rows were lost between input and output: a bug, never a data problem."""


@dataclass
class IngestSummary:
    source: str
    file: str
    input_rows: int
    stored_new: int
    already_stored: int
    updated: int = 0  # stored ids whose content changed: replaced, the old version kept in the revision history
    quarantined: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    report_path: str | None = None
    notes: list[str] = field(default_factory=list)  # what was wrong with the file, in plain words
    unmapped: dict[str, int] = field(default_factory=dict)  # category values no map entry or rule matched (top 20)
    hint: str | None = None  # set when nothing was stored: the most common reason and the profile field to fix
    profile_path: str | None = None  # where the profile was remembered for later commands

    @property
    def stored_any(self) -> bool:
        return self.stored_new + self.updated + self.already_stored > 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def balanced(self) -> bool:
        return self.input_rows == self.stored_new + self.updated + self.already_stored + self.quarantined_total

    def lines(self) -> list[str]:
        out = [
            f"source {self.source}: {self.file}",
            f"  input rows       {self.input_rows:>10,}",
            f"  stored (new)     {self.stored_new:>10,}",
            f"  updated          {self.updated:>10,}",
            f"  already stored   {self.already_stored:>10,}",
            f"  quarantined      {self.quarantined_total:>10,}",
        ]
        out += [f"    {reason:<16} {n:>10,}" for reason, n in self.quarantined.items()]
        out.append(f"  balanced: {self.balanced} ({self.seconds:.1f} s)")
        if self.unmapped:
            out.append("  unmapped category values (value: rows):")
            out += [f"    {value!r}: {n:,}" for value, n in self.unmapped.items()]
        out += [f"note: {note}" for note in self.notes]
        return out


def ingest_file(
    path: str | Path,
    profile: SourceProfile,
    store: IncidentStore,
    *,
    encoding: str | None = None,
    boundary=None,
    now: datetime | None = None,
    future_tolerance: timedelta = timedelta(hours=1),
    write_report: bool = True,
    remember_profile: bool = True,
) -> IngestSummary:
    """Read, validate and store one export. A profile that is not built in is remembered beside the store
    (``profiles/<name>.toml``) so later commands find it by the source name."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    plan = plan_input(path, profile, encoding)
    if plan is not None:  # a large export: read, validated and stored a chunk at a time
        return _ingest_chunks(plan, profile, store, now=now, future_tolerance=future_tolerance, boundary=boundary,
                              write_report=write_report, remember_profile=remember_profile, started=started)
    batch = read_raw(path, profile, encoding=encoding)
    result = validate(batch.frame, profile, now=now, future_tolerance=future_tolerance, boundary=boundary)
    quarantine = pl.concat([result.quarantine, batch.rejected]).sort("source_row")
    with store.writing(f"ingest of {batch.path.name} into {profile.name}"):
        added = store.add(result.incidents, profile.name, file_name=batch.path.name, now=now)
        store.write_quarantine(quarantine, profile.name, batch.fingerprint, batch.path.name)
        summary = IngestSummary(
            source=profile.name,
            file=str(batch.path),
            input_rows=batch.rows,
            stored_new=added.new,
            already_stored=added.unchanged,
            updated=added.updated,
            quarantined=reason_counts(quarantine),
            seconds=time.perf_counter() - started,
            notes=list(batch.notes) + result.notes,
            unmapped=result.unmapped,
        )
        _finish(summary, profile, store, quarantine, batch.path, now, write_report, remember_profile)
    return summary


def _finish(summary: IngestSummary, profile: SourceProfile, store: IncidentStore, quarantine: pl.DataFrame,
            path: Path, now: datetime, write_report: bool, remember_profile: bool) -> None:
    """Check the accounting, explain an empty result, remember the profile and write the ingest report."""
    batch_name = path.name
    if not summary.balanced:
        raise AccountingError(f"row accounting does not add up: {asdict(summary)}")
    if not summary.stored_any:
        summary.hint = nothing_stored_hint(profile, batch_name, summary.input_rows, summary.quarantined,
                                           quarantine, summary.unmapped)
    elif remember_profile and not profile.is_builtin:
        target = store.data_dir / "profiles" / f"{profile.name}.toml"
        atomic_write_text(f"# profile of source {profile.name!r}, remembered from {profile.where} at its last "
                          f"ingest\n" + profile.to_toml(), target)
        summary.profile_path = str(target)
    if write_report:
        report_dir = store.data_dir / "reports" / "ingest"
        report = report_dir / f"{profile.name}-{now.strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}.json"
        summary.report_path = str(report)
        try:
            report_dir.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps({**asdict(summary), "ingested_at": now.isoformat()}, indent=2))
        except OSError as exc:
            raise cannot_write(report, exc) from None


@dataclass
class _Tally:
    """What the chunks of one file add up to, merged in file order."""

    rows: int = 0
    quarantine: list[pl.DataFrame] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)
    extent: list[tuple[float, float, float, float]] = field(default_factory=list)  # lat min/max, lon min/max

    def add(self, part: ChunkOutcome) -> None:
        self.rows += part.rows
        self.quarantine.append(part.quarantine)
        self.truncated += part.truncated
        self.malformed += part.malformed
        for value, n in part.unmapped.items():
            self.unmapped[value] = self.unmapped.get(value, 0) + n
        if part.extent is not None:
            self.extent.append(part.extent)

    def notes(self, plan: InputPlan, area: FixedBulk, quarantine: pl.DataFrame) -> list[str]:
        notes = list(chunk_notes(plan, self.truncated, self.malformed))
        far = int((quarantine["reason"] == "out_of_area").sum()) if area.centre is not None else 0
        note = BulkRule(np.ones(far, dtype=bool), area.centre, area.radius_km).note() if far else None
        if note:
            notes.append(note)
        if self.extent:
            box = np.array(self.extent)
            span = span_note(np.array([box[:, 0].min(), box[:, 1].max()]), np.array([box[:, 2].min(), box[:, 3].max()]))
            if span:
                notes.append(span)
        return notes

    def top_unmapped(self) -> dict[str, int]:
        ranked = sorted(self.unmapped.items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(ranked[:UNMAPPED_SHOWN])


@dataclass
class ChunkOutcome:
    """One chunk validated and spilled: its index keys and everything else the summary needs (small)."""

    rows: int
    keys: pl.DataFrame
    quarantine: pl.DataFrame
    truncated: list[str]
    malformed: list[int]
    unmapped: dict[str, int]
    extent: tuple[float, float, float, float] | None
    ids: pl.Series | None = None  # the kept ids (the local path's running set of ids seen)
    digests: pl.DataFrame | None = None  # (digest, n) of the chunk's rows, for derived ids


@dataclass(frozen=True)
class ChunkJob:
    """Everything a chunk task needs (picklable: it may run on another machine with the same data folder)."""

    plan: InputPlan
    profile: SourceProfile
    now: datetime
    future_tolerance: timedelta
    boundary: object = None
    area: FixedBulk = field(default_factory=lambda: FixedBulk(None, None))

    def validated(self, chunk: Chunk, seen: pl.Series | None = None, usable_only: bool = False,
                  before: pl.DataFrame | None = None) -> tuple[ChunkRows, ValidationResult]:
        raw = read_chunk(self.plan, chunk, self.profile)
        result = validate(raw.frame, self.profile, now=self.now, future_tolerance=self.future_tolerance,
                          boundary=self.boundary, chunk=ChunkContext(self.area, seen, usable_only, before))
        return raw, result

    @property
    def derived_ids(self) -> bool:
        return not self.profile.columns.id

    def usable(self, chunk: Chunk) -> pl.DataFrame:
        """Pass 1 (only for the far-from-bulk rule): the usable points of the chunk."""
        return self.validated(chunk, usable_only=True)[1].incidents

    def digests(self, chunk: Chunk) -> pl.DataFrame:
        """(digest, n) of the chunk's rows, for ids derived from content (the cluster path)."""
        raw = read_chunk(self.plan, chunk, self.profile)
        return stable_digests(raw.frame, self.profile).value_counts(name="n").cast({"n": pl.UInt32})

    def kept_ids(self, chunk: Chunk, before: pl.DataFrame | None = None) -> pl.Series:
        """The ids the chunk keeps before duplicates across chunks are judged (the cluster path)."""
        return self.validated(chunk, before=before)[1].incidents["incident_id"]

    def stage(self, chunk: Chunk, folder: Path, seen: pl.Series | None,
              before: pl.DataFrame | None = None, local: bool = True) -> ChunkOutcome:
        """Validate the chunk (``seen``: its ids kept by an earlier chunk; ``before``: identical rows before it,
        for derived ids) and spill its incidents to ``folder``."""
        raw, result = self.validated(chunk, seen, before=before)
        keys = spill(folder, f"chunk-{chunk.index:06d}", result.incidents)
        inc = result.incidents
        extent = ((inc["latitude"].min(), inc["latitude"].max(), inc["longitude"].min(), inc["longitude"].max())
                  if inc.height else None)
        digests = (stable_digests(raw.frame, self.profile).value_counts(name="n").cast({"n": pl.UInt32})
                   if self.derived_ids and local else None)
        return ChunkOutcome(raw.frame.height + raw.rejected.height, keys,
                            pl.concat([result.quarantine, raw.rejected]), raw.notes, raw.malformed,
                            result.unmapped, extent, inc["incident_id"] if local else None,  # type: ignore[arg-type]
                            digests)


def _running(before: pl.DataFrame | None, counts: pl.DataFrame | None) -> pl.DataFrame | None:
    """Identical-row counts of the chunks so far, plus one more chunk's."""
    if counts is None:
        return before
    if before is None:
        return counts
    return pl.concat([before, counts]).group_by("digest").agg(pl.col("n").sum())


def _area_rule(job: ChunkJob, profile: SourceProfile, boundary, mapped: Callable) -> FixedBulk:
    """The far-from-bulk rule measured on the whole file's usable points (first pass), when the profile uses it."""
    if profile.area.bbox is not None or boundary is not None or profile.area.outliers != "auto":
        return FixedBulk(None, None)
    points = pl.concat(mapped(job.usable, list(job.plan.chunks)))
    return FixedBulk.measure(points["latitude"].to_numpy(), points["longitude"].to_numpy(),
                             profile.area.outlier_factor)


def _ingest_chunks(plan: InputPlan, profile: SourceProfile, store: IncidentStore, *, now: datetime,
                   future_tolerance: timedelta, boundary, write_report: bool, remember_profile: bool,
                   started: float, client=None) -> IngestSummary:
    """Chunk by chunk: measure the area rule (pass 1), validate and spill each chunk to a staging folder by month
    (pass 2), then commit month by month. With a Dask ``client`` the passes are tasks (the spill folder must be
    shared with the workers) and duplicates across chunks are judged from every chunk's kept ids first."""
    job = ChunkJob(plan, profile, now, future_tolerance, boundary)

    def mapped(fn: Callable, items: list, *args) -> list:
        if client is None:
            return [fn(item, *args) for item in items]
        return client.gather(client.map(fn, items, *[[a] * len(items) for a in args], pure=False))

    job = ChunkJob(plan, profile, now, future_tolerance, boundary, _area_rule(job, profile, boundary, mapped))
    tally = _Tally()
    chunks = list(plan.chunks)
    with store.writing(f"ingest of {plan.path.name} into {profile.name}"), store.staging(profile.name) as staged:
        assert staged.folder is not None
        if client is None:
            seen = pl.Series("incident_id", [], dtype=pl.String)
            before: pl.DataFrame | None = None
            outcomes = []
            for chunk in chunks:
                outcome = job.stage(chunk, staged.folder, seen, before)
                seen = pl.concat([seen, outcome.ids]) if outcome.ids is not None else seen
                before = _running(before, outcome.digests)
                outcome.ids = outcome.digests = None
                outcomes.append(outcome)
        else:
            befores: list[pl.DataFrame | None] = [None] * len(chunks)
            if job.derived_ids:
                running = None
                for i, counts in enumerate(mapped(job.digests, chunks)):
                    befores[i] = running
                    running = _running(running, counts)
            kept = client.gather([client.submit(job.kept_ids, c, b, pure=False) for c, b in zip(chunks, befores)])
            first = (pl.concat([pl.DataFrame({"incident_id": ids, "chunk": i}) for i, ids in enumerate(kept)])
                     .group_by("incident_id").agg(pl.col("chunk").min().alias("first")))
            seens = [ids.to_frame().join(first, on="incident_id").filter(pl.col("first") < i)["incident_id"]
                     for i, ids in enumerate(kept)]
            del kept, first  # the client keeps only what the commit needs
            outcomes = client.gather([client.submit(job.stage, c, staged.folder, s, b, False, pure=False)
                                      for c, s, b in zip(chunks, seens, befores)])
        for outcome in outcomes:
            tally.add(outcome)
            staged.add_keys(outcome.keys)
        del outcomes
        added = store.commit(staged, profile.name, plan.path.name, now)
        quarantine = pl.concat(tally.quarantine).sort("source_row")
        store.write_quarantine(quarantine, profile.name, plan.fingerprint, plan.path.name)
        summary = IngestSummary(
            source=profile.name, file=str(plan.path), input_rows=tally.rows, stored_new=added.new,
            already_stored=added.unchanged, updated=added.updated, quarantined=reason_counts(quarantine),
            seconds=time.perf_counter() - started, notes=tally.notes(plan, job.area, quarantine),
            unmapped=tally.top_unmapped(),
        )
        _finish(summary, profile, store, quarantine, plan.path, now, write_report, remember_profile)
    return summary


def ingest_on_cluster(path: str | Path, profile: SourceProfile, store: IncidentStore, client, *,
                      encoding: str | None = None, boundary=None, now: datetime | None = None,
                      future_tolerance: timedelta = timedelta(hours=1), chunk_bytes: int | None = None,
                      chunk_rows: int | None = None, write_report: bool = True) -> IngestSummary:
    """:func:`ingest_file` with each chunk read, validated and spilled by a task on a Dask ``client``; the store
    is committed once, here. Workers must see the input file and the data folder at the same paths (a shared
    folder). A file too small to chunk is ingested here."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    plan = plan_input(path, profile, encoding, chunk_bytes=chunk_bytes, chunk_rows=chunk_rows)
    if plan is None:
        return ingest_file(path, profile, store, encoding=encoding, boundary=boundary, now=now,
                           future_tolerance=future_tolerance, write_report=write_report)
    return _ingest_chunks(plan, profile, store, now=now, future_tolerance=future_tolerance, boundary=boundary,
                          write_report=write_report, remember_profile=True, started=started, client=client)


@dataclass
class CityPanel:
    """A city's count panel with how its incidents were binned."""

    panel: CountPanel
    report: BinningReport


def build_city_panel(
    incidents: pl.DataFrame,
    profile: SourceProfile,
    settings: Settings | None = None,
    *,
    resolution: int | None = None,
    shift_starts: Sequence[str] | None = None,
    boundary=None,
    study_area: StudyArea | None = None,
    name: str | None = None,
    first_shift: int | None = None,
    end_shift: int | None = None,
) -> CityPanel:
    """Stored incidents -> the H3 x shift count panel, the one way the CLI, scripts and notebooks build it.

    The grid comes from ``study_area``, else a ``boundary`` polygon, else the data (concave hull of the occupied
    cells); resolution and shift starts default to the settings'. Incidents are binned to cells once."""
    settings = settings or Settings()
    res = study_area.resolution if study_area is not None else (settings.h3_resolution if resolution is None else resolution)
    incidents = with_cells(incidents, res)
    name = name or profile.name
    if study_area is None:
        study_area = (StudyArea.from_boundary(boundary, res, name) if boundary is not None
                      else StudyArea.from_cells(incidents["h3_cell"].to_numpy(), res, name=name))
    calendar = ShiftCalendar.from_strings(profile.timezone, list(shift_starts or settings.shift_starts))
    panel, report = build_panel(incidents, study_area, calendar, profile.categories.canonical,
                                first_shift=first_shift, end_shift=end_shift)
    return CityPanel(panel, report)


def build_city_panel_by_month(
    store: IncidentStore,
    profile: SourceProfile,
    settings: Settings | None = None,
    *,
    source: str | None = None,
    resolution: int | None = None,
    shift_starts: Sequence[str] | None = None,
    boundary=None,
    study_area: StudyArea | None = None,
    name: str | None = None,
) -> CityPanel:
    """:func:`build_city_panel` over the stored months one at a time, so memory is bounded by a month, not by
    the store: a first pass finds the occupied cells and the shift range, a second bins each month with them
    fixed and sums the counts (a shift that spans two months is summed back together)."""
    settings = settings or Settings()
    source = source or profile.name
    res = study_area.resolution if study_area is not None else (settings.h3_resolution if resolution is None else resolution)
    calendar = ShiftCalendar.from_strings(profile.timezone, list(shift_starts or settings.shift_starts))
    files = store.partition_files(source)
    cells, first, last = [], None, None
    for path in files:
        month = pl.read_parquet(path, columns=["occurred_at", "latitude", "longitude"])
        if month.height == 0:
            continue
        if study_area is None and boundary is None:
            cells.append(np.unique(with_cells(month, res)["h3_cell"].to_numpy()))
        shifts = calendar.shift_ids(month["occurred_at"])
        low, high = int(shifts.min()), int(shifts.max())
        first, last = (low, high) if first is None or last is None else (min(first, low), max(last, high))
    name = name or profile.name
    if study_area is None:
        study_area = (StudyArea.from_boundary(boundary, res, name) if boundary is not None
                      else StudyArea.from_cells(np.unique(np.concatenate(cells)) if cells else np.array([], np.uint64),
                                                res, name=name))
    first_shift = 0 if first is None else first
    end_shift = first_shift if last is None else last + 1
    parts, reports = [], []
    for path in files:
        panel, report = build_panel(with_cells(pl.read_parquet(path), res), study_area, calendar,
                                    profile.categories.canonical, first_shift=first_shift, end_shift=end_shift)
        parts.append(panel.counts)
        reports.append(report)
    counts = (pl.concat([pl.DataFrame(schema=COUNTS_SCHEMA), *parts]).group_by("shift", "cell", "category")
              .agg(pl.col("count").sum()).sort("shift", "cell", "category")
              .cast(COUNTS_SCHEMA))  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys
    panel = CountPanel(study_area, calendar, tuple(profile.categories.canonical), first_shift, end_shift, counts)
    report = BinningReport(*(sum(getattr(r, f) for r in reports) for f in
                             ("incidents", "binned", "outside_study_area", "outside_period")))
    return CityPanel(panel, report)
