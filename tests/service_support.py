"""Building blocks for service tests: a small real Toronto panel, a quickly trained LightGBM registered in an
embedded MLflow registry and promoted to champion, and MLflow's process-wide URIs kept out of the way."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from conftest import built_once, session_tmp_path_factory, toronto_box_panel
from mlflow.tracking import MlflowClient

from features.matrix import build_features
from features.panel import CountPanel
from features.paths import DataPaths
from features.settings import Settings
from forecasting.lgbm import LightGBMForecaster
from forecasting.promotion import PromotionDecision
from forecasting.reporting.tracking import apply_promotion, configure, log_model, registered_name
from serving.keys import Role

CITY = "toronto-mci"
BARE = "bare-city"  # a panel with no registered model
PASS = PromotionDecision(True, "beats naive at 1% and 5%", {"0.01": 0.2, "0.05": 0.4}, {"0.01": 0.1, "0.05": 0.3})
# the test panel: central Toronto, 2019-01-01 .. 2020-03-01 (UTC)
BOX = ((43.64, 43.67), (-79.41, -79.37))
PANEL_START = datetime(2019, 1, 1, tzinfo=UTC)
PANEL_END = datetime(2020, 3, 1, tzinfo=UTC)


def quick_lgbm(seed: int = 0) -> LightGBMForecaster:
    # uniform zeros: the served test champion the service tests' expectations (realised accuracy against its
    # interval, the briefing's top cell) were written for; the sampling itself is tested in test_lgbm_speed.py
    return LightGBMForecaster(train_days=240, valid_days=28, n_estimators=40, zero_sampling="uniform", zero_rate=0.2,
                              num_threads=1, seed=seed)


def closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


free_port = closed_port  # bound then released: free for a server to take

DECOY = f"http://127.0.0.1:{closed_port()}"


def register(settings, model, panel, promote: bool, params: dict | None = None) -> str:
    """Log and register with MLflow's process-wide URIs pointing at the test registry, then point them at a
    dead server: the service must use its own settings, never MLflow's globals."""
    configure(settings)
    mlflow.set_registry_uri(settings.tracking_uri)
    try:
        with mlflow.start_run(run_name="api-test"):
            mlflow.log_params(params or {})
            sample = build_features(panel, panel.end_shift - 1, model.features).frame().drop("origin", "cell").head(20)
            version = str(log_model(model, sample.to_pandas(), CITY).registered_model_version)
        if promote:
            apply_promotion(CITY, version, PASS)
    finally:
        mlflow.set_tracking_uri(DECOY)
        mlflow.set_registry_uri(DECOY)
    return version


def set_champion(settings, version: str) -> None:
    MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri).set_registered_model_alias(
        registered_name(CITY), "champion", version)


@contextmanager
def isolated_mlflow_env() -> Iterator[pytest.MonkeyPatch]:
    """Clear HOTSPOTS_* overrides and restore MLflow's exported URIs afterwards (monkeypatch does not record
    variables that were absent, and mlflow.set_*_uri exports them)."""
    env = pytest.MonkeyPatch()
    for name in ("HOTSPOTS_MLFLOW_TRACKING_URI", "HOTSPOTS_H3_RESOLUTION", "HOTSPOTS_SHIFT_STARTS",
                 "HOTSPOTS_DATABASE_URL"):
        env.delenv(name, raising=False)
    exported = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead registry fails at once
    env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    try:
        yield env
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for name, value in exported.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        env.undo()


_TEMPLATES: dict[int, SimpleNamespace] = {}


def _served_city_template(incidents) -> SimpleNamespace:
    """The panel, the trained model and a registry holding it as champion: creating an MLflow store and training
    are the slow parts of every service test module, so they are built once per test session (the first process
    that needs them builds, the other xdist workers wait and read) and each module gets a copy."""
    key = id(incidents)
    if key not in _TEMPLATES:
        def build(root: Path) -> None:
            settings = Settings(data_dir=root / "data")
            _, panel = toronto_box_panel(incidents, *BOX, PANEL_START, PANEL_END)
            panel.save(DataPaths(settings).panel(CITY))
            panel.save(DataPaths(settings).panel(BARE))
            model = quick_lgbm().fit(panel)
            (root / "version").write_text(register(settings, model, panel, promote=True))
            (root / "model.pkl").write_bytes(pickle.dumps(model))

        root = built_once(session_tmp_path_factory(), "served-city", build)
        settings = Settings(data_dir=root / "data")
        # as in the process that registered it: MLflow's process-wide URIs point at a dead server
        mlflow.set_tracking_uri(DECOY)
        mlflow.set_registry_uri(DECOY)
        _TEMPLATES[key] = SimpleNamespace(settings=settings, panel=CountPanel.load(DataPaths(settings).panel(CITY)),
                                          model=pickle.loads((root / "model.pkl").read_bytes()),
                                          version=(root / "version").read_text())
    return _TEMPLATES[key]


