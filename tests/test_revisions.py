"""Issue 11, finding 2: a revised row replaces the stored one (counted as `updated`) and the replaced version is
kept in the revision history; a final row cut off mid-row is quarantined as `truncated_row`, never stored."""

from __future__ import annotations

import gzip
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from features.pipeline import ingest_file
from features.profile import load_profile
from features.store import REVISION_SCHEMA, IncidentStore
from features.validation import CANONICAL_SCHEMA

FIXTURES = Path(__file__).parent / "fixtures"
TESTVILLE = FIXTURES / "profiles" / "testville.toml"
NOW = datetime(2024, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=3)
HEADER = "incident_no,occurred,offence,lat,lon,notes\n"
V1 = (
    "R-1,2021-06-01 10:00:00,THEFT,40.750000,-73.990000,SECRET one\n"
    "R-2,2021-06-02 10:00:00,THEFT,40.751000,-73.991000,SECRET two\n"
    "R-3,2021-06-03 10:00:00,ASSAULT,40.752000,-73.992000,SECRET three\n"
    "R-4,2021-06-04 10:00:00,BURGLARY,40.753000,-73.993000,SECRET four\n"
)
V2 = (  # R-1 as before; R-2 reclassified; R-3 relocated; R-4 left out of this export; R-5 new
    "R-1,2021-06-01 10:00:00,THEFT,40.750000,-73.990000,SECRET one\n"
    "R-2,2021-06-02 10:00:00,BURGLARY,40.751000,-73.991000,SECRET two (reclassified)\n"
    "R-3,2021-06-03 10:00:00,ASSAULT,40.762000,-73.982000,SECRET three (corrected location)\n"
    "R-5,2021-06-05 10:00:00,THEFT,40.754000,-73.994000,SECRET five\n"
)


@pytest.fixture(scope="module")
def testville():
    return load_profile(TESTVILLE)


def write(path: Path, body: str) -> Path:
    path.write_text(HEADER + body)
    return path


def by_id(frame: pl.DataFrame) -> dict[str, dict]:
    return {row["incident_id"]: row for row in frame.iter_rows(named=True)}


def test_revised_rows_are_updated_and_their_history_kept(testville, tmp_path):
    store = IncidentStore(tmp_path / "data")
    first = ingest_file(write(tmp_path / "v1.csv", V1), testville, store, now=NOW)
    assert (first.stored_new, first.updated, first.already_stored) == (4, 0, 0)
    before = by_id(store.read("testville"))

    second = ingest_file(write(tmp_path / "v2.csv", V2), testville, store, now=LATER)
    assert (second.input_rows, second.stored_new, second.updated, second.already_stored) == (4, 1, 2, 1)
    assert second.quarantined == {} and second.balanced
    assert "  updated                   2" in second.lines()

    now = by_id(store.read("testville"))
    assert sorted(now) == ["R-1", "R-2", "R-3", "R-4", "R-5"]  # R-4 is not deleted by an export that lacks it
    assert now["R-1"] == before["R-1"] and now["R-4"] == before["R-4"]
    assert now["R-2"]["category"] == "burglary"
    assert (now["R-3"]["latitude"], now["R-3"]["longitude"]) == (40.762, -73.982)
    assert store.read("testville")["incident_id"].n_unique() == 5

    history = store.read_revisions("testville").sort("incident_id")
    assert dict(history.schema) == REVISION_SCHEMA
    assert list(history.columns) == [*CANONICAL_SCHEMA, "replaced_at", "replaced_by_file", "changed"]
    assert history["incident_id"].to_list() == ["R-2", "R-3"]
    old = by_id(history)
    for incident_id in ("R-2", "R-3"):  # the replaced versions, field for field
        assert {c: old[incident_id][c] for c in CANONICAL_SCHEMA} == before[incident_id]
    assert old["R-2"]["changed"] == "category" and old["R-3"]["changed"] == "latitude,longitude"
    assert set(history["replaced_by_file"]) == {"v2.csv"}
    assert set(history["replaced_at"]) == {LATER}
    # data protection: only canonical fields, nothing from the export's other columns
    for column in history.columns:
        assert not history[column].cast(pl.String).str.contains("SECRET").any()

    # the same export again: nothing to update, the store and the history are not rewritten
    stored = [p for p in store.path("testville").rglob("*") if p.is_file()]
    files = {p: p.stat().st_mtime_ns for p in (*stored, store.revisions_path("testville"))}
    time.sleep(0.02)
    third = ingest_file(tmp_path / "v2.csv", testville, store, now=LATER)
    assert (third.stored_new, third.updated, third.already_stored) == (0, 0, 4)
    assert {p: p.stat().st_mtime_ns for p in files} == files

    # a later revision of R-2 adds a second history row; the history keeps every version
    write(tmp_path / "v3.csv", V2.replace("BURGLARY", "ROBBERY").replace("ROBBERY,40.751000", "ASSAULT,40.751000"))
    fourth = ingest_file(tmp_path / "v3.csv", testville, store, now=LATER + timedelta(days=1))
    assert (fourth.updated, fourth.already_stored) == (1, 3)
    history = store.read_revisions("testville").filter(pl.col("incident_id") == "R-2").sort("replaced_at")
    assert history["category"].to_list() == ["theft", "burglary"]
    assert store.read("testville").filter(pl.col("incident_id") == "R-2")["category"].item() == "assault"


def test_retention_deletes_replaced_versions_too(testville, tmp_path):
    store = IncidentStore(tmp_path / "data")
    ingest_file(write(tmp_path / "v1.csv", V1), testville, store, now=NOW)
    ingest_file(write(tmp_path / "v2.csv", V2), testville, store, now=LATER)
    cutoff = datetime(2021, 6, 3, tzinfo=UTC)  # R-2 (2 June) is older, R-3 (3 June 14:00Z) is not
    deleted = store.delete_older_than(LATER - cutoff, now=LATER)
    assert deleted == {"testville": 2}
    assert store.read_revisions("testville")["incident_id"].to_list() == ["R-3"]


