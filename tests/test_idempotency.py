"""Re-ingesting is harmless, newer exports add only what is new, retention removes exactly what is old, and the
`hotspots` CLI wraps all of it with a summary (exit 0) or an "error: ..." line (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from conftest import toronto_first_ingest
from typer.testing import CliRunner

from features.pipeline import ingest_file
from features.profile import ColumnsSpec, load_profile
from features.store import IncidentStore
from serving.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
MALFORMED = FIXTURES / "malformed"
TESTVILLE = FIXTURES / "profiles" / "testville.toml"
NOW = datetime(2024, 1, 1, tzinfo=UTC)
UTC = UTC

# stored rows of all_reasons.csv (see tests/fixtures/malformed/README.md)
ALL_REASONS_STORED = {"T-001", "T-002", "T-016", "T-018"}
ALL_REASONS_QUARANTINED = {
    "missing_id": 2, "missing_time": 1, "unparseable_time": 1, "future_time": 2, "before_coverage": 1,
    "missing_coordinates": 3, "invalid_coordinates": 1, "sentinel_point": 1, "out_of_area": 1,  # row 10, (0, 0), is a placeholder
    "excluded_category": 1, "unknown_category": 1, "duplicate_id": 1,
}

# four more rows a newer export would add: three valid, one quarantined
NEW_ROWS = (
    "T-101,2021-07-01 09:00:00,1XX SECRETBLOCK ST,THEFT,SECRETTEXT new,40.741000,-73.981000\n"
    "T-102,2021-07-02 09:00:00,2XX SECRETBLOCK ST,ASSAULT,SECRETTEXT new,40.742000,-73.982000\n"
    "T-103,2021-07-03 09:00:00,3XX SECRETBLOCK ST,BURGLARY,SECRETTEXT new,40.743000,-73.983000\n"
    "T-104,2021-07-04 09:00:00,4XX SECRETBLOCK ST,JAYWALKING,SECRETTEXT new,40.744000,-73.984000\n"
)


@pytest.fixture(scope="module")
def testville():
    return load_profile(TESTVILLE)


def snapshot(root: Path, sub: str) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, mtime_ns, inode) of every file under root/sub."""
    out = {}
    for p in sorted((root / sub).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_ino)
    return out


def hashes(snap: dict[str, tuple[str, int, int]]) -> dict[str, str]:
    return {k: v[0] for k, v in snap.items()}


def superset_export(tmp_path: Path) -> Path:
    """A newer portal export: every row of all_reasons.csv, then new rows."""
    old = (MALFORMED / "all_reasons.csv").read_text()
    path = tmp_path / "export_newer.csv"
    path.write_text(old + NEW_ROWS)
    return path


def flat(text: str) -> str:
    """CLI output without whitespace: rich wraps long lines at the terminal width."""
    return "".join(text.split())


def summary_numbers(output: str) -> dict[str, int]:
    numbers = {}
    for label in ("input rows", "stored (new)", "already stored", "quarantined"):
        m = re.search(rf"^\s*{re.escape(label)}\s+([\d,]+)\s*$", output, flags=re.M)
        assert m, f"no '{label}' line in:\n{output}"
        numbers[label] = int(m.group(1).replace(",", ""))
    return numbers


# --- re-ingesting the same file ---------------------------------------------------------------------------


def test_reingest_same_file_adds_nothing(testville, tmp_path):
    store = IncidentStore(tmp_path)
    first = ingest_file(MALFORMED / "all_reasons.csv", testville, store, now=NOW)
    before = snapshot(tmp_path, "incidents")
    stored_before = store.read("testville")
    time.sleep(0.02)  # a rewrite would get a visibly newer mtime
    second = ingest_file(MALFORMED / "all_reasons.csv", testville, store, now=NOW)
    assert (first.stored_new, first.already_stored) == (4, 0)
    assert (second.stored_new, second.already_stored) == (0, 4)
    assert second.input_rows == first.input_rows == 20
    assert second.quarantined == first.quarantined == ALL_REASONS_QUARANTINED
    assert second.balanced
    # the incident store is not touched: same bytes, same mtime, same inode
    assert snapshot(tmp_path, "incidents") == before
    assert store.read("testville").equals(stored_before)
    assert set(stored_before["incident_id"]) == ALL_REASONS_STORED


