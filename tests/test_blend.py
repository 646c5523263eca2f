"""The blend of a learned model and a count map: the geometric mix, the weight chosen before the cutoff."""

from datetime import UTC, datetime

import numpy as np
import pytest
from conftest import toronto_box_panel

from forecasting.baselines import HistoryCounts
from forecasting.blend import Blend
from forecasting.lgbm import LightGBMForecaster


def small_lgbm():
    return LightGBMForecaster(train_days=240, valid_days=28, n_estimators=40, zero_rate=0.2, num_threads=1)


@pytest.fixture(scope="module")
def panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2018, 1, 1, tzinfo=UTC),
                             datetime(2020, 3, 1, tzinfo=UTC))[1]


def test_blend_is_the_weighted_geometric_mean(panel):
    cutoff = panel.end_shift - 30
    origins = np.arange(cutoff, cutoff + 5)
    blend = Blend(model=small_lgbm(), weights=(0.0, 0.5, 1.0)).fit(panel, cutoff)
    assert blend.weight_ in (0.0, 0.5, 1.0) and set(blend.validation_) == {0.0, 0.5, 1.0}
    assert blend.weight_ == max(blend.validation_, key=lambda w: (blend.validation_[w], w))
    learned = small_lgbm().fit(panel, cutoff).predict(panel, origins)
    counts = HistoryCounts().fit(panel, cutoff).predict(panel, origins)
    w, floor = blend.weight_, blend.floor_
    assert floor == pytest.approx(0.5 / (cutoff - panel.first_shift))
    np.testing.assert_allclose(blend.predict(panel, origins), learned**w * (counts + floor) ** (1 - w), rtol=1e-9)
    assert blend.fit_summary()["blend_weight"] == w


def test_fixed_weights_give_either_part(panel):
    cutoff = panel.end_shift - 30
    origins = np.arange(cutoff, cutoff + 3)
    only_model = Blend(model=small_lgbm(), weights=(1.0,)).fit(panel, cutoff)
    np.testing.assert_allclose(only_model.predict(panel, origins), small_lgbm().fit(panel, cutoff).predict(panel, origins))
    only_map = Blend(model=small_lgbm(), weights=(0.0,)).fit(panel, cutoff)
    counts = HistoryCounts().fit(panel, cutoff).predict(panel, origins)
    np.testing.assert_allclose(only_map.predict(panel, origins), counts + only_map.floor_)
    _, explanation = only_map.predict_explained(panel, cutoff)
    assert explanation is not None and explanation.names[-1] == "blend_all_history"


def test_too_little_history_for_the_weight_is_a_clear_error(panel):
    with pytest.raises(ValueError, match="weight_days"):
        Blend(model=small_lgbm(), weight_days=10_000).fit(panel, panel.end_shift - 30)
