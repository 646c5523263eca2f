"""Ingest one file end to end: read, validate, store, quarantine, and account for every row."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from features.ingest import read_raw
from features.profile import SourceProfile
from features.store import IncidentStore
from features.validation import validate


class AccountingError(RuntimeError):
    """Rows were lost between input and output: a bug, never a data problem."""


@dataclass
class IngestSummary:
    source: str
    file: str
    input_rows: int
    stored_new: int
    already_stored: int
    quarantined: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    report_path: str | None = None

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def balanced(self) -> bool:
        return self.input_rows == self.stored_new + self.already_stored + self.quarantined_total

    def lines(self) -> list[str]:
        out = [
            f"source {self.source}: {self.file}",
            f"  input rows       {self.input_rows:>10,}",
            f"  stored (new)     {self.stored_new:>10,}",
            f"  already stored   {self.already_stored:>10,}",
            f"  quarantined      {self.quarantined_total:>10,}",
        ]
        out += [f"    {reason:<16} {n:>10,}" for reason, n in self.quarantined.items()]
        out.append(f"  balanced: {self.balanced} ({self.seconds:.1f} s)")
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
) -> IngestSummary:
    started = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    batch = read_raw(path, profile, encoding=encoding)
    result = validate(batch.frame, profile, now=now, future_tolerance=future_tolerance, boundary=boundary)
    added, existing = store.add(result.incidents, profile.name)
    store.write_quarantine(result.quarantine, profile.name, batch.fingerprint, batch.path.name)
    summary = IngestSummary(
        source=profile.name,
        file=str(batch.path),
        input_rows=batch.rows,
        stored_new=added,
        already_stored=existing,
        quarantined=result.reason_counts(),
        seconds=time.perf_counter() - started,
    )
    if not summary.balanced:
        raise AccountingError(f"row accounting does not add up: {asdict(summary)}")
    if write_report:
        report_dir = store.data_dir / "reports" / "ingest"
        report_dir.mkdir(parents=True, exist_ok=True)
        report = report_dir / f"{profile.name}-{now.strftime('%Y%m%dT%H%M%S%fZ')}.json"
        summary.report_path = str(report)
        report.write_text(json.dumps({**asdict(summary), "ingested_at": now.isoformat()}, indent=2))
    return summary
