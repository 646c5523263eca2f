"""MLflow tracking and registry: runs, the model flavour, and the champion promotion gate.

Embedded by default (SQLite store and a local artifact folder under the data folder); set
``HOTSPOTS_MLFLOW_TRACKING_URI`` to use a tracking server instead.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from features.settings import Settings
from forecasting.promotion import PromotionDecision
from forecasting.reporting.pyfunc_model import HotspotModel, pyfunc_arguments  # versions before 2026-12-01 name it here

EXPERIMENT = "hotspots"
CHAMPION = "champion"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def configure(settings: Settings, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        location = None if settings.mlflow_tracking_uri else settings.artifact_dir.as_uri()
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    return f"hotspots-{version('hotspots')}"


def registered_name(city: str) -> str:
    return f"hotspots-{city}"


def log_model(forecaster, sample: pd.DataFrame, city: str):
    """Log a fitted forecaster (any registered one) as a pyfunc logged as code, with a signature, and register it
    for the city. Training caches are not saved (``Forecaster.__getstate__``)."""
    signature = infer_signature(sample, HotspotModel(forecaster).predict(None, sample))
    with tempfile.TemporaryDirectory() as folder:
        return mlflow.pyfunc.log_model(
            name="model",
            **pyfunc_arguments(forecaster, Path(folder)),
            signature=signature,
            input_example=sample.head(5),
            registered_model_name=registered_name(city),
            pip_requirements=["lightgbm", "numpy", "pandas", "polars", "h3", "h3ronpy", "scipy", "pyarrow"],
        )


def apply_promotion(city: str, version: str, decision: PromotionDecision, run_id: str | None = None) -> None:
    """Record the decision on the model version; move the champion alias only when the gate passes."""
    client = MlflowClient()
    name = registered_name(city)
    client.set_model_version_tag(name, version, "promotion_decision", "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
    client.set_model_version_tag(name, version, "promotion_detail", json.dumps(decision.as_dict()))
    if run_id:
        client.set_model_version_tag(name, version, "backtest_run_id", run_id)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)


# Assessments of a model logged into its backtest run (or training run): the feedback-loop diagnostics, the
# bias audit and the patrol-log analysis. Each is a JSON payload at <name>/<name>.json plus an HTML section and
# a figure beside it, and flat metrics prefixed '<name>.'; the API's model card and /v1/diagnostics read them.
ASSESSMENTS = ("diagnostics", "bias_audit", "patrol_diagnostics", "patrol_overrides")


def log_assessment(name: str, payload: dict, metrics: dict[str, float], html: str | None = None,
                   png: bytes | None = None) -> None:
    """Log one assessment into the active run (re-running replaces the files; metrics keep their history).
    ``png``: the figure already rendered for the HTML section, logged as it is rather than drawn again."""
    if name not in ASSESSMENTS:
        raise ValueError(f"unknown assessment {name!r}; expected one of {', '.join(ASSESSMENTS)}")
    finite = {f"{name}.{key}"[:250]: float(value) for key, value in metrics.items()
              if value is not None and np.isfinite(float(value))}
    if finite:
        mlflow.log_metrics(finite)
    mlflow.log_dict(payload, f"{name}/{name}.json")
    if html is not None:
        mlflow.log_text(html, f"{name}/{name}.html")
    if png is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.png"
            path.write_bytes(png)
            mlflow.log_artifact(str(path), artifact_path=name)
    mlflow.set_tag(f"assessment.{name}", pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"))


def assessment_run_id(client: MlflowClient, city: str, version: str) -> str | None:
    """The run that holds a version's record: its backtest run when it was promoted by one, else its own run."""
    mv = client.get_model_version(registered_name(city), version)
    return (mv.tags or {}).get("backtest_run_id") or mv.run_id


def champion_version(city: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(registered_name(city), CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None
