"""Loading a champion costs the requests served beside it CPU: what never changes is read once per process
(MLflow's environment check per declared environment, a training run's parameters per run)."""

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from conftest import toronto_box_panel

import serving.models_store as models_store
from features.settings import Settings
from forecasting.baselines import Naive
from forecasting.reporting.pyfunc_model import HotspotModel, pyfunc_arguments
from forecasting.reporting.tracking import configure, log_model


@pytest.fixture(scope="module")
def saved(toronto_incidents, tmp_path_factory):
    panel = toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 9, 1, tzinfo=UTC),
                              datetime(2019, 12, 1, tzinfo=UTC))[1]
    folder = tmp_path_factory.mktemp("pyfunc") / "v1"
    model = Naive(window_days=28).fit(panel, panel.end_shift - 1)
    mlflow.pyfunc.save_model(str(folder), **pyfunc_arguments(model, folder.parent), pip_requirements=["numpy"])
    return folder, panel, model


def test_logging_a_model_pickles_no_wrapper_and_warns_of_none(saved, tmp_path, monkeypatch):
    """MLflow warns on every model whose wrapper it cloudpickles (every registration said so in the log until
    2026-12-01): a model logged as code is quiet, and its folder holds the code and the forecaster, no pickle of
    MLflow's."""
    _, panel, model = saved
    monkeypatch.delenv("HOTSPOTS_MLFLOW_TRACKING_URI", raising=False)
    configure(Settings(data_dir=tmp_path))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with mlflow.start_run():
            info = log_model(model, model.model_inputs(panel, panel.end_shift - 1).head(20), "toronto-test")
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "copy")))
    assert {p.name for p in folder.rglob("*")} >= {"model_code.py", "forecaster.pkl"}
    assert not (folder / "python_model.pkl").exists()
    forecaster = models_store._load_forecaster(folder)
    np.testing.assert_array_equal(forecaster.predict(panel, panel.end_shift - 1), model.predict(panel, panel.end_shift - 1))


def test_a_version_registered_before_models_as_code_still_loads(saved, tmp_path, monkeypatch):
    """Versions registered before 2026-12-01 are a cloudpickled ``forecasting.reporting.tracking.HotspotModel``
    carrying its forecaster: a registry keeps them, so the service must still load them."""
    _, panel, model = saved
    with monkeypatch.context() as then:  # the class as it was then: defined in tracking, so pickled by that name
        then.setattr(HotspotModel, "__module__", "forecasting.reporting.tracking")
        mlflow.pyfunc.save_model(str(tmp_path / "old"), python_model=HotspotModel(model), pip_requirements=["numpy"])
    assert b"forecasting.reporting.tracking" in (tmp_path / "old" / "python_model.pkl").read_bytes()
    # pickled by reference, as those versions were: loading finds the class under its old name
    assert type(mlflow.pyfunc.load_model(str(tmp_path / "old")).unwrap_python_model()) is HotspotModel
    forecaster = models_store._load_forecaster(tmp_path / "old")
    np.testing.assert_array_equal(forecaster.predict(panel, panel.end_shift - 1),
                                  model.predict(panel, panel.end_shift - 1))


def test_the_environment_check_runs_once_per_declared_environment(saved, tmp_path, monkeypatch):
    folder, panel, model = saved
    checks = []
    real = mlflow.pyfunc.warn_dependency_requirement_mismatches
    monkeypatch.setattr(mlflow.pyfunc, "warn_dependency_requirement_mismatches",
                        lambda requirements: checks.append(requirements) or real(requirements))
    monkeypatch.setattr(models_store, "_CHECKED_ENVIRONMENTS", set())
    second = tmp_path / "v2"  # another version of the same environment (a retrained champion)
    shutil.copytree(folder, second)
    other = tmp_path / "v3"  # a version declaring other packages
    shutil.copytree(folder, other)
    (other / "requirements.txt").write_text("numpy\npolars\n")

    loaded = [models_store._load_forecaster(f) for f in (folder, second, folder, other)]
    assert len(checks) == 2  # v1 (v2 and v1 again: the same environment), then v3
    expected = model.predict(panel, panel.end_shift - 1)
    for forecaster in loaded:  # each load is still a whole model
        np.testing.assert_array_equal(forecaster.predict(panel, panel.end_shift - 1), expected)


def test_a_runs_parameters_are_read_once_and_a_failure_is_not_kept(monkeypatch):
    assert 0 < models_store._TRAINED.size < 10_000  # bounded: a long-lived service sees a run per retrain
    monkeypatch.setattr(models_store, "_TRAINED", type(models_store._TRAINED)(2))
    calls = []

    class Client:
        fail = True

        def get_run(self, run_id):
            calls.append(run_id)
            if self.fail:
                raise ConnectionError("registry down")
            params = {"resolution": "9", "shift_starts": "06:00,14:00,22:00", "zero_rate": "0.05"}
            return SimpleNamespace(data=SimpleNamespace(params=params))

    client = Client()
    assert models_store._trained(client, "run-1") == {}  # unreachable: best effort, and asked again next time
    client.fail = False
    expected = {"resolution": "9", "shift_starts": "06:00,14:00,22:00"}
    assert models_store._trained(client, "run-1") == expected
    assert models_store._trained(client, "run-1") == expected
    assert calls == ["run-1", "run-1"]
    models_store._trained(client, "run-1")["resolution"] = "10"  # a caller's copy
    assert models_store._trained(client, "run-1") == expected
    for run in ("run-2", "run-3", "run-2", "run-3", "run-1"):  # the least recently used run is dropped, and asked again
        assert models_store._trained(client, run) == expected
    assert calls == ["run-1", "run-1", "run-2", "run-3", "run-1"]
