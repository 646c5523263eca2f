"""A learned model blended with a long-history count map: a weighted geometric mean, the weight chosen in ``fit``.

forecast = model ** w * (baseline + floor) ** (1 - w). The geometric mean keeps the learned model's log-scale
explanations additive (the baseline enters as one more contribution, ``(1 - w) * log(baseline + floor)``) and
lets a stable count map temper the model's noise in the top-ranked cells. ``floor`` (half an incident over the
history, per shift) keeps never-hit cells finite.

The weight is chosen on the ``weight_days`` before the cutoff, from the grid ``weights``, by the mean hit rate at
the headline coverages. Both parts are fitted once, at the cutoff: the learned model's forecasts of those weeks
are out of its training rows as long as ``weight_days`` is within the learned model's own held-out window
(LightGBM's ``valid_days``, 56 by default), and the count map only reads history before each shift. The period
being forecast is never seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from features.panel import CountPanel
from forecasting.base import Explanation, Forecaster, NotFittedError
from forecasting.baselines import HistoryCounts
from forecasting.lgbm import LightGBMForecaster
from forecasting.metrics import HEADLINE_COVERAGES, pooled, shift_hits


@dataclass
class Blend(Forecaster):
    model: Forecaster = field(default_factory=LightGBMForecaster)
    baseline: Forecaster = field(default_factory=lambda: HistoryCounts(window_days=None))
    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # of the learned model
    weight_days: int = 28
    name: str = field(default="blend", init=False, repr=False)
    weight_: float = field(default=1.0, init=False, repr=False)
    floor_: float = field(default=0.0, init=False, repr=False)
    validation_: dict = field(default_factory=dict, init=False, repr=False)
    learned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.category is not None:  # one target for both parts
            self.model.category = self.baseline.category = self.category

    def _fit(self, panel: CountPanel, until: int) -> None:
        per_day = panel.calendar.per_day
        origins = np.arange(until - self.weight_days * per_day, until)
        if origins.size < per_day or origins[0] < panel.first_shift + per_day:
            raise ValueError(f"not enough history before shift {until} to choose the blend weight on "
                             f"weight_days={self.weight_days} days: give a longer panel or fewer weight_days")
        self.model.fit(panel, until)
        self.baseline.fit(panel, until)
        self.floor_ = 0.5 / max(until - panel.first_shift, 1)
        learned, counts = self.model.predict(panel, origins), self.baseline.predict(panel, origins)
        observed = panel.dense(int(origins[0]), until, self.category, dtype=np.float64)
        areas = panel.study_area.areas_km2
        scores = {}
        for w in self.weights:
            hits = shift_hits(self._mix(learned, counts, w), observed, areas, origins, HEADLINE_COVERAGES)
            scores[float(w)] = float(np.mean(pooled(hits)["hit_rate"]))
        # ties go to the larger model weight (the grid's later entries): the learned model is the default
        self.weight_ = max(scores, key=lambda w: (scores[w], w))
        self.validation_ = scores

    def _mix(self, learned: np.ndarray, counts: np.ndarray, w: float) -> np.ndarray:
        return np.exp(w * np.log(np.maximum(learned, 1e-12)) + (1 - w) * np.log(counts + self.floor_))

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        return self._mix(self.model.predict(panel, origins), self.baseline.predict(panel, origins), self.weight_)

    def predict_explained(self, panel: CountPanel, origin: int) -> tuple[np.ndarray, Explanation | None]:
        """The learned model's log-scale contributions times w, plus the count map's share as one column."""
        if self.fitted_until_ is None:
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        learned, inner = self.model.predict_explained(panel, origin)
        counts = self.baseline.predict(panel, origin)[0]
        expected = self._mix(np.asarray(learned), counts, self.weight_)
        if inner is None:
            return expected, None
        w = self.weight_
        share = (1 - w) * np.log(counts + self.floor_)

        def rows(cells: np.ndarray) -> np.ndarray:
            cells = np.asarray(cells)
            return np.column_stack([w * inner.rows(cells), share[cells]])

        return expected, Explanation(list(inner.names) + [f"blend_{self.baseline.name}"], rows)

    def fit_summary(self) -> dict[str, float]:
        return {**{f"model_{k}": v for k, v in self.model.fit_summary().items()}, "blend_weight": self.weight_}

    def feature_importance(self) -> dict[str, float] | None:
        return self.model.feature_importance()
