"""A new champion warms the recently asked shifts with as many explained cells as responses showed, so the first
request after a swap computes no contributions (about 1 ms a cell with LightGBM) on its own path."""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import toronto_box_panel

from forecasting.base import Explanation
from forecasting.baselines import Naive
from serving.forecasts import WARM_EXPLAINED, ForecastService
from serving.models_store import CityState, LoadedModel


@dataclass
class ExplainedNaive(Naive):
    """The naive map with per-cell explanations (each cell's own count), recording every cell it explains."""

    explained: list[int] = field(default_factory=list)

    def predict_explained(self, panel, origin):
        expected = self.predict(panel, origin)[0]

        def rows(cells: np.ndarray) -> np.ndarray:
            self.explained.extend(np.asarray(cells).tolist())
            return expected[np.asarray(cells)][:, None]

        return expected, Explanation(["count"], rows)


@pytest.fixture(scope="module")
def panel(toronto_incidents):
    return toronto_box_panel(toronto_incidents, (43.64, 43.67), (-79.41, -79.37), datetime(2019, 9, 1, tzinfo=UTC),
                             datetime(2020, 1, 1, tzinfo=UTC))[1]


def state(panel, version: str, forecaster) -> CityState:
    model = LoadedModel("hotspots-test", version, forecaster, "registry", None, datetime.now(UTC), Path("."))
    return CityState("test", "hotspots-test", Path("."), panel, "panel-1", model, "ready", None, True,
                     datetime.now(UTC))


def test_a_new_version_explains_as_many_cells_as_were_shown(panel):
    first, second = ExplainedNaive(window_days=28), ExplainedNaive(window_days=28)
    first.fit(panel, panel.end_shift - 10)
    second.fit(panel, panel.end_shift - 10)
    service = ForecastService(16)
    shown, quiet = panel.end_shift - 1, panel.end_shift - 2
    for shift in (quiet, shown):
        service.forecast(state(panel, "1", first), shift, "all")
    shown_forecast = service.cached(state(panel, "1", first), shown, "all")
    service.explaining(shown_forecast, 50)  # a k=50 response on version 1
    service.explaining(shown_forecast, 10)  # a smaller one later: the most cells shown count

    service.warm(state(panel, "2", second))  # what the model store does before swapping version 2 in

    warmed = {shift: service.cached(state(panel, "2", second), shift, "all") for shift in (shown, quiet)}
    assert all(f is not None and f.model.version == "2" for f in warmed.values())
    assert len(second.explained) == 50 + WARM_EXPLAINED  # each cell explained once, nothing on a request's path
    assert set(second.explained) == set(warmed[shown].order[:50].tolist()) | set(warmed[quiet].order[:WARM_EXPLAINED].tolist())
    before = len(second.explained)
    warmed[shown].top_features(warmed[shown].order[:50])  # the first k=50 request after the swap
    assert len(second.explained) == before
