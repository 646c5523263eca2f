"""A large export is read, validated and stored a chunk at a time, with the verdicts, notes, accounting and store a
whole-file read gives: duplicates of one id in different chunks, malformed lines in several chunks, a cut-off last
line, the far-from-bulk rule measured on the whole file, unmapped values counted over every chunk."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import features.ingest as ingest_module
from features.ingest import plan_input
from features.pipeline import ingest_file
from features.profile import load_profile
from features.store import IncidentStore

FIXTURES = Path(__file__).parent / "fixtures"
PROFILE = """name = "chunkville"
timezone = "America/New_York"
encoding = "utf-8"
[columns]
id = "incident_no"
category = "offence"
[time]
kind = "datetime"
column = "occurred"
formats = ["%Y-%m-%d %H:%M:%S"]
[coordinates]
x = "lon"
y = "lat"
crs = "EPSG:4326"
[categories.map]
"THEFT" = "theft"
"ASSAULT" = "assault"
"""


def export(n: int = 3000, seed: int = 7) -> list[str]:
    """CSV lines (header first) with every kind of trouble spread over the file."""
    rng = np.random.default_rng(seed)
    lines = ["incident_no,occurred,offence,Description,lat,lon"]
    for i in range(n):
        ident = "C-10" if i == 2400 else "" if i % 997 == 5 else f"C-{i}"  # C-10 again near the end; blank ids
        offence = ["THEFT", "ASSAULT", "VANDALISM", "ARSON", "THEFT"][i % 5] if i % 13 else "MISCHIEF"
        lat, lon = 40.75 + rng.normal(0, 0.01), -73.99 + rng.normal(0, 0.01)
        if i in (50, 1700):
            lat += 1.5  # far outside the bulk
        month, day = 1 + i % 12, 1 + i % 28
        note = '"an unmatched quote' if i in (300, 1999, 2700) else "plain text"
        lines.append(f"{ident},2021-{month:02d}-{day:02d} {i % 24:02d}:15:00,{offence},{note},{lat:.6f},{lon:.6f}")
    return lines


def ingest_both(tmp_path: Path, name: str, content: bytes, monkeypatch, suffix: str = "csv",
                **chunking) -> tuple[dict, dict]:
    profile_path = tmp_path / "chunkville.toml"
    profile_path.write_text(PROFILE)
    profile = load_profile(profile_path)
    path = tmp_path / f"{name}.{suffix}"
    path.write_bytes(content)
    out = []
    for label, sizes in (("whole", {}), ("chunked", chunking)):
        for key, value in sizes.items():
            monkeypatch.setattr(ingest_module, key, value)
        if label == "chunked":
            plan = plan_input(path, profile)
            assert plan is not None and len(plan.chunks) >= 3
        else:
            assert plan_input(path, profile) is None
        store = IncidentStore(tmp_path / label)
        summary = asdict(ingest_file(path, profile, store, remember_profile=False, write_report=False))
        summary.pop("seconds")
        out.append({"summary": summary, "store": store.read("chunkville").sort("incident_id"),
                    "quarantine": store.read_quarantine("chunkville"), "files": store.partition_files("chunkville")})
        monkeypatch.undo()
    return out[0], out[1]


def test_a_chunked_csv_gives_the_whole_file_verdicts(tmp_path, monkeypatch):
    lines = export()
    body = "\n".join(lines) + "\n"
    body += "C-LAST,2021-03-03 10:00:00,THEFT,plain text,40.751234,-73.9"  # cut off inside the last column
    whole, chunked = ingest_both(tmp_path, "export", body.encode(), monkeypatch, CHUNK_BYTES=40_000)
    s = chunked["summary"]
    assert s == whole["summary"]
    assert s["quarantined"]["duplicate_id"] == 1 and s["quarantined"]["malformed_row"] == 3
    assert s["quarantined"]["truncated_row"] == 1 and s["quarantined"]["out_of_area"] == 2
    assert set(s["unmapped"]) == {"vandalism", "arson", "mischief"} or len(s["unmapped"]) == 3
    assert any("lines 302, 2001, 2702" in n for n in s["notes"]) and any("more than" in n for n in s["notes"])
    assert s["input_rows"] == 3001 and s["stored_new"] + sum(s["quarantined"].values()) == 3001
    assert chunked["store"].equals(whole["store"])
    assert chunked["quarantine"].equals(whole["quarantine"])
    dup = chunked["quarantine"].filter(pl.col("reason") == "duplicate_id")
    assert dup["source_row"].to_list() == [2401]  # the later copy, in a later chunk than the first
    # the same file again: everything already stored, nothing rewritten
    store = IncidentStore(tmp_path / "chunked")
    before = {p: p.stat().st_mtime_ns for p in chunked["files"]}
    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", 40_000)
    again = ingest_file(tmp_path / "export.csv", load_profile(tmp_path / "chunkville.toml"), store,
                        remember_profile=False, write_report=False)
    assert (again.stored_new, again.updated, again.already_stored) == (0, 0, s["stored_new"])
    assert {p: p.stat().st_mtime_ns for p in store.partition_files("chunkville")} == before


def test_a_chunked_parquet_gives_the_whole_file_store(tmp_path, monkeypatch):
    lines = [line for line in export() if '"' not in line]
    frame = pl.read_csv("\n".join(lines).encode(), infer_schema=False)
    buffer = tmp_path / "buffer.parquet"
    frame.write_parquet(buffer, row_group_size=400)
    whole, chunked = ingest_both(tmp_path, "export", buffer.read_bytes(), monkeypatch, suffix="parquet",
                                 CHUNK_ROWS=700)
    assert chunked["summary"] == whole["summary"]
    assert chunked["store"].equals(whole["store"]) and chunked["quarantine"].equals(whole["quarantine"])
    assert chunked["summary"]["quarantined"]["duplicate_id"] == 1


def test_a_bad_byte_in_a_later_chunk_is_the_whole_file_error(tmp_path):
    from features.ingest import IngestError, read_chunk, read_raw

    profile_path = tmp_path / "chunkville.toml"
    profile_path.write_text(PROFILE)
    profile = load_profile(profile_path)
    lines = export()
    lines[2500] = lines[2500].replace("plain", "pl\xffin")
    path = tmp_path / "bad.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    plan = plan_input(path, profile, chunk_bytes=40_000)
    assert plan is not None and len(plan.chunks) >= 3
    with pytest.raises(IngestError) as whole:
        read_raw(path, profile)
    with pytest.raises(IngestError) as chunked:
        for chunk in plan.chunks:
            read_chunk(plan, chunk, profile)
    assert str(chunked.value) == str(whole.value)
    assert "byte 0xff on line 2501" in str(whole.value) and "--encoding latin-1" in str(whole.value)
