"""Loading a champion costs the requests served beside it CPU: what never changes is read once per process
(MLflow's environment check per declared environment, a training run's parameters per run)."""

import shutil
from datetime import UTC, datetime
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from conftest import toronto_box_panel

import serving.models_store as models_store
from forecasting.baselines import Naive
from forecasting.reporting.tracking import HotspotModel


@pytest.fixture(scope="module")
def saved(toronto_incidents, tmp_path_factory):
    panel = toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 9, 1, tzinfo=UTC),
                              datetime(2019, 12, 1, tzinfo=UTC))[1]
    folder = tmp_path_factory.mktemp("pyfunc") / "v1"
    model = Naive(window_days=28).fit(panel, panel.end_shift - 1)
    mlflow.pyfunc.save_model(str(folder), python_model=HotspotModel(model), pip_requirements=["numpy"])
    return folder, panel, model


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
    monkeypatch.setattr(models_store, "_TRAINED", {})
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