def test_reingest_same_file_leaves_quarantine_untouched(testville, tmp_path):
    store = IncidentStore(tmp_path)
    ingest_file(MALFORMED / "all_reasons.csv", testville, store, now=NOW)
    before = snapshot(tmp_path, "quarantine")
    assert len(before) == 1  # one quarantine file per input file
    time.sleep(0.02)
    ingest_file(MALFORMED / "all_reasons.csv", testville, store, now=NOW)
    after = snapshot(tmp_path, "quarantine")
    assert hashes(after) == hashes(before)  # same content, no second file for the same input
    assert store.read_quarantine("testville").height == sum(ALL_REASONS_QUARANTINED.values())
    # BUG: features/pipeline.py ingest_file always calls IncidentStore.write_quarantine, which rewrites the
    # quarantine Parquet (features/store.py _atomic_write: new file + os.replace) even when its content is
    # unchanged. The re-ingest therefore touches the quarantine (new inode and mtime) although IncidentStore.add
    # leaves the incidents alone, and delete_older_than, which ages quarantine files by mtime, restarts their
    # retention clock on every re-ingest.
    assert after == before, (
        "re-ingesting an identical file rewrote the quarantine file (same bytes, new mtime/inode): "
        f"{ {k: (before[k][1:], after[k][1:]) for k in before} }"
    )


# --- a newer export: a superset of the first ----------------------------------------------------------------


def test_superset_export_adds_exactly_the_new_rows(testville, tmp_path):
    store = IncidentStore(tmp_path / "data")
    ingest_file(MALFORMED / "all_reasons.csv", testville, store, now=NOW)
    old = store.read("testville").sort("incident_id")
    summary = ingest_file(superset_export(tmp_path), testville, store, now=NOW)
    assert summary.input_rows == 24
    assert (summary.stored_new, summary.already_stored) == (3, 4)
    expected_q = dict(ALL_REASONS_QUARANTINED, unknown_category=ALL_REASONS_QUARANTINED["unknown_category"] + 1)
    assert summary.quarantined == expected_q
    assert summary.balanced
    now_stored = store.read("testville").sort("incident_id")
    assert set(now_stored["incident_id"]) == ALL_REASONS_STORED | {"T-101", "T-102", "T-103"}
    # the old incidents are unchanged
    assert now_stored.filter(pl.col("incident_id").is_in(list(ALL_REASONS_STORED))).equals(old)
    # the newer export has its own quarantine file; the new bad row is row 24 of that file
    by_file = store.read_quarantine("testville")
    newer = by_file.filter(pl.col("file") == "export_newer.csv")
    assert newer.height == sum(expected_q.values())
    assert newer.filter(pl.col("source_row") == 24).select("reason", "raw_id").rows() == [("unknown_category", "T-104")]
    # re-ingesting the newer export again adds nothing
    again = ingest_file(superset_export(tmp_path), testville, store, now=NOW)
    assert (again.stored_new, again.already_stored) == (0, 7)


def test_superset_export_with_content_derived_ids(testville, tmp_path):
    """Sources without an id column (like Toronto): ids come from row content plus the ordinal among identical rows,
    so the rows of the older export keep their ids, and a genuine repeat in the newer one is a new incident."""
    profile = testville.model_copy(update={"columns": ColumnsSpec(id=None, category="offence")})
    store = IncidentStore(tmp_path / "data")
    first_file = MALFORMED / "dst.csv"
    first = ingest_file(first_file, profile, store, now=NOW)
    assert (first.stored_new, first.quarantined) == (6, {})
    old_ids = set(store.read("testville")["incident_id"])
    lines = first_file.read_text().splitlines(keepends=True)
    newer = tmp_path / "dst_newer.csv"
    newer.write_text(
        "".join(lines)
        + "D-007,2021-12-01 10:00:00,THEFT,40.750000,-73.990000\n"
        + lines[1]  # the same incident reported again, identical in every column
    )
    summary = ingest_file(newer, profile, store, now=NOW)
    assert (summary.input_rows, summary.stored_new, summary.already_stored) == (8, 2, 6)
    assert summary.balanced
    ids = set(store.read("testville")["incident_id"])
    assert old_ids < ids and len(ids) == 8


