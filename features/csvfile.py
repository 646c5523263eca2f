"""CSV bytes -> the profile's columns, for exports as real portals and spreadsheets write them.

Handled here so that no input reaches the user as a traceback: byte-order marks and UTF-16, CR-only line ends,
another delimiter than the profile's, a duplicated required header, lines with an unmatched quote (quarantined
as ``malformed_row``, the rest of the file is kept) and a final line cut off mid-row (``truncated_row``).

One physical line is one row, as polars reads it: a quoted value may not span lines (polars cannot read those
either). Row ``n`` is line ``n + 1`` of the file (line 1 is the header).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import polars as pl

from features.profile import SourceProfile
from features.validation import QUARANTINE_SCHEMA

QUOTE = ord('"')
OTHER_DELIMITERS = (";", "\t", "|", ",")
MAX_NOTES = 5


class CsvError(ValueError):
    """The file cannot be read at all; the message names the problem and the fix."""


@dataclass
class CsvRows:
    """The profile's columns (strings) with each row's 1-based ``source_row``, plus rows refused while reading."""

    frame: pl.DataFrame
    rejected: pl.DataFrame  # QUARANTINE_SCHEMA
    notes: list[str] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)  # rows with an unmatched quote (in ``rejected`` too)


# --- bytes -> UTF-8 ---------------------------------------------------------------------------------------


def _canonical(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise CsvError(f"unknown encoding {encoding!r}: use a Python codec name such as utf-8, latin-1, cp1252 or "
                       f"utf-16") from None


def decode(data: bytes, encoding: str, name: str) -> bytes:
    """UTF-8 bytes without a byte-order mark. A UTF-16 BOM is decoded whatever encoding was asked for (it is
    unambiguous); NUL bytes without one mean UTF-16 too, and the message names the variant to pass."""
    wanted = _canonical(encoding)
    if data[:4] in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):
        wanted = "utf-32"
    elif data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) and not wanted.startswith("utf-16"):
        wanted = "utf-16"
    if not wanted.startswith(("utf-16", "utf-32")) and b"\x00" in data[:65536]:
        head = data[:65536]
        variant = "utf-16-le" if head[1::2].count(0) >= head[0::2].count(0) else "utf-16-be"
        raise CsvError(f"{name} contains NUL bytes, so it is not {encoding} text: it looks like UTF-16 without a "
                       f"byte-order mark; rerun with --encoding {variant} (or set encoding in the profile).")
    if wanted == "utf-8":
        if data.startswith(codecs.BOM_UTF8):
            data = data[3:]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise CsvError(
                f"{name} is not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); it is probably "
                f"latin-1 or cp1252: rerun with --encoding latin-1 (or set encoding in the profile)."
            ) from None
        return data
    try:
        text = data.decode(wanted)
    except UnicodeDecodeError as exc:
        raise CsvError(f"{name} cannot be decoded as {wanted} ({exc.reason} at byte {exc.start}): rerun with the "
                       f"file's real encoding, e.g. --encoding latin-1 or --encoding utf-8.") from None
    return text.removeprefix("\ufeff").encode("utf-8")


def normalise_line_ends(data: bytes) -> bytes:
    """Old Mac exports end lines with CR alone: make them LF (CRLF is already read as LF)."""
    if b"\r" in data and b"\n" not in data:
        return data.replace(b"\r", b"\n")
    return data


# --- header ----------------------------------------------------------------------------------------------


def _shown(delimiter: str) -> str:
    return {"\t": "tabs", ",": "commas", ";": "semicolons", "|": "pipes"}.get(delimiter, repr(delimiter))


def parse_header(line: str, profile: SourceProfile, name: str) -> list[str]:
    delimiter = profile.delimiter
    try:
        header = next(csv.reader([line], delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise CsvError(f"{name}: the header (line 1) is not well-formed CSV ({exc}): fix line 1 so it names "
                       f"the columns, separated by {_shown(delimiter)}.") from None
    required = profile.required_columns()
    twice = [c for c in required if header.count(c) > 1]
    if twice:
        where = [str(i + 1) for i, h in enumerate(header) if h == twice[0]]
        raise CsvError(f"{name} names the required column {twice[0]!r} {len(where)} times in its header (columns "
                       f"{' and '.join(where)}): rename or remove the extra one(s) so it is clear which holds the data.")
    if not all(c in header for c in required) and delimiter not in line:
        for other in OTHER_DELIMITERS:
            if other != delimiter and other in line and all(c in line.split(other) for c in required):
                raise CsvError(f"{name} is separated by {_shown(other)}, not by {_shown(delimiter)} as profile "
                               f"{profile.name!r} says: "
                               + profile.how_to_change(f"set delimiter = {json.dumps(other)}") + ".")
    return header


# --- rows ------------------------------------------------------------------------------------------------


def _line_quote_counts(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Line-end offsets and the number of quote characters on each line (vectorised over the bytes)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    n_lines = ends.size + (0 if data.endswith(b"\n") else 1)
    quotes = np.flatnonzero(buf == QUOTE)
    counts = np.bincount(np.searchsorted(ends, quotes), minlength=n_lines)[:n_lines]
    return ends, counts


def _fields(line: bytes, delimiter: str) -> list[str] | None:
    """A line's fields, or None when a quote is left open."""
    try:
        return next(csv.reader([line.rstrip(b"\r").decode("utf-8")], delimiter=delimiter, strict=True), [])
    except csv.Error:
        return None


