"""The incident store, its revision history and the quarantine: Parquet files under the data folder.

Layout::

    data/incidents/<source>/_manifest.json        the committed version: month -> partition file, id index, rows
    data/incidents/<source>/month=YYYY-MM/part-<generation>-<token>.parquet   one month (UTC) of incidents
    data/incidents/<source>/_ids-<generation>-<token>.parquet   id index: incident_id, month, content hash
    data/revisions/<source>.parquet              versions replaced by a revised row, with when and by which file
    data/quarantine/<source>/<file digest>.parquet  rejected rows of one input file, with reasons
    data/reports/ingest/<source>-<time>.json     one summary per ingest run

Every write holds the data folder's writer lock (features/storelock.py). A write touches only the months its
batch touches: it writes *new* partition files beside the old ones, then swaps them in by atomically replacing
the manifest, then deletes the files the manifest no longer names. Readers follow the manifest, so a reader or a
crash sees the old store or the new one, never a mix; files no manifest names are leftovers of an interrupted write
(``hotspots verify`` reports them, the next write deletes them). The id index keeps a stored id unique across the
whole source, so a revised row that moves to another month replaces its old version. A store written before this
layout (``incidents/<source>.parquet``) is read as it is and converted at its next write.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from features.storelock import StoreError, atomic_write_bytes, atomic_write_parquet, write_lock
from features.validation import CANONICAL_SCHEMA

CONTENT_COLUMNS = ("occurred_at", "timezone", "category", "latitude", "longitude", "source")
REVISION_SCHEMA: dict[str, pl.DataType] = {
    **CANONICAL_SCHEMA,
    "replaced_at": pl.Datetime("us", "UTC"),
    "replaced_by_file": pl.String(),
    "changed": pl.String(),  # the canonical fields that differ in the newer version, comma-separated
}
INDEX_SCHEMA: dict[str, pl.DataType] = {"incident_id": pl.String(), "month": pl.String(), "hash": pl.UInt64()}
MANIFEST = "_manifest.json"
STAGING_PREFIX = "_staging-"
SORT_KEYS = ["occurred_at", "incident_id"]  # within a month: the same bytes whatever order the rows came in


def _atomic_write(frame: pl.DataFrame, path: Path) -> None:
    atomic_write_parquet(frame, path)


def month_key(column: str = "occurred_at") -> pl.Expr:
    """The partition of a row: the month of its UTC time, ``YYYY-MM``."""
    return pl.col(column).dt.convert_time_zone("UTC").dt.strftime("%Y-%m")


def content_hash() -> pl.Expr:
    """A row's content fingerprint for the id index. Only a shortcut: a differing hash is confirmed against the
    stored row before anything counts as revised (polars does not promise the same hash across versions)."""
    return pl.struct(list(CONTENT_COLUMNS)).hash(seed=13)


def index_keys(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select("incident_id", month_key().alias("month"), content_hash().alias("hash")).cast(
        INDEX_SCHEMA)  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys


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


def _token(generation: int) -> str:
    return f"{generation:06d}-{secrets.token_hex(4)}"


@dataclass
class Manifest:
    """One committed version of a source's partitions."""

    generation: int = 0
    months: dict[str, dict[str, Any]] = field(default_factory=dict)  # month -> {"file": relative path, "rows": n}
    ids: str | None = None  # relative path of the id index

    @property
    def rows(self) -> int:
        return sum(int(m["rows"]) for m in self.months.values())

    def files(self) -> list[str]:
        return [self.months[m]["file"] for m in sorted(self.months)] + ([self.ids] if self.ids else [])

    def to_json(self) -> str:
        return json.dumps({"version": 1, "generation": self.generation, "rows": self.rows,
                           "months": {m: self.months[m] for m in sorted(self.months)}, "ids": self.ids}, indent=1)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
            return cls(int(data["generation"]), {str(k): dict(v) for k, v in data["months"].items()}, data["ids"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise unreadable(path, "the store manifest", exc) from None


class Staged:
    """Validated rows of one batch waiting to be committed: their index keys, and their rows month by month.
    In memory (``from_frame``) or spilled to Parquet files under a staging folder (``add_chunk``), so a large
    input is committed one month at a time."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._frames: dict[str, pl.DataFrame] = {}
        self._keys: list[pl.DataFrame] = []
        self._chunks = 0

    @classmethod
    def from_frame(cls, rows: pl.DataFrame) -> Staged:
        staged = cls()
        rows = rows.cast(CANONICAL_SCHEMA)  # type: ignore[arg-type]  # polars#14468
        staged._keys.append(index_keys(rows))
        if rows.height:
            for (month,), part in rows.with_columns(month_key().alias("_m")).partition_by(
                    "_m", as_dict=True, maintain_order=True).items():
                staged._frames[str(month)] = part.drop("_m")
        return staged

    def add_chunk(self, rows: pl.DataFrame) -> None:
        """Spill one chunk's rows to the staging folder, a file per month."""
        assert self.folder is not None, "add_chunk needs a staging folder"
        self._chunks += 1
        self._keys.append(spill(self.folder, f"chunk-{self._chunks:06d}", rows))

    def add_keys(self, keys: pl.DataFrame) -> None:
        """Index keys of rows that another process spilled into this staging folder (the Dask path)."""
        self._keys.append(keys.cast(INDEX_SCHEMA))  # type: ignore[arg-type]  # polars#14468

    def keys(self) -> pl.DataFrame:
        if len(self._keys) > 1:
            self._keys = [pl.concat(self._keys, rechunk=True)]  # one copy, not the parts and their concatenation
        return self._keys[0] if self._keys else pl.DataFrame(schema=INDEX_SCHEMA)

    def months(self) -> list[str]:
        if self.folder is None:
            return sorted(self._frames)
        return sorted(p.name.split("=", 1)[1] for p in self.folder.glob("month=*") if p.is_dir())

    def rows(self, month: str) -> pl.DataFrame:
        if self.folder is None:
            return self._frames.get(month, pl.DataFrame(schema=CANONICAL_SCHEMA))
        files = sorted((self.folder / f"month={month}").glob("*.parquet"))
        return pl.read_parquet(files) if files else pl.DataFrame(schema=CANONICAL_SCHEMA)

    def discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


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

    # --- incidents: where ------------------------------------------------------------------------
    def path(self, source: str) -> Path:
        """The source's partition folder (``incidents/<source>``)."""
        return self.data_dir / "incidents" / source

    def legacy_path(self, source: str) -> Path:
        """Where a store written before the partitioned layout keeps its single file."""
        return self.data_dir / "incidents" / f"{source}.parquet"

    def manifest_path(self, source: str) -> Path:
        return self.path(source) / MANIFEST

    def manifest(self, source: str) -> Manifest | None:
        path = self.manifest_path(source)
        return Manifest.load(path) if path.is_file() else None

    def sources(self) -> list[str]:
        root = self.data_dir / "incidents"
        partitioned = {p.parent.name for p in root.glob(f"*/{MANIFEST}")}
        legacy = {p.stem for p in root.glob("*.parquet") if not p.name.startswith(".")}
        return sorted(partitioned | legacy)

    def partition_files(self, source: str, start: datetime | None = None, end: datetime | None = None) -> list[Path]:
        """The committed partition files of the source (those that may hold rows in [start, end)), or the
        single file of an unconverted store."""
        manifest = self.manifest(source)
        if manifest is None:
            legacy = self.legacy_path(source)
            if not legacy.is_file():
                raise FileNotFoundError(
                    f"no incidents stored for source {source!r} in {self.data_dir}; run `hotspots ingest` first")
            return [legacy]
        low, high = (_month_of(start) if start else None), (_month_of(end) if end else None)
        return [self.path(source) / manifest.months[m]["file"] for m in sorted(manifest.months)
                if (low is None or m >= low) and (high is None or m <= high)]

    # --- incidents: reading ------------------------------------------------------------------------
    def scan(self, source: str) -> pl.LazyFrame:
        """A lazy scan of every month (hive-partitioned: ``month`` is a partition column for pruning, dropped from
        the result); a filter on ``occurred_at`` skips row groups by their statistics."""
        return self._scan(self.partition_files(source))

    @staticmethod
    def _scan(files: list[Path]) -> pl.LazyFrame:
        if not files:
            return pl.LazyFrame(schema=CANONICAL_SCHEMA)
        if files[0].parent.name.startswith("month="):
            return pl.scan_parquet(files, hive_partitioning=True).drop("month")
        return pl.scan_parquet(files)

    def read(self, source: str, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
        for attempt in range(3):
            files = self.partition_files(source, start, end)  # only the months [start, end) can touch
            frame = self._scan(files)
            if start is not None:
                frame = frame.filter(pl.col("occurred_at") >= start)
            if end is not None:
                frame = frame.filter(pl.col("occurred_at") < end)
            try:
                return frame.collect()
            except (pl.exceptions.PolarsError, OSError) as exc:
                if attempt < 2 and not all(f.exists() for f in files):
                    continue  # a writer committed a newer version and removed these files meanwhile: read that
                raise unreadable(_culprit(files) or self.path(source), "the incident store", exc) from None
        raise AssertionError("unreachable")

    def count(self, source: str) -> int:
        manifest = self.manifest(source)
        if manifest is not None:
            return manifest.rows
        legacy = self.legacy_path(source)
        return pl.scan_parquet(legacy).select(pl.len()).collect().item() if legacy.is_file() else 0

    def _read_month(self, source: str, manifest: Manifest, month: str) -> pl.DataFrame:
        if month not in manifest.months:
            return pl.DataFrame(schema=CANONICAL_SCHEMA)
        return read_parquet_or_explain(self.path(source) / manifest.months[month]["file"], "the incident store")

    def _read_index(self, source: str, manifest: Manifest) -> pl.DataFrame:
        if manifest.ids is None:
            return pl.DataFrame(schema=INDEX_SCHEMA)
        return read_parquet_or_explain(self.path(source) / manifest.ids, "the id index")

    # --- incidents: writing ------------------------------------------------------------------------
    def add(self, incidents: pl.DataFrame, source: str, file_name: str = "", now: datetime | None = None) -> Added:
        """Store incidents whose id is new; replace stored ones whose content changed (the replaced version goes
        to the revision history); leave the rest. Never rewrites when nothing is new or changed."""
        with self.writing(f"ingest of {file_name or 'a batch'} into {source}"):
            return self.commit(Staged.from_frame(incidents), source, file_name, now)

    @contextmanager
    def staging(self, source: str) -> Iterator[Staged]:
        """A staging folder for a batch too large for memory (removed afterwards, committed or not). The caller
        holds the writer lock."""
        for stale in self.path(source).glob(f"{STAGING_PREFIX}*"):  # the writer lock is held: a dead writer's
            shutil.rmtree(stale, ignore_errors=True)
        folder = self.path(source) / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
        folder.mkdir(parents=True, exist_ok=True)
        staged = Staged(folder)
        try:
            yield staged
        finally:
            staged.discard()

    def commit(self, staged: Staged, source: str, file_name: str = "", now: datetime | None = None) -> Added:
        """Apply a staged batch (ids unique within it) month by month, then swap the months in with one manifest
        replace. The caller holds the writer lock."""
        with self.writing(f"ingest of {file_name or 'a batch'} into {source}"):
            manifest = self._prepared(source)
            index = self._read_index(source, manifest)
            keys = staged.keys()
            paired = keys.join(index, on="incident_id", how="left", suffix="_old", maintain_order="left")
            new_keys = paired.filter(pl.col("month_old").is_null()).select(list(INDEX_SCHEMA))
            suspects = paired.filter(pl.col("month_old").is_not_null() & (pl.col("hash") != pl.col("hash_old")))
            changed, revised = self._confirm(source, manifest, staged, suspects)
            result = Added(new=new_keys.height, updated=changed.height,
                           unchanged=keys.height - new_keys.height - changed.height)
            if not (new_keys.height or changed.height):
                return result
            if revised.height:
                # history first: a crash before the manifest swap leaves a spare history row, never a lost version
                self._append_revisions(revised.with_columns(
                    pl.lit(now or datetime.now(UTC)).dt.convert_time_zone("UTC").alias("replaced_at"),
                    pl.lit(file_name).alias("replaced_by_file")).select(list(REVISION_SCHEMA)).cast(
                    REVISION_SCHEMA), source)  # type: ignore[arg-type]  # polars#14468
            incoming = pl.concat([new_keys, changed.select(list(INDEX_SCHEMA))])
            leaving = changed.select("incident_id", pl.col("month_old").alias("month"))
            arriving = {str(m): part.select("incident_id") for (m,), part in
                        incoming.partition_by("month", as_dict=True).items()}
            departing = {str(m): part.select("incident_id") for (m,), part in
                         leaving.partition_by("month", as_dict=True).items()}
            empty = pl.DataFrame(schema={"incident_id": pl.String()})
            replaced = {}
            for month in sorted(set(arriving) | set(departing)):
                old = self._read_month(source, manifest, month)
                out_ids, in_ids = departing.get(month, empty), arriving.get(month, empty)
                rows = staged.rows(month).join(in_ids, on="incident_id", how="semi") if in_ids.height else None
                kept = old.join(out_ids, on="incident_id", how="anti") if out_ids.height else old
                replaced[month] = pl.concat([kept, rows]) if rows is not None else kept
            index = pl.concat([index.join(changed.select("incident_id"), on="incident_id", how="anti"), incoming])
            self._swap(source, manifest, replaced, index)
            return result

    def _confirm(self, source: str, manifest: Manifest, staged: Staged,
                 suspects: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Of the stored ids whose hash differs, those whose content really changed (index keys plus month_old),
        and the replaced versions with the fields that changed."""
        if suspects.height == 0:
            return suspects, pl.DataFrame(schema={**CANONICAL_SCHEMA, "changed": pl.String()})
        ids = suspects.select("incident_id")
        newer = pl.concat([staged.rows(m).join(ids, on="incident_id", how="semi")
                           for m in suspects["month"].unique().sort().to_list()])
        older = pl.concat([self._read_month(source, manifest, m).join(ids, on="incident_id", how="semi")
                           for m in suspects["month_old"].unique().sort().to_list()])
        paired = newer.join(older, on="incident_id", how="inner", suffix="_old")
        differs = [pl.col(c).ne_missing(pl.col(f"{c}_old")) for c in CONTENT_COLUMNS]
        paired = paired.with_columns(
            pl.any_horizontal(differs).alias("_changed"),
            pl.concat_str([pl.when(d).then(pl.lit(c)) for c, d in zip(CONTENT_COLUMNS, differs)],
                          separator=",", ignore_nulls=True).alias("changed"),
        ).filter(pl.col("_changed"))
        revised = paired.select(*[pl.col(f"{c}_old" if c != "incident_id" else c).alias(c) for c in CANONICAL_SCHEMA],
                                "changed")
        changed = suspects.join(paired.select("incident_id"), on="incident_id", how="semi")
        return changed, revised

    def _prepared(self, source: str) -> Manifest:
        """The committed manifest, after removing leftovers of interrupted writes and converting a single-file
        store (its rows are kept, month by month, and the old file is removed once the manifest names them)."""
        self._remove_leftovers(source)
        manifest = self.manifest(source)
        if manifest is not None:
            legacy = self.legacy_path(source)
            if legacy.is_file():
                legacy.unlink()  # converted already; the crash came before its removal
            for name in manifest.files():  # a damaged month stops every write: never built upon, never dropped
                try:
                    pl.read_parquet_schema(self.path(source) / name)
                except (pl.exceptions.PolarsError, OSError) as exc:
                    raise unreadable(self.path(source) / name, "the incident store", exc) from None
            return manifest
        manifest = Manifest()
        legacy = self.legacy_path(source)
        if legacy.is_file():
            rows = read_parquet_or_explain(legacy, "the incident store")
            staged = Staged.from_frame(rows)
            replaced = {m: staged.rows(m) for m in staged.months()}
            manifest = self._swap(source, manifest, replaced, staged.keys())
            legacy.unlink()
        return manifest

    def _swap(self, source: str, manifest: Manifest, replaced: dict[str, pl.DataFrame],
              index: pl.DataFrame | None) -> Manifest:
        """Write the replaced months and the index as new files, replace the manifest (the commit), then delete
        the files it no longer names."""
        folder = self.path(source)
        generation = manifest.generation + 1
        months = dict(manifest.months)
        for month, rows in replaced.items():
            if rows.height == 0:
                months.pop(month, None)
                continue
            relative = f"month={month}/part-{_token(generation)}.parquet"
            _atomic_write(rows.sort(SORT_KEYS), folder / relative)
            months[month] = {"file": relative, "rows": rows.height}
        ids = manifest.ids
        if index is not None:
            ids = f"_ids-{_token(generation)}.parquet" if index.height else None
            if ids:
                _atomic_write(index, folder / ids)
        committed = Manifest(generation, months, ids)
        atomic_write_bytes(committed.to_json().encode(), folder / MANIFEST)
        self._remove_leftovers(source, committed)
        return committed

    def _remove_leftovers(self, source: str, manifest: Manifest | None = None) -> None:
        for path in leftovers(self.path(source), manifest or self.manifest(source), staging=False):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for empty in self.path(source).glob("month=*"):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()

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
        quarantine files as old. Whole months before the cutoff are dropped unread."""
        now = now or datetime.now(UTC)
        cutoff = now - max_age
        deleted: dict[str, int] = {}
        if not self.data_dir.exists():
            return deleted  # nothing stored yet (a file where the folder should be is refused by writing())
        with self.writing("retention"):
            for source in self.sources():
                manifest = self._prepared(source)
                first = _month_of(cutoff)
                replaced: dict[str, pl.DataFrame] = {m: pl.DataFrame(schema=CANONICAL_SCHEMA)
                                                     for m in manifest.months if m < first}
                deleted[source] = sum(int(manifest.months[m]["rows"]) for m in replaced)
                if first in manifest.months:
                    frame = self._read_month(source, manifest, first)
                    keep = frame.filter(pl.col("occurred_at") >= cutoff)
                    if keep.height < frame.height:
                        replaced[first] = keep
                        deleted[source] += frame.height - keep.height
                if deleted[source]:
                    kept_months = {m for m in manifest.months if m not in replaced or replaced[m].height}
                    index = self._read_index(source, manifest).filter(pl.col("month").is_in(sorted(kept_months)))
                    if first in replaced:
                        index = index.filter((pl.col("month") != first)
                                             | pl.col("incident_id").is_in(replaced[first]["incident_id"].implode()))
                    self._swap(source, manifest, replaced, index)
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


def spill(folder: Path, name: str, rows: pl.DataFrame) -> pl.DataFrame:
    """Write rows into a staging folder as ``month=M/<name>.parquet`` files (one per month; a task on another
    machine can do this on a shared folder) and return their index keys."""
    rows = rows.cast(CANONICAL_SCHEMA)  # type: ignore[arg-type]  # polars#14468
    if rows.height:
        for (month,), part in rows.with_columns(month_key().alias("_m")).partition_by(
                "_m", as_dict=True, maintain_order=True).items():
            target = folder / f"month={month}" / f"{name}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            part.drop("_m").write_parquet(target, compression="lz4", statistics=False)
    return index_keys(rows)


def leftovers(folder: Path, manifest: Manifest | None, staging: bool = True) -> list[Path]:
    """Files in a source's partition folder that the committed manifest does not name (the new files of a write
    that crashed before its manifest swap, or old files a crash kept from being deleted) and, with ``staging``,
    staging folders (a writer's batch in progress, or a dead writer's)."""
    if not folder.is_dir():
        return []
    named = set(manifest.files()) if manifest else set()
    found: Iterable[Path] = [*folder.glob("month=*/*.parquet"), *folder.glob("_ids-*.parquet"),
                             *(folder.glob(f"{STAGING_PREFIX}*") if staging else [])]
    return sorted(p for p in found if str(p.relative_to(folder)) not in named)


def _month_of(moment: datetime) -> str:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m")


def _culprit(files: list[Path]) -> Path | None:
    """The first file that does not read (for the error message), if any."""
    for path in files:
        try:
            pl.read_parquet_schema(path)
            pl.scan_parquet(path).select(pl.len()).collect()
        except (pl.exceptions.PolarsError, OSError):
            return path
    return None
