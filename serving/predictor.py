"""Running a champion on one shift: expected counts of every cell now, explanations of chosen cells later.

A LightGBM forecaster's ``predict`` and ``contributions`` each build the shift's feature matrix (from the panel
cut at the shift: history before it only) and run the booster on it; here the matrix is built once and kept, the
booster predicts every cell, and ``pred_contrib`` runs later on the rows a response shows. Other forecasters go
through their public ``predict`` and ``contributions``.

Explanations run on a copy of the booster with a lock of its own: a LightGBM prediction re-initialises state of
its booster (the iteration count, tree depths for ``pred_contrib``), so calls on one booster are serialised, and
explaining a long list of cells must not hold up the cold forecasts of other shifts on the same model.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from features.matrix import build_features
from features.panel import CountPanel
from serving.explanations import RowsExplainer


_explainers: "weakref.WeakKeyDictionary[Any, tuple[Any, threading.Lock]]" = weakref.WeakKeyDictionary()
_explainers_guard = threading.Lock()


def _explainer(booster, iteration: int | None) -> tuple[Any, threading.Lock]:
    """The model's explanation booster (a copy, made once per model) and its lock."""
    with _explainers_guard:
        found = _explainers.get(booster)
        if found is None:
            import lightgbm

            found = (lightgbm.Booster(model_str=booster.model_to_string(num_iteration=iteration)), threading.Lock())
            _explainers[booster] = found
        return found


def predict_shift(forecaster, panel: CountPanel, shift_id: int) -> tuple[np.ndarray, RowsExplainer]:
    """Expected counts of every cell (the caller serialises calls per model), and a function explaining given
    cells (on the model's explanation booster, under its own lock)."""
    booster, config = getattr(forecaster, "booster_", None), getattr(forecaster, "features", None)
    if booster is not None and config is not None and getattr(forecaster, "columns_", None):
        X = build_features(panel.until(shift_id), shift_id, config).X
        iteration = forecaster.best_iteration_
        expected = np.asarray(booster.predict(X, num_iteration=iteration), dtype=np.float64).reshape(-1)
        names = list(forecaster.columns_) + ["bias"]

        def explain_rows(cells: np.ndarray) -> tuple[np.ndarray, list[str]]:
            explainer, explain_lock = _explainer(booster, iteration)
            with explain_lock:
                return explainer.predict(X[cells], num_iteration=iteration, pred_contrib=True), names

        return expected, explain_rows
    expected = np.asarray(forecaster.predict(panel, shift_id), dtype=np.float64).reshape(-1)
    contrib, names = forecaster.contributions(panel, shift_id)
    contrib = np.asarray(contrib, dtype=np.float64)
    return expected, lambda cells: (contrib[cells], list(names))