def _lenient(line: bytes, delimiter: str) -> list[str]:
    """Whatever fields can be split off a broken line (an open quote runs to the line's end)."""
    return next(csv.reader([line.rstrip(b"\r").decode("utf-8")], delimiter=delimiter), [])


def _rejected_row(row: int, reason: str, fields: list[str], header: list[str], profile: SourceProfile) -> dict:
    """The quarantine row of a refused line: whatever of the profile's columns could be split off it."""
    values = dict(zip(header, fields))

    def raw(column: str | None) -> str | None:
        value = values.get(column) if column else None
        return value.strip() or None if value is not None else None

    times = [v for v in (raw(c) for c in profile.time.columns()) if v]
    return {"source_row": row, "reason": reason, "raw_id": raw(profile.columns.id), "raw_time": " ".join(times) or None,
            "raw_category": raw(profile.columns.category), "raw_x": raw(profile.coordinates.x),
            "raw_y": raw(profile.coordinates.y)}


def read_rows(data: bytes, profile: SourceProfile, name: str, *, row_offset: int = 0,
              prior: tuple[int, int | None] = (0, None), note_malformed: bool = True) -> CsvRows:
    """Decoded, LF-ended CSV bytes -> the profile's columns. Fast path: polars on the whole file. Lines with an
    unmatched quote would make polars fail or silently merge lines, so when there are any, every line is split
    by Python's csv module instead, and only the bad lines are quarantined.

    A chunk of a larger file is its header line plus whole lines: ``row_offset`` rows came before it,
    ``prior`` is (how many, shortest) last-column lengths of those rows (for the cut-off check of the last line),
    and with ``note_malformed=False`` the caller writes one note for every chunk's malformed lines."""
    first_end = data.find(b"\n")
    header_line = (data if first_end < 0 else data[:first_end]).rstrip(b"\r").decode("utf-8")
    header = parse_header(header_line, profile, name)
    required = profile.required_columns()
    missing = [c for c in required if c not in header]
    if missing:
        raise MissingColumns(missing, header)
    ends, quotes = _line_quote_counts(data)
    if quotes.size and quotes[0] % 2:
        raise CsvError(f"{name}: the header (line 1) has an unmatched quote (\"): fix line 1.")
    rejected: list[dict] = []
    notes: list[str] = []
    last = quotes.size - 1
    if last >= 1 and not data.endswith(b"\n"):
        line = data[ends[-1] + 1:]
        fields = None if quotes[last] % 2 else _fields(line, profile.delimiter)
        shape = _cut_shape(fields, header, data[: ends[-1] + 1], profile.delimiter, prior)
        if shape:
            notes.append(f"the last line (line {row_offset + last + 1}) ends mid-row with no line end ({shape}): "
                         f"the file was cut off; quarantined as truncated_row, ingest the complete export to store it")
            rejected.append(_rejected_row(row_offset + last, "truncated_row", _lenient(line, profile.delimiter),
                                          header, profile))
            data, quotes = data[: ends[-1] + 1], quotes[:last]
    odd = np.flatnonzero(quotes % 2 == 1)
    frame = None
    malformed: list[int] = []
    if odd.size == 0:
        try:
            frame = _polars(data, required, profile.delimiter).with_row_index("source_row", offset=1 + row_offset)
        except pl.exceptions.PolarsError:
            frame = None  # e.g. a quote inside an unquoted value: the line-by-line reader below copes
    if frame is None:
        frame, bad = _python_rows(data, header, required, profile.delimiter)
        frame = frame.with_columns(pl.col("source_row") + row_offset)
        for row, fields in bad:
            rejected.append(_rejected_row(row_offset + row, "malformed_row", fields, header, profile))
        malformed = [row_offset + row for row, _ in bad]
        if bad and note_malformed:
            notes.append(malformed_note(malformed, name))
    rejected_frame = (pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA, orient="row") if rejected
                      else pl.DataFrame(schema=QUARANTINE_SCHEMA))
    return CsvRows(frame=frame, rejected=rejected_frame, notes=notes, malformed=malformed)