# --- retention ----------------------------------------------------------------------------------------------


def test_retention_deletes_exactly_the_old_incidents(testville, tmp_path):
    store = IncidentStore(tmp_path)
    ingest_file(MALFORMED / "all_reasons.csv", testville, store, now=NOW)
    ingest_file(MALFORMED / "dst.csv", testville, store, now=NOW)
    projected = load_profile(FIXTURES / "profiles" / "testville_projected.toml")
    ingest_file(MALFORMED / "projected.csv", projected, store, now=NOW)  # 2 incidents on 2021-06-01
    before = store.read("testville")
    assert before.height == 10
    assert store.count("testville-projected") == 2

    quarantine_files = sorted((tmp_path / "quarantine").rglob("*.parquet"))
    assert len(quarantine_files) == 2  # all_reasons.csv and projected.csv (dst.csv has no rejects)
    stale, fresh = quarantine_files
    old_stamp = datetime(2021, 1, 1, tzinfo=UTC).timestamp()
    os.utime(stale, (old_stamp, old_stamp))

    cutoff = datetime(2021, 6, 5, 6, 0, tzinfo=UTC)  # exactly T-016's instant (02:00 EDT)
    now = datetime(2021, 12, 31, tzinfo=UTC)
    deleted = store.delete_older_than(now - cutoff, now=now)

    # T-001, T-002 (1 June) and D-001..D-003 (14 March) are older; the two projected incidents (1 June) too
    assert deleted == {"testville": 5, "testville-projected": 2}
    after = store.read("testville")
    assert set(after["incident_id"]) == {"T-016", "T-018", "D-004", "D-005", "D-006"}
    # the survivors are unchanged, row for row
    assert after.sort("incident_id").equals(before.filter(pl.col("occurred_at") >= cutoff).sort("incident_id"))
    assert after.filter(pl.col("incident_id") == "T-016")["occurred_at"].item() == cutoff  # at the cutoff: kept
    assert store.count("testville-projected") == 0
    # quarantine files go by file age: the one dated before the cutoff is gone, the other untouched
    assert not stale.exists() and fresh.exists()

    # nothing left to delete: a second run deletes nothing and rewrites nothing
    snap = snapshot(tmp_path, "incidents")
    assert store.delete_older_than(now - cutoff, now=now) == {"testville": 0, "testville-projected": 0}
    assert snapshot(tmp_path, "incidents") == snap


def test_retention_on_an_empty_store(tmp_path):
    assert IncidentStore(tmp_path).delete_older_than(timedelta(days=1)) == {}


# --- the CLI ------------------------------------------------------------------------------------------------


@pytest.fixture()
def runner():
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output


def test_cli_ingest_prints_summary(runner, tmp_path):
    result, out = invoke(runner, "ingest", TESTVILLE, MALFORMED / "all_reasons.csv", "--data-dir", tmp_path)
    assert result.exit_code == 0, out
    assert summary_numbers(out) == {"input rows": 20, "stored (new)": 4, "already stored": 0, "quarantined": 16}
    for reason, n in ALL_REASONS_QUARANTINED.items():
        assert re.search(rf"^\s+{reason}\s+{n}\s*$", out, flags=re.M), reason
    assert "balanced: True" in out
    reports = list((tmp_path / "reports" / "ingest").glob("testville-*.json"))
    assert len(reports) == 1
    assert flat(f"summary written to {reports[0]}") in flat(out)
    report = json.loads(reports[0].read_text())
    assert (report["input_rows"], report["stored_new"], report["quarantined"]) == (20, 4, ALL_REASONS_QUARANTINED)
    assert IncidentStore(tmp_path).count("testville") == 4

    # the second run says everything is already stored
    result, out = invoke(runner, "ingest", TESTVILLE, MALFORMED / "all_reasons.csv", "--data-dir", tmp_path)
    assert result.exit_code == 0, out
    assert summary_numbers(out) == {"input rows": 20, "stored (new)": 0, "already stored": 4, "quarantined": 16}

    result, out = invoke(runner, "quarantine", "testville", "--data-dir", tmp_path)
    assert result.exit_code == 0, out
    assert "all_reasons.csv" in out and "missing_coordinates" in out and "duplicate_id" in out


