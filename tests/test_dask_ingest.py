"""A partitioned ingest on a real two-process LocalCluster: chunks read, validated and spilled by tasks, one
commit on the client, and the same store, quarantine and summary as the local path, on a real Toronto slice."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import polars as pl
import pytest

import features.ingest as ingest_module
import forecasting.cluster as cluster_module
from features.ingest import plan_input
from features.pipeline import ingest_file, ingest_on_cluster
from features.profile import load_profile
from features.sources.toronto import materialise
from features.store import IncidentStore
from features.verify import verify_store

# 10,000 rows of the export span 118 months (its first rows are spread over the years), and 192 KiB chunks cut
# them into 7 chunks: the same shape of input (many months, several chunks, a repeat in another chunk) as the
# 40,000 rows and 1 MiB chunks this used before, at a quarter of the ingest work
ROWS = 10_000
CHUNK = 192 << 10


@pytest.fixture(scope="module")
def toronto_slice(tmp_path_factory) -> Path:
    """The first rows of the real Toronto export, plus one row repeated at the end (in another chunk)."""
    root = tmp_path_factory.mktemp("toronto-slice")
    full = materialise(root / "toronto-mci.csv")
    with full.open("rb") as fh:
        lines = [fh.readline() for _ in range(ROWS + 1)]
    path = root / "slice.csv"
    path.write_bytes(b"".join(lines) + lines[5])
    return path


def summary_of(summary) -> dict:
    out = asdict(summary)
    for key in ("seconds", "report_path"):
        out.pop(key)
    return out


def test_a_partitioned_ingest_on_the_cluster_gives_the_local_store(toronto_slice, client, tmp_path, monkeypatch):
    profile = load_profile("toronto-mci")
    plan = plan_input(toronto_slice, profile, chunk_bytes=CHUNK)
    assert plan is not None and len(plan.chunks) >= 4

    whole = IncidentStore(tmp_path / "whole")  # read at once, as before chunking
    expected = summary_of(ingest_file(toronto_slice, profile, whole))
    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", CHUNK)
    local = IncidentStore(tmp_path / "local")
    on_local = summary_of(ingest_file(toronto_slice, profile, local))
    cluster = IncidentStore(tmp_path / "cluster")
    on_cluster = summary_of(ingest_on_cluster(toronto_slice, profile, cluster, client, chunk_bytes=CHUNK))

    assert on_cluster == on_local == expected
    assert expected["stored_new"] > ROWS * 0.9 and "duplicate_id" not in expected["quarantined"]
    # Toronto publishes no ids: the repeated last row is a genuine repeat, its derived id numbered on across chunks
    repeats = cluster.read("toronto-mci").filter(pl.col("incident_id").str.ends_with("-1"))["incident_id"]
    assert repeats.len() >= 1 and repeats.str.replace("-1$", "-0").is_in(
        cluster.read("toronto-mci")["incident_id"].implode()).all()
    # the same partitions, month by month, to the bit (rows are sorted within a month)
    months = {p.parent.name: p for p in local.partition_files("toronto-mci")}
    assert {p.parent.name for p in cluster.partition_files("toronto-mci")} == set(months) and len(months) > 12
    for path in cluster.partition_files("toronto-mci"):
        assert pl.read_parquet(path).equals(pl.read_parquet(months[path.parent.name]))
        assert path.read_bytes() == months[path.parent.name].read_bytes()
    assert cluster.read("toronto-mci").equals(whole.read("toronto-mci"))
    assert cluster.read_quarantine("toronto-mci").equals(local.read_quarantine("toronto-mci"))
    assert [f.level for f in verify_store(tmp_path / "cluster")].count("error") == 0
    assert not list(cluster.path("toronto-mci").glob("_staging-*"))  # the spill folder is gone

    # the same file again on the cluster: everything already stored, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in cluster.partition_files("toronto-mci")}
    again = ingest_on_cluster(toronto_slice, profile, cluster, client, chunk_bytes=CHUNK)
    assert (again.stored_new, again.updated) == (0, 0) and again.balanced
    assert {p: p.stat().st_mtime_ns for p in cluster.partition_files("toronto-mci")} == before


def test_the_ingest_command_takes_the_cluster_and_stores_what_a_local_ingest_stores(toronto_slice, client, tmp_path,
                                                                                   monkeypatch):
    from typer.testing import CliRunner

    from serving.cli import app

    monkeypatch.delenv("HOTSPOTS_DASK_SCHEDULER", raising=False)
    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", CHUNK)  # the slice is chunked as a large export would be
    runner = CliRunner()
    local = runner.invoke(app, ["ingest", "toronto-mci", str(toronto_slice), "--data-dir", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    on_cluster = runner.invoke(app, ["ingest", "toronto-mci", str(toronto_slice), "--data-dir", str(tmp_path / "cluster"),
                                     "--cluster", client.scheduler.address])
    assert on_cluster.exit_code == 0, on_cluster.output
    assert "balanced: True" in on_cluster.output
    counts = lambda output: output.split("input rows")[1].split("balanced")[0]  # noqa: E731 - the summary's counts
    assert counts(on_cluster.output) == counts(local.output)
    stored = {name: IncidentStore(tmp_path / name).read("toronto-mci") for name in ("local", "cluster")}
    assert stored["cluster"].height > ROWS * 0.9 and stored["cluster"].equals(stored["local"])

    # the product waits 10 s for a scheduler; the message is the same after 1 s
    monkeypatch.setattr(cluster_module.connect.__wrapped__, "__defaults__", ("1s",))
    unreachable = runner.invoke(app, ["ingest", "toronto-mci", str(toronto_slice), "--data-dir", str(tmp_path / "x"),
                                      "--cluster", "tcp://127.0.0.1:9"])
    assert unreachable.exit_code == 2 and "cannot reach the Dask scheduler" in unreachable.output
    assert not (tmp_path / "x" / "incidents").exists()  # nothing was read or stored
