"""The incident store, its revision history and the quarantine: Parquet files under the data folder.

Layout::

    data/incidents/<source>.parquet              canonical incidents, one row per incident id
    data/revisions/<source>.parquet              versions replaced by a revised row, with when and by which file
    data/quarantine/<source>/<file digest>.parquet  rejected rows of one input file, with reasons
    data/reports/ingest/<source>-<time>.json     one summary per ingest run

Every write holds the data folder's writer lock and replaces files atomically (features/storelock.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from features.storelock import StoreError, atomic_write_parquet, write_lock
from features.validation import CANONICAL_SCHEMA

CONTENT_COLUMNS = ("occurred_at", "timezone", "category", "latitude", "longitude", "source")
REVISION_SCHEMA: dict[str, pl.DataType] = {
    **CANONICAL_SCHEMA,
    "replaced_at": pl.Datetime("us", "UTC"),
    "replaced_by_file": pl.String(),
    "changed": pl.String(),  # the canonical fields that differ in the newer version, comma-separated
}


def _atomic_write(frame: pl.DataFrame, path: Path) -> None:
    atomic_write_parquet(frame, path)


@dataclass(frozen=True)
class Added:
    """What one batch did to the store: new ids, stored ids whose content changed, stored ids unchanged."""

    new: int
    updated: int
    unchanged: int


def unreadable(path: Path, what: str, exc: Exception) -> StoreError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"{what} {path} is unreadable ({first}): run `hotspots verify`; restore the file from a "
                      f"backup, or move it aside and ingest the source's exports again.")


def read_parquet_or_explain(path: Path, what: str) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise unreadable(path, what, exc) from None


class IncidentStore:
    def __init__(self, data_dir: str | Path, *, wait: bool = True, on_wait: Callable[[str], None] | None = None):
        """``wait``/``on_wait``: what a write does when another process holds the folder's writer lock."""
        self.data_dir = Path(data_dir)
        self.wait = wait
        self.on_wait = on_wait

    @contextmanager
    def writing(self, what: str = "a write") -> Iterator[None]:
        """Hold the data folder's writer lock (re-entrant): read-modify-write cycles inside never interleave
        with another process's."""
        with write_lock(self.data_dir, wait=self.wait, on_wait=self.on_wait, what=what):
            yield

    # --- incidents -------------------------------------------------------------------------------
    def path(self, source: str) -> Path:
        return self.data_dir / "incidents" / f"{source}.parquet"

    def sources(self) -> list[str]:
        return sorted(p.stem for p in (self.data_dir / "incidents").glob("*.parquet") if not p.name.startswith("."))

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
        try:
            return frame.collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise unreadable(self.path(source), "the incident store", exc) from None

    def count(self, source: str) -> int:
        path = self.path(source)
        return pl.scan_parquet(path).select(pl.len()).collect().item() if path.is_file() else 0

    def add(self, incidents: pl.DataFrame, source: str, file_name: str = "", now: datetime | None = None) -> Added:
        """Store incidents whose id is new; replace stored ones whose content changed (the replaced version goes
        to the revision history); leave the rest. Never rewrites when nothing is new or changed."""
        incidents = incidents.cast(CANONICAL_SCHEMA)  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys
        path = self.path(source)
        with self.writing(f"ingest of {file_name or 'a batch'} into {source}"):
            existing = read_parquet_or_explain(path, "the incident store") if path.is_file() else None
            if existing is None or existing.height == 0:
                if incidents.height:
                    _atomic_write(incidents.sort("occurred_at", maintain_order=True), path)
                return Added(new=incidents.height, updated=0, unchanged=0)
            paired = incidents.join(existing, on="incident_id", how="left", suffix="_old", maintain_order="left")
            known = pl.col("source_old").is_not_null()
            differs = [pl.col(c).ne_missing(pl.col(f"{c}_old")) for c in CONTENT_COLUMNS]
            paired = paired.with_columns(
                known.alias("_known"), (known & pl.any_horizontal(differs)).alias("_changed"),
                pl.concat_str([pl.when(d).then(pl.lit(c)) for c, d in zip(CONTENT_COLUMNS, differs)],
                              separator=",", ignore_nulls=True).alias("_fields"),
            )
            new = paired.filter(~pl.col("_known")).select(list(CANONICAL_SCHEMA))
            changed = paired.filter(pl.col("_changed"))
            result = Added(new=new.height, updated=changed.height, unchanged=incidents.height - new.height - changed.height)
            if new.height or changed.height:
                if changed.height:
                    replaced = changed.select(
                        *[pl.col(f"{c}_old" if c != "incident_id" else c).alias(c) for c in CANONICAL_SCHEMA],
                        pl.lit(now or datetime.now(UTC)).dt.convert_time_zone("UTC").alias("replaced_at"),
                        pl.lit(file_name).alias("replaced_by_file"),
                        pl.col("_fields").alias("changed"),
                    ).cast(REVISION_SCHEMA)  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys
                    # history first: a crash between the two writes leaves a spare history row, never a lost version
                    self._append_revisions(replaced, source)
                kept = existing.join(changed.select("incident_id"), on="incident_id", how="anti")
                merged = pl.concat([kept, changed.select(list(CANONICAL_SCHEMA)), new], how="vertical")
                _atomic_write(merged.sort("occurred_at", maintain_order=True), path)
            return result

    # --- revisions -------------------------------------------------------------------------------
    def revisions_path(self, source: str) -> Path:
        return self.data_dir / "revisions" / f"{source}.parquet"

    def read_revisions(self, source: str) -> pl.DataFrame:
        """Every replaced version of the source's incidents (canonical fields only: no personal data)."""
        path = self.revisions_path(source)
        return read_parquet_or_explain(path, "the revision history") if path.is_file() else pl.DataFrame(schema=REVISION_SCHEMA)

    def _append_revisions(self, rows: pl.DataFrame, source: str) -> None:
        path = self.revisions_path(source)
        old = self.read_revisions(source)
        _atomic_write(pl.concat([old, rows], how="vertical"), path)

    # --- retention -------------------------------------------------------------------------------
    def delete_older_than(self, max_age: timedelta, now: datetime | None = None) -> dict[str, int]:
        """Retention: delete incidents (and their replaced versions) that occurred before now - max_age, and
        quarantine files as old."""
        now = now or datetime.now(UTC)
        cutoff = now - max_age
        deleted: dict[str, int] = {}
        if not self.data_dir.exists():
            return deleted  # nothing stored yet (a file where the folder should be is refused by writing())
        with self.writing("retention"):
            for source in self.sources():
                path = self.path(source)
                frame = read_parquet_or_explain(path, "the incident store")
                keep = frame.filter(pl.col("occurred_at") >= cutoff)
                deleted[source] = frame.height - keep.height
                if deleted[source]:
                    _atomic_write(keep, path)
            for rpath in (self.data_dir / "revisions").glob("*.parquet"):
                history = read_parquet_or_explain(rpath, "the revision history")
                keep = history.filter(pl.col("occurred_at") >= cutoff)
                if keep.height < history.height:
                    _atomic_write(keep, rpath)
            for qfile in (self.data_dir / "quarantine").glob("*/*.parquet"):
                if datetime.fromtimestamp(qfile.stat().st_mtime, UTC) < cutoff:
                    qfile.unlink()
        return deleted

    # --- quarantine ------------------------------------------------------------------------------
    def quarantine_path(self, source: str, fingerprint: str) -> Path:
        return self.data_dir / "quarantine" / source / f"{fingerprint}.parquet"

    def write_quarantine(self, rows: pl.DataFrame, source: str, fingerprint: str, file_name: str) -> Path:
        """One file per input file (keyed by content digest), so re-ingesting the same file replaces, not appends."""
        path = self.quarantine_path(source, fingerprint)
        with self.writing(f"quarantine of {file_name} for {source}"):
            if rows.height == 0:
                if path.exists():
                    path.unlink()
                return path
            rows = rows.with_columns(pl.lit(file_name).alias("file"))
            if path.is_file():
                try:
                    if pl.read_parquet(path).equals(rows):
                        return path  # same file, same verdicts: leave it (and its retention clock) alone
                except (pl.exceptions.PolarsError, OSError):
                    pass  # damaged: rewritten below
            _atomic_write(rows, path)
            return path

    def read_quarantine(self, source: str) -> pl.DataFrame:
        files = sorted(p for p in (self.data_dir / "quarantine" / source).glob("*.parquet") if not p.name.startswith("."))
        return pl.concat([read_parquet_or_explain(f, "the quarantine file") for f in files]) if files else pl.DataFrame()
