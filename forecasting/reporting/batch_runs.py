"""A backtest grid, tracked: the points run where ``forecasting.batch`` sends them, and this process (the
client) logs one MLflow run per point as its result arrives. Tasks never talk to MLflow, so there is no race on
the tracking store; a point whose run already exists (same batch, same digest) is not logged again, so a
retried task, a re-run batch or a resumed one never makes a duplicate run."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from features.settings import Settings
from features.storelock import atomic_write_text
from forecasting.batch import Grid, PointResult, batch_folder, run_points
from forecasting.cluster import address_of, connect
from forecasting.reporting.tracking import code_version, configure


@dataclass
class TrackedBatch:
    grid: Grid
    results: list[PointResult] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)  # point folder name -> MLflow run id
    logged: int = 0  # runs opened by this call (the others existed already)

    @property
    def failed(self) -> list[PointResult]:
        return [r for r in self.results if r.error]


def _existing_run(experiment_id: str, batch: str, digest: str) -> str | None:
    found = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list", max_results=1,
                               filter_string=f"tags.batch = '{batch}' and tags.batch_digest = '{digest}'")
    return found[0].info.run_id if found else None


def log_point(result: PointResult, experiment_id: str, scheduler: str | None) -> tuple[str, bool]:
    """One MLflow run for a finished point, unless it has one: (run id, opened now)."""
    summary = result.summary or {}
    point = result.point
    existing = _existing_run(experiment_id, point.batch, result.digest)
    if existing is not None:
        return existing, False
    name = Path(result.folder).name
    with mlflow.start_run(run_name=f"batch-{point.batch}-{name}") as run:
        mlflow.set_tags({"kind": "batch", "city": point.source, "batch": point.batch, "batch_point": name,
                         "batch_digest": result.digest, "code_version": code_version(),
                         **({"dask_scheduler": scheduler} if scheduler else {}),
                         **({"strongest_baseline": summary["strongest_baseline"]}
                            if summary.get("strongest_baseline") else {})})
        mlflow.log_params({"source": point.source, "resolution": point.resolution,
                           "shift_starts": ",".join(point.shift_starts), "forecasters": ",".join(point.forecasters),
                           "test_start": summary.get("test_start"), "test_end": summary.get("test_end"),
                           "n_boot": point.n_boot, "strongest_validation_days": point.strongest_days,
                           "seed": point.seed, "params": point.params})
        mlflow.log_metrics({k: v for k, v in summary.get("metrics", {}).items() if v == v})  # NaN is not logged
        mlflow.log_artifacts(result.folder, artifact_path="batch-point")
    return run.info.run_id, True


def run_tracked_batch(grid: Grid, settings: Settings, *, cluster: Any = None, retries: int = 3,
                      progress: Callable[[str], None] | None = None) -> TrackedBatch:
    """Run every point of ``grid`` (as Dask tasks on ``cluster``, a scheduler address or Client; else in this
    process), log each finished point to MLflow once, and write ``batches/<name>/batch.json``."""
    say = progress or (lambda message: None)
    experiment_id = configure(settings)
    tracked = TrackedBatch(grid)
    total = len(grid.points)
    with connect(cluster) if cluster is not None else nullcontext() as client:
        scheduler = address_of(cluster) if cluster is not None else None
        for done, result in enumerate(run_points(list(grid.points), settings.data_dir, client, retries), start=1):
            tracked.results.append(result)
            name = Path(result.folder).name
            if result.error:
                say(f"point {done}/{total}: FAILED {result.error}")
                continue
            run_id, opened = log_point(result, experiment_id, scheduler)
            tracked.run_ids[name] = run_id
            tracked.logged += opened
            how = "already done" if result.reused else f"done in {result.seconds:.1f} s"
            strongest = (result.summary or {}).get("strongest_baseline")
            say(f"point {done}/{total}: {result.point.label()}: {how}"
                + (f", strongest baseline {strongest}" if strongest else "") + f" (MLflow run {run_id[:8]})")
    manifest = {"batch": grid.name, "grid": grid.path, "points": [
        {"point": Path(r.folder).name, "folder": r.folder, "digest": r.digest, "status": "failed" if r.error else "done",
         "error": r.error, "run_id": tracked.run_ids.get(Path(r.folder).name)} for r in tracked.results]}
    atomic_write_text(json.dumps(manifest, indent=2), batch_folder(settings.data_dir, grid.name) / "batch.json")
    return tracked
