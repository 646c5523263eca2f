"""Read a city's export into raw columns, ready for validation.

Only the columns the profile names are read: addresses, blocks and free-text descriptions are dropped at
the door, so they never reach the store, the quarantine or a log.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from features.csvfile import (
    CsvError,
    CsvRows,
    MissingColumns,
    decode,
    last_column_lengths,
    malformed_note,
    normalise_line_ends,
    read_rows,
)
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


# --- chunks: a large export read a bounded piece at a time ------------------------------------------------

CHUNK_BYTES = 64 << 20  # a CSV chunk: whole lines, about this many bytes
CHUNK_ROWS = 1_000_000  # a Parquet chunk


@dataclass(frozen=True)
class Chunk:
    """One piece of an input file: a byte range of whole lines (CSV) or a row range (Parquet), with how many data
    rows came before it (its rows are numbered from ``rows_before + 1``)."""

    index: int
    start: int
    end: int
    rows_before: int
    final: bool


@dataclass(frozen=True)
class InputPlan:
    """How to read one input file in chunks; every chunk can be read on its own (by another process)."""

    path: Path
    fingerprint: str
    kind: Literal["csv", "parquet"]
    chunks: tuple[Chunk, ...]
    rows: int  # data rows (lines after the header) in the whole file
    header: bytes = b""
    prior: tuple[int, int | None] = (0, None)  # last-column lengths of every row before the final chunk


@dataclass(frozen=True)
class ChunkRows:
    frame: pl.DataFrame
    rejected: pl.DataFrame
    malformed: list[int]
    notes: list[str]


def plan_input(path: str | Path, profile: SourceProfile, encoding: str | None = None, *,
               chunk_bytes: int | None = None, chunk_rows: int | None = None) -> InputPlan | None:
    """Chunks of a large plain UTF-8 CSV or Parquet export, or None when the file is read whole as before
    (small files, gzip, other encodings, CR-only line ends: their checks need the whole file)."""
    path = Path(path)
    chunk_bytes, chunk_rows = chunk_bytes or CHUNK_BYTES, chunk_rows or CHUNK_ROWS
    if not path.is_file() or path.stat().st_size == 0:
        return None
    suffixes = {s.lower() for s in path.suffixes}
    try:
        if suffixes & PARQUET_SUFFIXES:
            return _plan_parquet(path, profile, chunk_rows)
        if ".gz" in suffixes or codecs.lookup(encoding or profile.encoding).name != "utf-8":
            return None
        return _plan_csv(path, profile, chunk_bytes)
    except (LookupError, OSError, pl.exceptions.PolarsError):
        return None  # read whole: read_raw names the problem


def _plan_parquet(path: Path, profile: SourceProfile, chunk_rows: int) -> InputPlan | None:
    schema = pl.read_parquet_schema(path)
    if any(c not in schema for c in profile.required_columns()):
        return None
    rows = int(pl.scan_parquet(path).select(pl.len()).collect().item())
    if rows <= chunk_rows:
        return None
    starts = list(range(0, rows, chunk_rows))
    chunks = tuple(Chunk(i, s, min(s + chunk_rows, rows), s, s + chunk_rows >= rows) for i, s in enumerate(starts))
    return InputPlan(path, file_fingerprint(path), "parquet", chunks, rows)


def _plan_csv(path: Path, profile: SourceProfile, chunk_bytes: int) -> InputPlan | None:
    size = path.stat().st_size
    if size <= chunk_bytes:
        return None
    with path.open("rb") as fh:
        head = fh.read(min(size, 1 << 16))
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in head or b"\n" not in head:
            return None  # UTF-16, NUL bytes or CR-only line ends: read whole, where they are explained
        header = head[: head.find(b"\n")].removeprefix(codecs.BOM_UTF8)
        fh.seek(size - 1)
        ends_with_newline = fh.read(1) == b"\n"
        chunks: list[Chunk] = []
        start, rows = 0, 0
        prior: tuple[int, int | None] = (0, None)
        while start < size:
            fh.seek(start)
            block = fh.read(chunk_bytes)
            cut = block.rfind(b"\n") + 1
            while cut == 0 and start + len(block) < size:  # one line longer than a chunk: take more
                block += fh.read(chunk_bytes)
                cut = block.rfind(b"\n") + 1
            end = start + (cut if cut and start + len(block) < size else len(block))
            lines = block[: end - start].count(b"\n") - (1 if start == 0 else 0)
            final = end >= size
            if not final and not ends_with_newline:  # the cut-off check of the last line looks at every row
                data = block[: end - start] if start == 0 else header + b"\n" + block[: end - start]
                count, shortest = last_column_lengths(data, profile.delimiter)
                mins = [m for m in (prior[1], shortest) if m is not None]
                prior = (prior[0] + count, min(mins) if mins else None)
            chunks.append(Chunk(len(chunks), start, end, rows, final))
            rows += lines
            start = end
    if len(chunks) == 1:
        return None
    return InputPlan(path, file_fingerprint(path), "csv", tuple(chunks), rows, header, prior)


def read_chunk(plan: InputPlan, chunk: Chunk, profile: SourceProfile) -> ChunkRows:
    """The profile's columns of one chunk, rows numbered as in the whole file."""
    if plan.kind == "parquet":
        try:
            frame = (pl.scan_parquet(plan.path).select(profile.required_columns())
                     .slice(chunk.start, chunk.end - chunk.start).collect()
                     .with_row_index("source_row", offset=chunk.rows_before + 1))
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise IngestError(f"{plan.path.name} is a damaged Parquet file ({exc}): export it again.") from None
        return ChunkRows(frame, pl.DataFrame(schema=QUARANTINE_SCHEMA), [], [])
    with plan.path.open("rb") as fh:
        fh.seek(chunk.start)
        block = fh.read(chunk.end - chunk.start)
    try:
        if chunk.index == 0:
            data = decode(block, "utf-8", plan.path.name)
        else:
            _utf8_or_explain(block, plan, chunk)
            data = plan.header + b"\n" + block
        rows: CsvRows = read_rows(data, profile, plan.path.name, row_offset=chunk.rows_before,
                                  prior=plan.prior if chunk.final else (0, None), note_malformed=False)
    except MissingColumns as exc:
        raise _missing_columns_error(exc.missing, exc.present, profile, plan.path) from None
    except CsvError as exc:
        raise IngestError(str(exc)) from None
    return ChunkRows(rows.frame, rows.rejected, rows.malformed, rows.notes)


def _utf8_or_explain(block: bytes, plan: InputPlan, chunk: Chunk) -> None:
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = chunk.rows_before + 2 + block[: exc.start].count(b"\n")
        raise CsvError(
            f"{plan.path.name} is not valid UTF-8 (byte 0x{block[exc.start]:02x} on line {line}); it is probably "
            f"latin-1 or cp1252: rerun with --encoding latin-1 (or set encoding in the profile)."
        ) from None


def chunk_notes(plan: InputPlan, truncated: list[str], malformed: list[int]) -> tuple[str, ...]:
    """The file's reading notes, in the order a whole-file read gives them."""
    return tuple(truncated) + ((malformed_note(sorted(malformed), plan.path.name),) if malformed else ())
