"""`hotspots verify`: the store, revisions, quarantine, summaries and panels are checked, and each problem says
what to do (issue 11, Deliver 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.store import IncidentStore
from features.storelock import stale_temp_files
from features.verify import verify_store
from serving.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
TESTVILLE = FIXTURES / "profiles" / "testville.toml"
MALFORMED = FIXTURES / "malformed"
WIDE = {"COLUMNS": "1000"}


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env=WIDE)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A data folder as `hotspots ingest` and `hotspots panel` leave it."""
    data = tmp_path / "data"
    for name in ("all_reasons.csv", "dst.csv"):
        code, out = run("ingest", TESTVILLE, MALFORMED / name, "--data-dir", data)
        assert code == 0, out
    code, out = run("panel", "testville", "--profile", TESTVILLE, "--data-dir", data)
    assert code == 0, out
    return data


def levels(findings) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ok": [], "warning": [], "error": []}
    for f in findings:
        out[f.level].append(f.what + " | " + f.fix)
    return out


def test_a_healthy_folder(folder):
    found = levels(verify_store(folder))
    assert found["error"] == [] and found["warning"] == []
    text = "\n".join(found["ok"])
    assert "incidents/testville: 10 incidents, ids unique" in text
    assert "quarantine: 1 file(s), 16 rows" in text
    assert "ingest summaries: 2, each one's rows add up" in text
    assert "panels/testville-r9: 10 binned incidents, matches the store" in text
    code, out = run("verify", "--data-dir", folder)
    assert code == 0, out
    assert "0 error(s), 0 warning(s)" in out


def test_panel_out_of_date_after_a_revision_and_after_new_data(folder, tmp_path):
    revised = tmp_path / "revised.csv"
    revised.write_text((MALFORMED / "dst.csv").read_text().replace("THEFT,40.750000", "ASSAULT,40.750000", 1))
    code, out = run("ingest", TESTVILLE, revised, "--data-dir", folder)
    assert code == 0 and "updated                   1" in out, out
    found = levels(verify_store(folder))
    assert len(found["error"]) == 1
    assert "differs from the store in 2 (cell, shift, category) counts" in found["error"][0]
    assert "rebuild it with `hotspots panel testville`" in found["error"][0]
    code, out = run("verify", "--data-dir", folder)
    assert code == 1 and "1 error(s)" in out

    run("panel", "testville", "--profile", TESTVILLE, "--data-dir", folder)
    assert levels(verify_store(folder))["error"] == []
    newer = tmp_path / "newer.csv"
    newer.write_text("incident_no,occurred,offence,lat,lon\nN-1,2022-01-05 10:00:00,THEFT,40.75,-73.99\n")
    run("ingest", TESTVILLE, newer, "--data-dir", folder)
    found = levels(verify_store(folder))
    assert found["error"] == []
    assert any("ends before 1 stored incidents" in w for w in found["warning"])


def test_damaged_files_are_named_with_what_to_do(folder):
    store = IncidentStore(folder).partition_files("testville")[0]
    store.write_bytes(store.read_bytes()[:-40])
    quarantine = next((folder / "quarantine" / "testville").glob("*.parquet"))
    quarantine.write_bytes(b"not parquet")
    report = sorted((folder / "reports" / "ingest").glob("*.json"))[0]
    summary = json.loads(report.read_text())
    summary["stored_new"] -= 1
    report.write_text(json.dumps(summary))
    (store.parent / f".{store.name}.abc123.tmp").write_bytes(b"half a file")
    (folder / "panels" / "testville-r9" / "counts.parquet").write_bytes(b"")

    errors = levels(verify_store(folder))["error"]
    text = "\n".join(errors)
    assert f"{store} is unreadable" in text and "move it aside and ingest the source's exports again" in text
    assert f"{quarantine} is unreadable" in text and "ingest the input file again" in text
    assert f"{report}: 20 input rows but 19 accounted for" in text
    assert "panel" in text and "unreadable" in text and "hotspots panel testville" in text
    warnings = levels(verify_store(folder))["warning"]
    assert any(f".{store.name}.abc123.tmp is left over from an interrupted write" in w for w in warnings)
    code, out = run("verify", "--data-dir", folder, "--quiet")
    assert code == 1
    assert "4 error(s), 1 warning(s)" in out and "ok " not in out
    assert len(stale_temp_files(folder)) == 1


def test_not_a_data_folder(tmp_path):
    code, out = run("verify", "--data-dir", tmp_path / "nowhere")
    assert code == 1
    assert "is missing; fix: pass --data-dir with the folder that `hotspots ingest` wrote" in out
