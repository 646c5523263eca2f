"""Served forecasts read one origin's feature matrix shared by model versions (features/origin_features.py):
a new champion version warmed on the recently asked shifts, or an alias moved back, does not rebuild them."""

import pickle
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import toronto_box_panel

from features import origin_features
from features.matrix import FeatureConfig, build_features
from features.origin_features import features_at
from forecasting.lgbm import LightGBMForecaster


@pytest.fixture(scope="module")
def panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 1, 1, tzinfo=UTC),
                             datetime(2019, 9, 1, tzinfo=UTC))[1]


@pytest.fixture
def builds(monkeypatch):
    """The origins whose matrices were built (not read from the cache)."""
    built: list[tuple[int, int]] = []
    real = origin_features.build_features

    def counting(view, origin, config):
        built.append((origin, view.end_shift))
        return real(view, origin, config)

    origin_features.clear()
    monkeypatch.setattr(origin_features, "build_features", counting)
    yield built
    origin_features.clear()


def test_two_versions_of_a_model_share_the_origin_and_forecast_as_without_the_cache(panel, builds):
    cutoff = panel.end_shift - 12
    first = LightGBMForecaster(train_days=120, valid_days=28, n_estimators=20, zero_rate=0.2, num_threads=1)
    first.fit(panel, cutoff)
    second = pickle.loads(pickle.dumps(first))  # another version, unpickled by the service as a new object
    origin = cutoff + 3
    expected_first, _ = first.predict_explained(panel, origin)
    expected_second, explanation = second.predict_explained(panel, origin)
    assert builds == [(origin, origin)]  # one build for both versions
    # the same forecast as the batch path, which builds its own matrix
    np.testing.assert_array_equal(expected_first, first.predict(panel, origin)[0])
    np.testing.assert_array_equal(expected_second, expected_first)
    cells = np.array([0, 5, 7])
    assert np.asarray(explanation.rows(cells)).shape == (3, len(first.input_columns()) + 1)
    matrix = features_at(panel, origin, first.features)
    assert not matrix.X.flags.writeable  # shared: nobody may write into it
    np.testing.assert_array_equal(matrix.X, build_features(panel.until(origin), origin, first.features).X)
    assert builds == [(origin, origin)]


def test_a_reloaded_panel_another_configuration_or_a_shorter_view_builds_anew(panel, builds):
    origin, config = panel.end_shift - 2, FeatureConfig()
    features_at(panel, origin, config)
    features_at(panel.until(origin + 1), origin, config)  # a view of the same panel that reaches the origin
    assert builds == [(origin, origin)]
    features_at(replace(panel, lineage="reloaded"), origin, config)  # a reloaded or updated panel
    features_at(panel, origin, FeatureConfig(include_location=False))
    shorter = features_at(panel.until(origin - 5), origin, config)  # history stops 5 shifts before the origin
    assert builds == [(origin, origin), (origin, origin), (origin, origin), (origin, origin - 5)]
    np.testing.assert_array_equal(shorter.X, build_features(panel.until(origin - 5), origin, config).X)