def test_cli_ingest_with_encoding_option(runner, tmp_path):
    result, out = invoke(runner, "ingest", TESTVILLE, MALFORMED / "latin1.csv", "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert re.search(r"^error: latin1\.csv is not valid UTF-8", out, flags=re.M), out
    assert flat("rerun with --encoding latin-1") in flat(out)
    result, out = invoke(
        runner, "ingest", TESTVILLE, MALFORMED / "latin1.csv", "--encoding", "latin-1", "--data-dir", tmp_path
    )
    assert result.exit_code == 0, out
    assert summary_numbers(out)["stored (new)"] == 2


def test_cli_ingest_missing_columns_exits_2(runner, tmp_path):
    result, out = invoke(runner, "ingest", TESTVILLE, MALFORMED / "missing_columns.csv", "--data-dir", tmp_path)
    assert result.exit_code == 2, out
    assert re.search(r"^error: missing_columns\.csv lacks", out, flags=re.M), out
    assert flat("lacks required column(s) 'occurred', 'lat' for profile 'testville'") in flat(out)
    assert flat(str(TESTVILLE)) in flat(out)
    assert "Traceback" not in out
    assert not (tmp_path / "incidents").exists()


def test_cli_ingest_unknown_profile_exits_2(runner, tmp_path):
    result, out = invoke(runner, "ingest", "no-such-city", MALFORMED / "dst.csv", "--data-dir", tmp_path)
    assert result.exit_code == 2
    assert "error:" in out and "no profile 'no-such-city'" in out


def test_cli_retention(runner, tmp_path):
    store = IncidentStore(tmp_path)
    ingest_file(MALFORMED / "all_reasons.csv", load_profile(TESTVILLE), store, now=NOW)
    # a cutoff between 3 and 4 June 2021 (UTC): T-001 and T-002 (1 June) are older, T-016 and T-018 are not
    days = (datetime.now(UTC) - datetime(2021, 6, 3, tzinfo=UTC)).days
    result, out = invoke(runner, "retention", "--max-age-days", days, "--data-dir", tmp_path)
    assert result.exit_code == 0, out
    assert json.loads(out.strip()) == {"testville": 2}
    assert set(store.read("testville")["incident_id"]) == {"T-016", "T-018"}
    # the quarantine file was written just now: far newer than the cutoff, so it stays
    assert store.read_quarantine("testville").height == 16

    result, out = invoke(runner, "retention", "--max-age-days", 0, "--data-dir", tmp_path)
    assert result.exit_code == 2  # min=1


def test_cli_toronto_ingest_twice_is_idempotent(runner, tmp_path, tmp_path_factory):
    # the first ingest into an empty folder is the session's shared one (conftest), run by the same command
    first = summary_numbers(toronto_first_ingest(tmp_path_factory, tmp_path))
    assert first["input rows"] > 200_000
    assert first["stored (new)"] + first["quarantined"] == first["input rows"]
    assert first["already stored"] == 0
    incidents = snapshot(tmp_path, "incidents")
    quarantine = snapshot(tmp_path, "quarantine")
    assert "incidents/toronto-mci/_manifest.json" in incidents  # partitioned by month under one manifest
    assert sum(name.startswith("incidents/toronto-mci/month=") for name in incidents) > 12

    result, out = invoke(runner, "ingest", "toronto-mci", "--data-dir", tmp_path)
    assert result.exit_code == 0, out
    second = summary_numbers(out)
    assert second == {
        "input rows": first["input rows"],
        "stored (new)": 0,
        "already stored": first["stored (new)"],
        "quarantined": first["quarantined"],
    }
    assert snapshot(tmp_path, "incidents") == incidents  # bytes, mtime and inode
    assert hashes(snapshot(tmp_path, "quarantine")) == hashes(quarantine)  # (mtime: see the quarantine test)
    assert IncidentStore(tmp_path).count("toronto-mci") == first["stored (new)"]
