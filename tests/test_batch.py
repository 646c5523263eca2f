"""`hotspots batch GRID.toml` on a real two-process LocalCluster, on tiny real Toronto slices: each point is a
task that reads the data folder and writes its own folder; the batch equals per-point local runs to the bit, a
worker killed mid-batch costs a retry and never a lost or duplicated result or MLflow run, and a re-run computes
and logs nothing."""

from __future__ import annotations

import os
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import polars as pl
import pytest
from typer.testing import CliRunner

from features.paths import DataPaths
from features.profile import load_profile
from features.settings import Settings
from features.store import IncidentStore
from forecasting.batch import load_grid, point_folder, run_point
from forecasting.reporting.batch_runs import run_tracked_batch
from serving.cli import app

GRID = """
name = "tiny"
sources = ["toronto-mci", "toronto-east"]
resolutions = [8, 9]
shift_starts = ["06:00,14:00,22:00", "00:00"]
forecasters = ["naive", "all_history"]
test_start = 2020-12-01
test_end = 2021-01-01
n_boot = 20
strongest_days = 28
"""
BOXES = {"toronto-mci": ((43.640, 43.665), (-79.400, -79.370)),  # downtown
         "toronto-east": ((43.660, 43.690), (-79.350, -79.310))}  # east end
PARQUETS = ("results.parquet", "forecasts.parquet")


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch):
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HOTSPOTS_DASK_SCHEDULER", raising=False)


@pytest.fixture(scope="module")
def seed_folder(toronto_incidents, tmp_path_factory) -> Path:
    """A data folder with two small real sources (Sept-Dec 2020) and the second source's remembered profile."""
    root = tmp_path_factory.mktemp("batch-seed")
    store = IncidentStore(root)
    start, end = datetime(2020, 9, 1, tzinfo=UTC), datetime(2021, 1, 2, tzinfo=UTC)
    for source, (lat, lon) in BOXES.items():
        box = toronto_incidents.filter(pl.col("latitude").is_between(*lat) & pl.col("longitude").is_between(*lon)
                                       & pl.col("occurred_at").is_between(start, end, closed="left"))
        assert box.height > 200, source
        store.add(box.with_columns(pl.lit(source).alias("source")), source)
    profile = load_profile("toronto-mci").model_copy(update={"name": "toronto-east", "path": None})
    (root / "profiles").mkdir()
    (root / "profiles" / "toronto-east.toml").write_text(profile.to_toml())
    (root / "tiny.toml").write_text(GRID)
    return root


def fresh(seed_folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(seed_folder, tmp_path / name))


@pytest.fixture(scope="module")
def local(seed_folder, tmp_path_factory) -> Path:
    """Every point run on its own in this process, into a copy of the same data folder."""
    folder = Path(shutil.copytree(seed_folder, tmp_path_factory.mktemp("batch-local") / "data"))
    for point in load_grid(folder / "tiny.toml").points:
        result = run_point(point, str(folder))
        assert result.error is None and not result.reused, result.error
    return folder


