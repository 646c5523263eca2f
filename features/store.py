"""The incident store and the quarantine: Parquet files under the data folder.

Layout::

    data/incidents/<source>.parquet              canonical incidents, one row per incident id
    data/quarantine/<source>/<file digest>.parquet  rejected rows of one input file, with reasons
    data/reports/ingest/<source>-<time>.json     one summary per ingest run
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from features.validation import CANONICAL_SCHEMA


def _atomic_write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.write_parquet(tmp, compression="zstd", statistics=True)
    os.replace(tmp, path)


class IncidentStore:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)

    # --- incidents -------------------------------------------------------------------------------
    def path(self, source: str) -> Path:
        return self.data_dir / "incidents" / f"{source}.parquet"

    def sources(self) -> list[str]:
        return sorted(p.stem for p in (self.data_dir / "incidents").glob("*.parquet"))

    def scan(self, source: str) -> pl.LazyFrame:
        path = self.path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no incidents stored for source {source!r} in {self.data_dir}; run `hotspots ingest` first"
            )
        return pl.scan_parquet(path)

    def read(self, source: str, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
        frame = self.scan(source)
        if start is not None:
            frame = frame.filter(pl.col("occurred_at") >= start)
        if end is not None:
            frame = frame.filter(pl.col("occurred_at") < end)
        return frame.collect()

    def count(self, source: str) -> int:
        path = self.path(source)
        return pl.scan_parquet(path).select(pl.len()).collect().item() if path.is_file() else 0

    def add(self, incidents: pl.DataFrame, source: str) -> tuple[int, int]:
        """Store incidents whose id is new; return (added, already_stored). Never rewrites when nothing is new."""
        incidents = incidents.cast(CANONICAL_SCHEMA)
        path = self.path(source)
        if path.is_file():
            existing = pl.read_parquet(path, columns=["incident_id"])
            new = incidents.join(existing, on="incident_id", how="anti")
        else:
            existing, new = None, incidents
        added = new.height
        if added:
            merged = new if existing is None else pl.concat([pl.read_parquet(path), new], how="vertical")
            _atomic_write(merged.sort("occurred_at", maintain_order=True), path)
        return added, incidents.height - added

    def delete_older_than(self, max_age: timedelta, now: datetime | None = None) -> dict[str, int]:
        """Retention: delete incidents that occurred before now - max_age, and quarantine files as old."""
        now = now or datetime.now(timezone.utc)
        cutoff = now - max_age
        deleted: dict[str, int] = {}
        for source in self.sources():
            path = self.path(source)
            frame = pl.read_parquet(path)
            keep = frame.filter(pl.col("occurred_at") >= cutoff)
            deleted[source] = frame.height - keep.height
            if deleted[source]:
                _atomic_write(keep, path)
        for qfile in (self.data_dir / "quarantine").glob("*/*.parquet"):
            if datetime.fromtimestamp(qfile.stat().st_mtime, timezone.utc) < cutoff:
                qfile.unlink()
        return deleted

    # --- quarantine ------------------------------------------------------------------------------
    def quarantine_path(self, source: str, fingerprint: str) -> Path:
        return self.data_dir / "quarantine" / source / f"{fingerprint}.parquet"

    def write_quarantine(self, rows: pl.DataFrame, source: str, fingerprint: str, file_name: str) -> Path:
        """One file per input file (keyed by content digest), so re-ingesting the same file replaces, not appends."""
        path = self.quarantine_path(source, fingerprint)
        if rows.height == 0:
            if path.exists():
                path.unlink()
            return path
        rows = rows.with_columns(pl.lit(file_name).alias("file"))
        if path.is_file() and pl.read_parquet(path).equals(rows):
            return path  # same file, same verdicts: leave it (and its retention clock) alone
        _atomic_write(rows, path)
        return path

    def read_quarantine(self, source: str) -> pl.DataFrame:
        files = sorted((self.data_dir / "quarantine" / source).glob("*.parquet"))
        return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()
