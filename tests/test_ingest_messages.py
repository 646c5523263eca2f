"""Issue 11, finding 3: every broken input or data folder gets one line naming the problem and the fix, exit 2,
no traceback; inputs that can be read correctly (CR-only line ends, UTF-16 with a byte-order mark, a stray
quote on one line) are read, and only the broken row is quarantined."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from features.store import IncidentStore
from serving.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
MALFORMED = FIXTURES / "malformed"
TESTVILLE = FIXTURES / "profiles" / "testville.toml"
DST = (MALFORMED / "dst.csv").read_text()  # 6 rows, all valid, LF line ends
DST_IDS = [f"D-00{i}" for i in range(1, 7)]
WIDE = {"COLUMNS": "1000"}  # rich wraps at the terminal width: make room for the one line


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env=WIDE)
    return result.exit_code, result.output


def assert_one_line_error(code: int, out: str, *fragments: str) -> str:
    """Exit 2, no traceback, the output ends with exactly one `error: ...` line holding every fragment."""
    assert code == 2, out
    assert "Traceback" not in out and "Error:" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert out.rstrip().splitlines()[-1] == errors[0], out  # nothing after it: the message is one line
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def ingest(tmp_path: Path, path: Path, *extra) -> tuple[int, str]:
    return run("ingest", TESTVILLE, path, "--data-dir", tmp_path / "data", *extra)


def stored_ids(tmp_path: Path) -> list[str]:
    return sorted(IncidentStore(tmp_path / "data").read("testville")["incident_id"])


# --- read correctly instead of failing ---------------------------------------------------------------------


def test_cr_only_line_ends_are_read(tmp_path):
    path = tmp_path / "old_mac.csv"
    path.write_bytes(DST.replace("\n", "\r").encode())
    assert b"\n" not in path.read_bytes()
    code, out = ingest(tmp_path, path)
    assert code == 0, out
    assert stored_ids(tmp_path) == DST_IDS
    assert IncidentStore(tmp_path / "data").read("testville")["longitude"].to_list().count(-73.99) == 3


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be"])
def test_utf16_with_byte_order_mark_is_decoded(tmp_path, codec):
    path = tmp_path / "excel.csv"
    data = DST.encode(codec)
    path.write_bytes(data if codec == "utf-16" else b"\xfe\xff" + data)
    code, out = ingest(tmp_path, path)
    assert code == 0, out
    assert stored_ids(tmp_path) == DST_IDS
    # the byte-order mark decides, even against a wrong --encoding (it used to crash with latin-1)
    code, out = ingest(tmp_path, path, "--encoding", "latin-1")
    assert code == 0, out
    assert "already stored            6" in out


def test_utf16_without_byte_order_mark_names_the_encoding_and_it_works(tmp_path):
    path = tmp_path / "bare16.csv"
    path.write_bytes(DST.encode("utf-16-le"))
    code, out = ingest(tmp_path, path)
    assert_one_line_error(code, out, "bare16.csv", "NUL bytes", "UTF-16", "rerun with --encoding utf-16-le")
    code, out = ingest(tmp_path, path, "--encoding", "latin-1")  # the advice it used to give
    assert_one_line_error(code, out, "not latin-1 text", "--encoding utf-16-le")
    code, out = ingest(tmp_path, path, "--encoding", "utf-16-le")
    assert code == 0, out
    assert stored_ids(tmp_path) == DST_IDS


def test_unmatched_quote_quarantines_only_its_row(tmp_path):
    lines = DST.splitlines(keepends=True)
    path = tmp_path / "stray.csv"
    # line 3 (row 2) opens a quote it never closes; before, polars refused the whole file
    path.write_text(lines[0] + lines[1] + lines[2].replace(",THEFT", ',"THEFT') + "".join(lines[3:]))
    code, out = ingest(tmp_path, path)
    assert code == 0, out
    assert "malformed_row             1" in out
    assert "line 3 of stray.csv has an unmatched quote" in out
    assert stored_ids(tmp_path) == [i for i in DST_IDS if i != "D-002"]
    quarantine = IncidentStore(tmp_path / "data").read_quarantine("testville")
    assert quarantine.select("source_row", "reason", "raw_id").rows() == [(2, "malformed_row", "D-002")]


def test_quote_inside_a_value_keeps_the_file(tmp_path):
    lines = DST.splitlines(keepends=True)
    path = tmp_path / "inner.csv"
    path.write_text(lines[0] + lines[1].replace("THEFT", 'TH"EFT') + "".join(lines[2:]))
    code, out = ingest(tmp_path, path)
    assert code == 0, out
    # the row is read as written (an unknown category), every other row is stored
    assert "unknown_category          1" in out
    assert stored_ids(tmp_path) == DST_IDS[1:]


def test_two_stray_quotes_do_not_merge_the_lines_between(tmp_path):
    """polars would silently read lines 3-5 as one value: three rows gone with no trace."""
    lines = DST.splitlines(keepends=True)
    path = tmp_path / "pair.csv"
    path.write_text(lines[0] + lines[1] + lines[2].replace(",THEFT", ',"THEFT') + lines[3] + lines[4]
                    + lines[5].replace("ASSAULT,", 'ASSAULT",') + lines[6])
    code, out = ingest(tmp_path, path)
    assert code == 0, out
    assert "input rows                6" in out and "balanced: True" in out
    assert "line 3 of pair.csv has an unmatched quote" in out
    # D-003 and D-004 are stored; D-005's closing quote sits inside a value, which is read as written
    assert stored_ids(tmp_path) == ["D-001", "D-003", "D-004", "D-006"]
    quarantine = IncidentStore(tmp_path / "data").read_quarantine("testville")
    assert quarantine.select("source_row", "reason", "raw_category").rows() == [
        (2, "malformed_row", "THEFT,40.750000,-73.990000"), (5, "unknown_category", 'ASSAULT"')]


# --- refused with one line ------------------------------------------------------------------------------------


def test_wrong_delimiter_points_at_the_profile_field(tmp_path):
    path = tmp_path / "semicolons.csv"
    path.write_text(DST.replace(",", ";"))
    code, out = ingest(tmp_path, path)
    assert_one_line_error(code, out, "semicolons.csv is separated by semicolons, not by commas",
                          f'set delimiter = ";" in {TESTVILLE}')
    fixed = tmp_path / "testville_semicolons.toml"
    fixed.write_text(TESTVILLE.read_text().replace('encoding = "utf-8"', 'encoding = "utf-8"\ndelimiter = ";"'))
    code, out = ingest(tmp_path, path, "--profile", fixed)
    assert code == 0, out
    assert stored_ids(tmp_path) == DST_IDS


def test_built_in_profile_is_never_the_one_to_edit(tmp_path):
    path = tmp_path / "tabs.csv"
    path.write_text(
        "Case Number\tDate\tPrimary Type\tLatitude\tLongitude\n"
        "JA100001\t01/01/2018 10:00:00 AM\tTHEFT\t41.88\t-87.63\n"
    )
    code, out = run("ingest", "chicago", path, "--data-dir", tmp_path / "data")
    line = assert_one_line_error(code, out, "separated by tabs", "copy the built-in profile 'chicago'",
                                 'set delimiter = "\\t" in the copy', "pass it with --profile")
    assert "features/profiles/chicago.toml in" not in line  # never "edit the package's file"
    # missing columns on a built-in profile: the same advice
    path.write_text("a,b\n1,2\n")
    code, out = run("ingest", "chicago", path, "--data-dir", tmp_path / "data")
    assert_one_line_error(code, out, "lacks required column(s)", "copy the built-in profile 'chicago'")


def test_duplicated_required_header_is_named(tmp_path):
    path = tmp_path / "twice.csv"
    lines = DST.splitlines()
    path.write_text("\n".join([lines[0] + ",lat"] + [line + ",0" for line in lines[1:]]) + "\n")
    code, out = ingest(tmp_path, path)
    assert_one_line_error(code, out, "twice.csv names the required column 'lat' 2 times", "columns 4 and 6",
                          "rename or remove")
    assert not (tmp_path / "data" / "incidents").exists()


def test_folder_given_as_input_file(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "chicago_2018.csv").write_text(DST)
    code, out = ingest(tmp_path, folder)
    assert_one_line_error(code, out, f"{folder} is a folder, not a file", "chicago_2018.csv",
                          "give the export file itself")


def test_data_dir_pointing_at_a_file(tmp_path):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("x")
    code, out = run("ingest", TESTVILLE, MALFORMED / "dst.csv", "--data-dir", not_a_folder)
    assert_one_line_error(code, out, f"the data folder {not_a_folder} is a file, not a folder",
                          "pass --data-dir with a folder")
    assert not_a_folder.read_text() == "x"
    # the built-in Toronto source writes its export into the data folder first: the same message
    code, out = run("ingest", "toronto-mci", "--data-dir", not_a_folder)
    assert_one_line_error(code, out, f"the data folder {not_a_folder} is a file, not a folder")


def test_read_only_data_folder(tmp_path):
    """As root, the ingest runs without the capability to override file permissions (root writes anywhere)."""
    root = Path(tempfile.mkdtemp(prefix="hotspots-ro-"))
    try:
        os.chmod(root, 0o755)
        data = root / "data"
        data.mkdir()
        source = root / "dst.csv"
        shutil.copy(MALFORMED / "dst.csv", source)
        os.chmod(source, 0o644)
        os.chmod(data, 0o555)
        unprivileged = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        proc = subprocess.run(
            [*unprivileged, str(Path(sys.executable).parent / "hotspots"), "ingest", str(TESTVILLE), str(source),
             "--data-dir", str(data)],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
            env={**os.environ, **WIDE, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert_one_line_error(proc.returncode, proc.stdout + proc.stderr, "cannot write", "Permission denied",
                              "make the data folder writable", "or pass --data-dir with a writable folder")
        assert list(data.iterdir()) == []
    finally:
        os.chmod(root / "data", 0o755)
        shutil.rmtree(root)


def test_unreadable_store_is_reported_not_overwritten(tmp_path):
    """Finding 1: a later ingest into a broken store printed `balanced: True`. Now it stops and says why."""
    code, out = ingest(tmp_path, MALFORMED / "dst.csv")
    assert code == 0, out
    store = IncidentStore(tmp_path / "data").partition_files("testville")[0]
    store.write_bytes(store.read_bytes()[:100])
    damaged = store.read_bytes()
    code, out = ingest(tmp_path, MALFORMED / "all_reasons.csv")
    assert_one_line_error(code, out, f"the incident store {store} is unreadable", "hotspots verify",
                          "restore the file from a backup")
    assert store.read_bytes() == damaged  # left for the user to rescue, not replaced by a partial store
    with pytest.raises(pl.exceptions.ComputeError, match="PAR1"):
        pl.read_parquet(store)


def test_other_store_commands_explain_a_damaged_or_wrong_folder(tmp_path):
    code, out = ingest(tmp_path, MALFORMED / "all_reasons.csv")
    assert code == 0, out
    data = tmp_path / "data"
    quarantine = next((data / "quarantine" / "testville").glob("*.parquet"))
    quarantine.write_bytes(b"PAR1 not really")
    code, out = run("quarantine", "testville", "--data-dir", data)
    assert_one_line_error(code, out, f"the quarantine file {quarantine} is unreadable", "hotspots verify")
    store = IncidentStore(data).partition_files("testville")[0]
    store.write_bytes(store.read_bytes()[:-30])
    code, out = run("panel", "testville", "--profile", TESTVILLE, "--data-dir", data)
    assert_one_line_error(code, out, f"the incident store {store} is unreadable")
    code, out = run("retention", "--max-age-days", 30, "--data-dir", data)
    assert_one_line_error(code, out, f"the incident store {store} is unreadable")
    code, out = run("retention", "--max-age-days", 30, "--data-dir", MALFORMED / "dst.csv")
    assert_one_line_error(code, out, "is a file, not a folder")