def batch_runs(data_dir: Path) -> pl.DataFrame:
    mlflow.set_tracking_uri(Settings(data_dir=data_dir).tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'batch'")
    return pl.from_pandas(runs[["run_id", "tags.batch_point", "tags.batch_digest"]])


def assert_same_as_local(data_dir: Path, local: Path) -> None:
    grid = load_grid(data_dir / "tiny.toml")  # the local run made every point of the full grid
    for point in grid.points:
        for name in PARQUETS:
            ours, theirs = point_folder(data_dir, point) / name, point_folder(local, point) / name
            assert ours.read_bytes() == theirs.read_bytes(), (point.folder_name, name)
    assert sorted(p.name for p in (data_dir / "batches" / "tiny").iterdir()) == sorted(
        [p.folder_name for p in grid.points] + ["batch.json"])  # no leftover temporary folders


def test_grid_points_are_the_product_in_a_fixed_order(seed_folder):
    points = load_grid(seed_folder / "tiny.toml").points
    assert [(p.source, p.resolution, p.shift_starts) for p in points[:3]] == [
        ("toronto-mci", 8, ("06:00", "14:00", "22:00")), ("toronto-mci", 8, ("00:00",)),
        ("toronto-mci", 9, ("06:00", "14:00", "22:00"))]
    assert len(points) == 8 and points[1].folder_name == "toronto-mci-r8-shifts-0000-20201201-20210101"


def test_the_batch_on_the_cluster_equals_per_point_local_runs(seed_folder, local, client, tmp_path):
    data_dir = fresh(seed_folder, tmp_path, "data")
    settings = Settings(data_dir=data_dir)
    messages: list[str] = []
    tracked = run_tracked_batch(load_grid(data_dir / "tiny.toml"), settings, cluster=client, progress=messages.append)
    assert not tracked.failed and tracked.logged == 8 and len(messages) == 8
    assert_same_as_local(data_dir, local)
    frame = pl.read_parquet(point_folder(data_dir, tracked.grid.points[0]) / "forecasts.parquet")
    assert frame["forecaster"].unique().sort().to_list() == ["all_history", "naive"] and frame["observed"].sum() > 0
    runs = batch_runs(data_dir)
    assert runs.height == 8 and runs["tags.batch_point"].n_unique() == 8

    # run again: every point is answered from its folder, nothing is computed or logged twice
    stamps = {p: p.stat().st_mtime_ns for p in (data_dir / "batches" / "tiny").rglob("*.parquet")}
    again = run_tracked_batch(load_grid(data_dir / "tiny.toml"), settings, cluster=client)
    assert all(r.reused for r in again.results) and again.logged == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert batch_runs(data_dir).height == 8


def test_a_worker_killed_mid_batch_still_completes_without_duplicates(seed_folder, local, client, tmp_path):
    data_dir = fresh(seed_folder, tmp_path, "data")
    killed: list[int] = []

    def kill_a_busy_worker(message: str) -> None:
        if killed:
            return
        busy = [addr for addr, keys in client.processing().items() if keys]
        if busy:  # SIGKILL: a lost node, mid-task; the nanny starts a new worker process
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    tracked = run_tracked_batch(load_grid(data_dir / "tiny.toml"), Settings(data_dir=data_dir), cluster=client,
                                progress=kill_a_busy_worker)
    assert killed and killed[0] != os.getpid()
    assert not tracked.failed and len(tracked.results) == 8
    assert len({r.folder for r in tracked.results}) == 8
    assert_same_as_local(data_dir, local)
    runs = batch_runs(data_dir)
    assert runs.height == 8 and runs["tags.batch_point"].n_unique() == 8
    client.wait_for_workers(2, timeout=60)


def test_the_command_runs_locally_and_resumes(seed_folder, local, tmp_path):
    data_dir = fresh(seed_folder, tmp_path, "data")
    (data_dir / "tiny.toml").write_text(GRID.replace(', "toronto-east"]', "]").replace("[8, 9]", "[8]"))  # 2 points
    done = point_folder(local, load_grid(local / "tiny.toml").points[0])
    shutil.copytree(done, data_dir / "batches" / "tiny" / done.name)  # a point finished by an earlier run
    result = CliRunner().invoke(app, ["batch", str(data_dir / "tiny.toml"), "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already done") == 1 and "2 of 2 points done (2 new MLflow runs)" in result.output
    assert_same_as_local(data_dir, local)


def test_a_bad_grid_is_one_line_naming_the_fix(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('sources = ["x"]\nresolution = [9]\n')
    result = CliRunner().invoke(app, ["batch", str(bad), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown field(s) resolution" in result.output
    assert len(result.output.strip().splitlines()) == 1
    bad.write_text('sources = ["x"]\nforecasters = ["lgbm"]\n')
    result = CliRunner().invoke(app, ["batch", str(bad), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown ['lgbm']" in result.output
    bad.write_text('name = "it\'s"\nsources = ["x"]\n')
    result = CliRunner().invoke(app, ["batch", str(bad), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "must be a folder name" in result.output


def test_a_point_without_data_fails_alone_with_the_fix(seed_folder, tmp_path):
    data_dir = fresh(seed_folder, tmp_path, "data")
    (data_dir / "tiny.toml").write_text(GRID.replace('"toronto-east"]', '"nowhere"]').replace(
        'resolutions = [8, 9]', 'resolutions = [8]').replace(', "00:00"', ""))
    result = CliRunner().invoke(app, ["batch", str(data_dir / "tiny.toml"), "--data-dir", str(data_dir)])
    assert result.exit_code == 1, result.output
    assert "1 of 2 points done" in result.output and "nowhere r8" in result.output and "no profile" in result.output
    assert DataPaths(Settings(data_dir=data_dir)).root.joinpath("batches", "tiny", "batch.json").is_file()