# --- a file cut off mid-row ----------------------------------------------------------------------------------


def test_truncated_final_row_is_quarantined_not_stored(testville, tmp_path):
    store = IncidentStore(tmp_path / "data")
    complete = write(tmp_path / "export.csv", V1)
    cut = tmp_path / "export_cut.csv"
    text = complete.read_text()
    cut.write_text(text[: text.rindex("40.753000") + 5])  # the last row ends inside its latitude: "40.75"
    assert not cut.read_text().endswith("\n")

    summary = ingest_file(cut, testville, store, now=NOW)
    assert (summary.input_rows, summary.stored_new, summary.quarantined) == (4, 3, {"truncated_row": 1})
    assert summary.balanced
    assert any("line 5" in note and "truncated_row" in note and "no line end" in note for note in summary.notes)
    assert sorted(store.read("testville")["incident_id"]) == ["R-1", "R-2", "R-3"]
    quarantine = store.read_quarantine("testville")
    assert quarantine.select("source_row", "reason", "raw_id", "raw_category", "raw_y", "raw_x").rows() == [
        (4, "truncated_row", "R-4", "BURGLARY", "40.75", None)
    ]

    # the complete export stores the row with its real values
    again = ingest_file(complete, testville, store, now=NOW)
    assert (again.stored_new, again.already_stored, again.quarantined) == (1, 3, {})
    r4 = store.read("testville").filter(pl.col("incident_id") == "R-4").row(0, named=True)
    assert (r4["latitude"], r4["longitude"]) == (40.753, -73.993)


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ('R-9,2021-06-09 10:00:00,"THEFT', "truncated_row"),  # an open quote
        ("R-9,2021-06-09 10:00:00,THEFT,40.759000,-73.999000,SECRET", None),  # complete, only the line end is missing
    ],
)
def test_last_line_without_line_end(testville, tmp_path, tail, reason):
    store = IncidentStore(tmp_path / "data")
    path = tmp_path / "tail.csv"
    path.write_text(HEADER + V1 + tail)
    summary = ingest_file(path, testville, store, now=NOW)
    assert summary.input_rows == 5 and summary.balanced
    if reason:
        assert summary.quarantined == {reason: 1} and summary.stored_new == 4
    else:
        assert summary.quarantined == {} and summary.stored_new == 5


@pytest.mark.shared_data
def test_chicago_export_cut_inside_the_longitude(tmp_path, chicago_raw_csv):
    """The issue's case on the real portal export: the last row ended inside the longitude and was stored 2.2 km
    off; re-ingesting the complete export said `already stored`. Now the cut row is quarantined, and a row
    stored wrong before (as the old code did) is corrected by the complete export, the wrong version kept."""
    with gzip.open(chicago_raw_csv, "rt", newline="") as fh:
        lines = [next(fh) for _ in range(301)]
    assert lines[0].rstrip("\r\n").endswith(",Latitude,Longitude")  # the cut falls in the last column
    last = lines[-1]
    lon = pl.read_csv(("".join([lines[0], last])).encode(), infer_schema=False)["Longitude"].item()
    assert lon.startswith("-87.") and len(lon) > 8
    short = lon[:5]  # e.g. "-87.6" for "-87.627080475": 2 km off, still inside the city
    cut_at = last.index(lon) + len(short)
    complete = tmp_path / "chicago_complete.csv"
    complete.write_text("".join(lines))
    cut = tmp_path / "chicago_cut.csv"
    cut.write_text("".join(lines[:-1]) + last[:cut_at])

    profile = load_profile("chicago")
    store = IncidentStore(tmp_path / "data")
    s1 = ingest_file(cut, profile, store)
    assert s1.quarantined.get("truncated_row") == 1 and s1.balanced
    assert any(f"{short!r} is shorter than that column in every other row" in note for note in s1.notes), s1.notes
    case = store.read_quarantine("chicago").filter(pl.col("reason") == "truncated_row")
    assert case.select("source_row", "raw_x").rows() == [(300, short)]
    assert case["raw_id"].item() not in set(store.read("chicago")["incident_id"])

    # what the old reader stored: the same row complete in shape but with the cut longitude
    wrong = tmp_path / "chicago_wrong.csv"
    wrong.write_text("".join(lines[:-1]) + last.replace(lon, short, 1))
    s2 = ingest_file(wrong, profile, store)
    assert s2.stored_new == 1 and s2.balanced
    s3 = ingest_file(complete, profile, store)
    assert (s3.stored_new, s3.updated) == (0, 1) and s3.balanced
    fixed = store.read("chicago").filter(pl.col("incident_id") == case["raw_id"].item())
    assert fixed["longitude"].item() == pytest.approx(float(lon))
    history = store.read_revisions("chicago")
    assert history.select("incident_id", "longitude", "changed", "replaced_by_file").rows() == [
        (case["raw_id"].item(), float(short), "longitude", "chicago_complete.csv")
    ]


def test_written_files_keep_the_usual_permissions(tmp_path):
    """Temporary files are created 0600; the store must end up as readable as any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    store = IncidentStore(tmp_path / "data")
    ingest_file(FIXTURES / "malformed" / "all_reasons.csv", load_profile(TESTVILLE), store)
    stored = [p for p in store.path("testville").rglob("*") if p.is_file()]  # partitions, id index, manifest
    assert len(stored) >= 3
    written = [*stored, *(tmp_path / "data" / "quarantine").rglob("*.parquet")]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