def malformed_note(rows: list[int], name: str) -> str:
    """The note for lines with an unmatched quote (``rows``: their row numbers, line = row + 1)."""
    shown = ", ".join(str(row + 1) for row in rows[:MAX_NOTES]) + (
        f" and {len(rows) - MAX_NOTES} more" if len(rows) > MAX_NOTES else "")
    return (f"line{'s' if len(rows) > 1 else ''} {shown} of {name} ha{'ve' if len(rows) > 1 else 's'} an "
            f"unmatched quote (\"): quarantined as malformed_row; the other rows were read")


def last_column_lengths(data: bytes, delimiter: str) -> tuple[int, int | None]:
    """(how many, shortest) non-empty last-column values among the data lines of LF-ended CSV bytes with a header."""
    others = pl.Series(data.split(b"\n")[1:], dtype=pl.Binary).cast(pl.String, strict=False).drop_nulls()
    lengths = others.str.strip_chars_end("\r").str.split(delimiter).list.last().str.len_chars()
    lengths = lengths.filter(lengths > 0)
    return lengths.len(), cast("int | None", lengths.min())


def _merge_lengths(a: tuple[int, int | None], b: tuple[int, int | None]) -> tuple[int, int | None]:
    mins = [m for m in (a[1], b[1]) if m is not None]
    return a[0] + b[0], min(mins) if mins else None


MIN_ROWS_FOR_LENGTH_CHECK = 20


def _cut_shape(fields: list[str] | None, header: list[str], before: bytes, delimiter: str,
               prior: tuple[int, int | None] = (0, None)) -> str | None:
    """Why a last line without a line end looks cut off, or None. Shape: an open quote or too few fields. When
    the cut falls inside the last column (``-87.6`` for ``-87.627080475``) the field count is complete, so
    the last value is also compared with that column in every other row: shorter than all of them (with at
    least 20 rows to compare) means cut."""
    if fields is None:
        return "an open quote"
    if len(fields) < len(header):
        return f"{len(fields)} of {len(header)} fields"
    count, shortest = _merge_lengths(last_column_lengths(before, delimiter), prior)  # None when there are none
    if count >= MIN_ROWS_FOR_LENGTH_CHECK and shortest is not None and len(fields[-1]) < shortest:
        return (f"its last value {fields[-1]!r} is shorter than that column in every other row, "
                f"{shortest} characters or more")
    return None


class MissingColumns(CsvError):
    def __init__(self, missing: list[str], present: list[str]):
        super().__init__(f"missing columns {missing}")
        self.missing, self.present = missing, present


def _polars(data: bytes, required: list[str], delimiter: str) -> pl.DataFrame:
    return pl.read_csv(io.BytesIO(data), columns=required, infer_schema=False, truncate_ragged_lines=True,
                       separator=delimiter, quote_char='"')


def _python_rows(data: bytes, header: list[str], required: list[str],
                 delimiter: str) -> tuple[pl.DataFrame, list[tuple[int, list[str]]]]:
    """Every data line split on its own (so an open quote cannot swallow the next lines); lines that cannot be
    split are returned as (row, the fields a lenient split finds)."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    index = [header.index(c) for c in required]
    columns: list[list[str | None]] = [[] for _ in required]
    rows: list[int] = []
    bad: list[tuple[int, list[str]]] = []
    for row in range(1, len(lines)):
        fields = _fields(lines[row], delimiter)
        if fields is None:
            bad.append((row, _lenient(lines[row], delimiter)))
            continue
        rows.append(row)
        for out, i in zip(columns, index):
            value = fields[i] if i < len(fields) else None
            out.append(value if value else None)
    frame = pl.DataFrame({c: pl.Series(c, v, dtype=pl.String) for c, v in zip(required, columns)})
    return frame.with_columns(pl.Series("source_row", rows, dtype=pl.UInt32)).select("source_row", *required), bad
