"""Every registered forecaster through the same checks: no leakage, shapes, determinism, explanations by
contract, pickle and MLflow pyfunc round trips, and the scikit-learn parameter round trip."""

import pickle
from dataclasses import replace
from datetime import UTC, datetime

import mlflow
import numpy as np
import polars as pl
import pytest
from conftest import toronto_box_panel

from features.matrix import FeatureConfig
from features.panel import CountPanel
from forecasting import registry
from forecasting.base import Explanation
from forecasting.reporting.pyfunc_model import pyfunc_arguments

# settings that keep each check in seconds (the registry's defaults are the production ones)
FAST = {"lightgbm": dict(train_days=240, valid_days=28, n_estimators=40, zero_rate=0.2, num_threads=1),
        "sepp": dict(fit_days=120),
        "blend": dict(model__train_days=240, model__valid_days=28, model__n_estimators=40, model__zero_rate=0.2,
                      model__num_threads=1)}


def make(name):
    return registry.make(name, **FAST.get(name, {}))


@pytest.fixture(scope="module")
def panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 1, 1, tzinfo=UTC),
                             datetime(2020, 3, 1, tzinfo=UTC))[1]


@pytest.fixture(scope="module")
def fitted(panel):
    cutoff = panel.end_shift - 30
    return {name: make(name).fit(panel, cutoff) for name in registry.names()}, cutoff


def poisoned_from(panel: CountPanel, shift: int) -> CountPanel:
    rows = panel.counts.with_columns(pl.when(pl.col("shift") >= shift).then(pl.col("count") * 50)
                                     .otherwise(pl.col("count")).alias("count"))
    return CountPanel(panel.study_area, panel.calendar, panel.categories, panel.first_shift, panel.end_shift, rows)


def test_the_registry_holds_the_forecasters_and_the_baselines():
    expected = {"lightgbm", "naive", "kde", "prospective", "sepp", "all_history", "last_year", "exp_weighted", "blend"}
    assert expected <= set(registry.names())
    assert "lightgbm" not in registry.baseline_names() and "all_history" in registry.baseline_names()
    assert "blend" not in registry.baseline_names() and "blend" not in registry.default_names()  # asked for by name
    assert all(name.replace("_", "").isalpha() and name.islower() for name in registry.names())  # metric-key safe
    with pytest.raises(KeyError, match="unknown forecaster 'nope'; choose from lightgbm"):
        registry.make("nope")


@pytest.mark.parametrize("name", registry.names())
def test_no_leakage_shapes_and_determinism(panel, fitted, name):
    models, cutoff = fitted
    model = models[name]
    origins = np.arange(cutoff, cutoff + 6)
    pred = model.predict(panel, origins)
    assert pred.shape == (6, panel.n_cells) and np.isfinite(pred).all() and (pred >= 0).all() and pred.sum() > 0
    # incidents at or after an origin never change its forecast, fitted or not
    for origin in (cutoff, cutoff + 4):
        np.testing.assert_array_equal(model.predict(poisoned_from(panel, origin), origin), model.predict(panel, origin))
    refit = make(name).fit(poisoned_from(panel, cutoff), cutoff)
    np.testing.assert_array_equal(refit.predict(panel, origins), pred)  # nothing after the cutoff reaches fit
    np.testing.assert_array_equal(make(name).fit(panel, cutoff).predict(panel, origins), pred)  # deterministic


@pytest.mark.parametrize("name", registry.names())
def test_predict_explained_is_the_contract(panel, fitted, name):
    models, cutoff = fitted
    model = models[name]
    expected, explanation = model.predict_explained(panel, cutoff + 2)
    np.testing.assert_allclose(expected, model.predict(panel, cutoff + 2)[0], rtol=1e-12)
    if explanation is None:
        assert not model.learned  # count maps answer plainly: no drivers
        return
    assert isinstance(explanation, Explanation)
    cells = np.array([0, 3, 5])
    rows = explanation.rows(cells)
    assert rows.shape == (3, len(explanation.names))
    np.testing.assert_allclose(np.exp(rows.sum(axis=1)), expected[cells], rtol=1e-4)  # log-scale contributions


@pytest.mark.parametrize("name", registry.names())
def test_pickle_and_pyfunc_round_trip(panel, fitted, name, tmp_path, monkeypatch):
    models, cutoff = fitted
    model = models[name]
    origins = np.arange(cutoff, cutoff + 3)
    state = model.__getstate__()
    assert not any(key in state for key in model.transient)  # no training caches travel with the model
    if name == "lightgbm":
        assert isinstance(state["booster_"], str) and state["booster_"].startswith("tree")  # LightGBM's text model
    back = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(back.predict(panel, origins), model.predict(panel, origins))
    mlflow.pyfunc.save_model(str(tmp_path / "m"), **pyfunc_arguments(model, tmp_path), pip_requirements=["lightgbm"])
    assert not (tmp_path / "m" / "python_model.pkl").exists()  # logged as code: MLflow pickles nothing
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # loads where MLflow refuses cloudpickle
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "m"))
    inputs = model.model_inputs(panel, cutoff)
    assert list(inputs.columns) == model.input_columns() and len(inputs) == panel.n_cells
    np.testing.assert_allclose(np.asarray(loaded.predict(inputs)), model.predict(panel, cutoff)[0], rtol=1e-6)
    served = loaded.unwrap_python_model().forecaster
    np.testing.assert_array_equal(served.predict_explained(panel, cutoff)[0], model.predict(panel, cutoff)[0])


@pytest.mark.parametrize("name", registry.names())
def test_params_round_trip(name):
    model = make(name)
    params = model.get_params(deep=True)
    shallow = model.get_params(deep=False)
    assert set(shallow) <= set(params)
    again = registry.make(name).set_params(**shallow)
    assert again.get_params(deep=True) == params
    assert pickle.loads(pickle.dumps(model)).get_params() == params
    with pytest.raises(ValueError, match="has no parameter 'nope'"):
        make(name).set_params(nope=1)


def test_nested_params_reach_the_feature_configuration():
    model = make("lightgbm")
    params = model.get_params(deep=True)
    assert params["features__window_days"] == FeatureConfig().window_days and "features__decay_days" in params
    model.set_params(features__window_days=(1, 7), learning_rate=0.2)
    assert model.features == replace(FeatureConfig(), window_days=(1, 7)) and model.learning_rate == 0.2
    assert model.get_params()["features__window_days"] == (1, 7)
