"""Running a champion on one shift: expected counts of every cell now, explanations of chosen cells later.

Every forecaster answers through its contract, ``predict_explained(panel, shift)``: the expected counts (from
the panel's history before the shift only) and an explanation whose rows are computed on demand, or None for
forecasters without explanations (count maps), whose cells then carry no drivers. Nothing here reads a
forecaster's internals, so any registered forecaster can be the champion.
"""

from __future__ import annotations

import threading

import numpy as np

from features.panel import CountPanel
from serving.explanations import RowsExplainer


def predict_shift(forecaster, panel: CountPanel, shift_id: int,
                  lock: threading.Lock) -> tuple[np.ndarray, RowsExplainer]:
    """Expected counts of every cell, and a function explaining given cells (under ``lock``: one model call
    per model at a time)."""
    expected, explanation = forecaster.predict_explained(panel, shift_id)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    if explanation is None:
        return expected, lambda cells: (np.zeros((np.asarray(cells).size, 0)), [])

    def explain_rows(cells: np.ndarray) -> tuple[np.ndarray, list[str]]:
        with lock:
            return explanation.rows(cells), list(explanation.names)

    return expected, explain_rows