def served_city(incidents, root) -> SimpleNamespace:
    """Data folder with the Toronto test panel (and a bare city) and a registered, promoted champion: a copy of
    the process's template, so a module may change its registry or files without touching another's. (Run
    artifacts stay in the template's folder, where the copied registry points; new runs get new ids there.)"""
    template = _served_city_template(incidents)
    shutil.copytree(template.settings.data_dir, root / "data")
    settings = template.settings.model_copy(update={"data_dir": root / "data"})
    return SimpleNamespace(settings=settings, panel=template.panel, model=template.model, version=template.version)


@contextmanager
def asgi_service(incidents, root, before_start=None) -> Iterator[SimpleNamespace]:
    """The service on ``served_city``'s data folder through the ASGI test client, with a key for every role;
    ``before_start(city)`` may add to the data folder or the registry first."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    with isolated_mlflow_env():
        city = served_city(incidents, root)
        if before_start is not None:
            before_start(city)
        app = create_app(city.settings.model_copy(update=dict(model_refresh_seconds=3600)))
        keys = {role: app.state.keys.create_key(role, f"test {role.value}") for role in Role}
        with TestClient(app) as client:
            yield SimpleNamespace(client=client, app=app, keys=keys, **vars(city))


def colour_stats(pixels: np.ndarray) -> tuple[int, float]:
    """(distinct colours, share of pixels that are not the most common colour). Each colour is packed into one
    integer (0xRRGGBB): np.unique over 2 M pixel rows (axis=0) took 4.5 CPU-s a page, over the integers 0.05 s."""
    flat = pixels.reshape(-1, 3).astype(np.uint32)
    colours, counts = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2], return_counts=True)
    return len(colours), 1 - counts.max() / flat.shape[0]


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """A Prometheus exposition parsed by prometheus_client: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def get(svc, path, role: Role | None = Role.planner, **params):
    """GET with the key of ``role`` (None: no key)."""
    headers = {"X-API-Key": svc.keys[role]} if role is not None else {}
    return svc.client.get(path, params=params, headers=headers)


def problem(response, field: str) -> str:
    """The 422 message for ``field`` (asserting it names the field)."""
    assert response.status_code == 422, response.text
    found = [p for p in response.json()["detail"] if p["field"] == field]
    assert found, response.json()
    assert found[0]["msg"].startswith(f"{field}:") and found[0]["loc"][-1] == field
    return found[0]["msg"]


def start_databases_together(url: str, workers: int = 4) -> tuple[list, list[BaseException]]:
    """Open ``workers`` Database objects on one URL at once (threads standing in for uvicorn workers)."""
    import threading

    from serving.db import Database

    databases, errors = [], []

    def start():
        try:
            databases.append(Database(url))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return databases, errors


@contextmanager
def panel_only_service(incidents, root, now, label: str = "test") -> Iterator[SimpleNamespace]:
    """The service on a data folder holding only the test panel (no model: enough for keys, audit and patrols),
    its clock fixed at ``now``. Settings (database URL included) come from the environment the caller set."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.dependencies import get_now

    settings = Settings(data_dir=root / "data")
    _, panel = toronto_box_panel(incidents, *BOX, PANEL_START, PANEL_END)
    panel.save(DataPaths(settings).panel(CITY))
    app = create_app(settings.model_copy(update=dict(model_refresh_seconds=3600)))
    app.dependency_overrides[get_now] = lambda: now
    keys = {role: app.state.keys.create_key(role, f"{label} {role.value}") for role in Role}
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, app=app, keys=keys, settings=settings, panel=panel,
                              cells=panel.study_area.h3_ids)
