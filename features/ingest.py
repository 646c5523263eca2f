"""Read a city's export into raw columns, ready for validation.

Only the columns the profile names are read: addresses, blocks and free-text descriptions are dropped at
the door, so they never reach the store, the quarantine or a log.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.profile import SourceProfile

PARQUET_SUFFIXES = {".parquet", ".pq"}


class IngestError(ValueError):
    """The input file cannot be read as the profile describes; the message says what to fix."""


@dataclass(frozen=True)
class RawBatch:
    """The profile's columns of one input file, as read, plus each row's 1-based position in the file."""

    frame: pl.DataFrame
    path: Path
    fingerprint: str

    @property
    def rows(self) -> int:
        return self.frame.height


def file_fingerprint(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _missing_columns_error(missing: list[str], present: list[str], profile: SourceProfile, path: Path) -> IngestError:
    shown = ", ".join(present[:30]) + (" ..." if len(present) > 30 else "")
    return IngestError(
        f"{path.name} lacks required column(s) {', '.join(repr(m) for m in missing)} for profile "
        f"{profile.name!r}; the file has: {shown}. Fix the column names in {profile.where} "
        f"(or pass --profile with a profile that matches this file)."
    )


def _decode(data: bytes, encoding: str, path: Path) -> bytes:
    """Return UTF-8 bytes, or explain which encoding to use."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if encoding.lower().replace("_", "-") in {"utf-8", "utf8"}:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise IngestError(
                f"{path.name} is not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); it is probably "
                f"latin-1 or cp1252: rerun with --encoding latin-1 (or set encoding in the profile)."
            ) from None
        return data
    try:
        return data.decode(encoding).encode("utf-8")
    except (LookupError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path.name} cannot be decoded as {encoding}: {exc}") from None


def _read_csv(path: Path, profile: SourceProfile, encoding: str) -> pl.DataFrame:
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IngestError(f"{path.name} is not a readable gzip file: {exc}") from None
    if not data.strip():
        raise IngestError(f"{path.name} is empty: expected a header row naming the columns, then incident rows.")
    data = _decode(data, encoding, path)
    header_line = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
    header = next(csv.reader([header_line]))
    required = profile.required_columns()
    missing = [c for c in required if c not in header]
    if missing:
        raise _missing_columns_error(missing, header, profile, path)
    try:
        return pl.read_csv(
            io.BytesIO(data),
            columns=required,
            infer_schema=False,
            truncate_ragged_lines=True,
        )
    except pl.exceptions.PolarsError as exc:
        raise IngestError(f"{path.name} is not well-formed CSV: {exc}") from None


def _read_parquet(path: Path, profile: SourceProfile) -> pl.DataFrame:
    try:
        schema = pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise IngestError(f"{path.name} is not a readable Parquet file: {exc}") from None
    required = profile.required_columns()
    missing = [c for c in required if c not in schema]
    if missing:
        raise _missing_columns_error(missing, list(schema), profile, path)
    return pl.read_parquet(path, columns=required)


def read_raw(path: str | Path, profile: SourceProfile, encoding: str | None = None) -> RawBatch:
    """Read the profile's columns of a CSV (optionally gzipped) or Parquet export."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"no such input file: {path}")
    if path.stat().st_size == 0:
        raise IngestError(f"{path.name} is empty (0 bytes): expected a header row naming the columns, then incident rows.")
    suffixes = {s.lower() for s in path.suffixes}
    if suffixes & PARQUET_SUFFIXES:
        frame = _read_parquet(path, profile)
    else:
        frame = _read_csv(path, profile, encoding or profile.encoding)
    frame = frame.with_row_index("source_row", offset=1)
    return RawBatch(frame=frame, path=path, fingerprint=file_fingerprint(path))
