"""The pooled backtest, tracked: it runs on the cluster (or a local one), then this process (the client) writes
the report folder (``pooled.json``, ``pooled.md``, ``forecasts.parquet``) and logs one MLflow run, once."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl

from features.settings import Settings
from features.storelock import atomic_write_parquet, atomic_write_text
from forecasting.cluster import address_of
from forecasting.pooled import City, local_client
from forecasting.pooled_backtest import PooledBacktest, run_pooled_backtest
from forecasting.reporting.tracking import code_version, configure


def write_report(result: PooledBacktest, out: Path) -> None:
    """The table as JSON and Markdown, and the per-city forecasts of both models beside the observed counts."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"test_start": result.test_start, "test_end": result.test_end, "per_city": result.per_city,
               "params": result.params, "n_boot": result.n_boot, "refits": result.refits,
               "pooled_seconds": result.pooled_seconds, "per_city_seconds": result.per_city_seconds,
               "pooled_fits": result.fit_summaries, "cities": result.table()}
    atomic_write_text(json.dumps(payload, indent=2, default=str), out / "pooled.json")
    atomic_write_text(result.markdown(), out / "pooled.md")
    frames = []
    for c in result.cities:
        n_cells = c.observed.shape[1]
        frames.append(pl.DataFrame({"city": c.city, "shift_id": np.repeat(c.origins, n_cells),
                                    "cell": np.tile(np.arange(n_cells, dtype=np.int32), c.origins.size),
                                    "observed": c.observed.ravel(), "pooled": c.pooled_predictions.ravel(),
                                    "per_city": c.per_city_predictions.ravel()}))
    atomic_write_parquet(pl.concat(frames), out / "forecasts.parquet")


def log_pooled(result: PooledBacktest, out: Path, scheduler: str | None) -> str:
    """One MLflow run for the whole comparison: per-city hit rates, differences and verdicts."""
    metrics: dict[str, float] = {}
    for row in result.table():
        for key, value in row.items():
            if isinstance(value, float) and value == value:
                metrics[f"{row['city']}.{key}"] = value
    with mlflow.start_run(run_name=f"pooled-{result.test_start}-{result.test_end}") as run:
        mlflow.set_tags({"kind": "pooled", "code_version": code_version(),
                         "cities": ",".join(c.city for c in result.cities),
                         **{f"verdict.{c.city}": c.verdict for c in result.cities},
                         **({"dask_scheduler": scheduler} if scheduler else {})})
        mlflow.log_params({"test_start": result.test_start, "test_end": result.test_end, "per_city": result.per_city,
                           "n_boot": result.n_boot, "refits": result.refits, "params": json.dumps(result.params)})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), artifact_path="pooled")
    return run.info.run_id


def run_tracked_pooled(cities: list[City], settings: Settings, out: Path, test_start: date, test_end: date, *,
                       cluster: Any = None, workers: int = 2, params: dict[str, Any] | None = None,
                       n_boot: int = 1000, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> tuple[PooledBacktest, str]:
    """Run the pooled backtest on ``cluster`` (address or Client; else a LocalCluster of ``workers``), write the
    report folder ``out`` and log it to MLflow; returns the result and the run id."""
    with local_client(cluster, workers) as client:
        result = run_pooled_backtest(client, cities, test_start, test_end, params=params, n_boot=n_boot, seed=seed,
                                     progress=progress)
    write_report(result, out)
    configure(settings)
    return result, log_pooled(result, out, address_of(cluster) if cluster is not None else None)
