"""Running a champion on one shift: expected counts of every cell now, explanations of chosen cells later.

A LightGBM forecaster's ``predict`` and ``contributions`` each build the shift's feature matrix (from the panel
cut at the shift: history before it only) and run the booster on it; here the matrix is built once and kept, the
booster predicts every cell, and ``pred_contrib`` runs later on the rows a response shows. Other forecasters go
through their public ``predict`` and ``contributions``.
"""

from __future__ import annotations

import threading

import numpy as np

from features.matrix import build_features
from features.panel import CountPanel
from serving.explanations import RowsExplainer


def predict_shift(forecaster, panel: CountPanel, shift_id: int,
                  lock: threading.Lock) -> tuple[np.ndarray, RowsExplainer]:
    """Expected counts of every cell, and a function explaining given cells (under ``lock``: one LightGBM call
    per model at a time)."""
    booster, config = getattr(forecaster, "booster_", None), getattr(forecaster, "features", None)
    if booster is not None and config is not None and getattr(forecaster, "columns_", None):
        X = build_features(panel.until(shift_id), shift_id, config).X
        iteration = forecaster.best_iteration_
        expected = np.asarray(booster.predict(X, num_iteration=iteration), dtype=np.float64).reshape(-1)
        names = list(forecaster.columns_) + ["bias"]

        def explain_rows(cells: np.ndarray) -> tuple[np.ndarray, list[str]]:
            with lock:
                return booster.predict(X[cells], num_iteration=iteration, pred_contrib=True), names

        return expected, explain_rows
    expected = np.asarray(forecaster.predict(panel, shift_id), dtype=np.float64).reshape(-1)
    contrib, names = forecaster.contributions(panel, shift_id)
    contrib = np.asarray(contrib, dtype=np.float64)
    return expected, lambda cells: (contrib[cells], list(names))
