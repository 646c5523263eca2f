"""The data pipeline's two entry points: ingest one file end to end (read, validate, store, quarantine, and
account for every row: input = stored new + updated + already stored + quarantined), and build a city's count
panel from its stored incidents."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.hints import nothing_stored_hint
from features.ingest import read_raw
from features.panel import BinningReport, CountPanel, build_panel, with_cells
from features.profile import SourceProfile
from features.settings import Settings
from features.store import IncidentStore
from features.storelock import atomic_write_text, cannot_write
from features.validation import reason_counts, validate


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
        if not summary.balanced:
            raise AccountingError(f"row accounting does not add up: {asdict(summary)}")
        if not summary.stored_any:
            summary.hint = nothing_stored_hint(profile, batch.path.name, summary.input_rows, summary.quarantined,
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
    return summary


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
