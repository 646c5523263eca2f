"""Read a city's export into raw columns, ready for validation.

Only the columns the profile names are read: addresses, blocks and free-text descriptions are dropped at
the door, so they never reach the store, the quarantine or a log.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.csvfile import CsvError, CsvRows, MissingColumns, decode, normalise_line_ends, read_rows
from features.profile import SourceProfile
from features.validation import QUARANTINE_SCHEMA

PARQUET_SUFFIXES = {".parquet", ".pq"}


class IngestError(ValueError):
    """The input file cannot be read as the profile describes; the message says what to fix."""


@dataclass(frozen=True)
class RawBatch:
    """The profile's columns of one input file, as read, plus each row's 1-based position in the file, and the
    rows refused while reading (``rejected``, quarantine rows: a cut-off last line, unmatched quotes)."""

    frame: pl.DataFrame
    path: Path
    fingerprint: str
    rejected: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=QUARANTINE_SCHEMA))
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return self.frame.height + self.rejected.height


def file_fingerprint(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _missing_columns_error(missing: list[str], present: list[str], profile: SourceProfile, path: Path) -> IngestError:
    shown = ", ".join(present[:30]) + (" ..." if len(present) > 30 else "")
    fix = profile.how_to_change("fix the column names")
    return IngestError(
        f"{path.name} lacks required column(s) {', '.join(repr(m) for m in missing)} for profile "
        f"{profile.name!r}; the file has: {shown}. To fix, {fix} "
        f"(or pass --profile with a profile that matches this file)."
    )


def _read_csv(path: Path, profile: SourceProfile, encoding: str) -> CsvRows:
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IngestError(f"{path.name} is not a readable gzip file: {exc}") from None
    if not data.strip():
        raise IngestError(f"{path.name} is empty: expected a header row naming the columns, then incident rows.")
    try:
        data = normalise_line_ends(decode(data, encoding, path.name))
        if not data.strip():
            raise IngestError(f"{path.name} is empty: expected a header row naming the columns, then incident rows.")
        return read_rows(data, profile, path.name)
    except MissingColumns as exc:
        raise _missing_columns_error(exc.missing, exc.present, profile, path) from None
    except CsvError as exc:
        raise IngestError(str(exc)) from None


def _read_parquet(path: Path, profile: SourceProfile) -> CsvRows:
    try:
        schema = pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise IngestError(f"{path.name} is not a readable Parquet file: {exc}") from None
    required = profile.required_columns()
    missing = [c for c in required if c not in schema]
    if missing:
        raise _missing_columns_error(missing, list(schema), profile, path)
    try:
        frame = pl.read_parquet(path, columns=required).with_row_index("source_row", offset=1)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise IngestError(f"{path.name} is a damaged Parquet file ({exc}): export it again.") from None
    return CsvRows(frame=frame, rejected=pl.DataFrame(schema=QUARANTINE_SCHEMA))


def read_raw(path: str | Path, profile: SourceProfile, encoding: str | None = None) -> RawBatch:
    """Read the profile's columns of a CSV (optionally gzipped) or Parquet export."""
    path = Path(path)
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))[:3]
        except OSError:
            inside = []
        hint = f" (it holds {', '.join(inside)}{' ...' if len(inside) == 3 else ''})" if inside else ""
        raise IngestError(f"{path} is a folder, not a file{hint}: give the export file itself (CSV, CSV.gz or Parquet).")
    if not path.is_file():
        raise IngestError(f"no such input file: {path}: check the path (CSV, CSV.gz or Parquet).")
    if path.stat().st_size == 0:
        raise IngestError(f"{path.name} is empty (0 bytes): expected a header row naming the columns, then incident rows.")
    suffixes = {s.lower() for s in path.suffixes}
    try:
        if suffixes & PARQUET_SUFFIXES:
            rows = _read_parquet(path, profile)
        else:
            rows = _read_csv(path, profile, encoding or profile.encoding)
    except PermissionError:
        raise IngestError(f"{path} cannot be read (permission denied): make it readable (chmod a+r) or copy it "
                          f"somewhere readable.") from None
    return RawBatch(frame=rows.frame, path=path, fingerprint=file_fingerprint(path), rejected=rows.rejected,
                    notes=tuple(rows.notes))
