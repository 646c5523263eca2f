"""Per-cell explanations of a forecast: the top contributing features of each cell (none for forecasters
without explanations, such as the count maps).

LightGBM's ``pred_contrib`` costs about 1 ms per cell on a city model, so contributions are computed for the
cells a response shows, on first need, and kept; the input rows are released once every cell is explained.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

TOP_FEATURES = 3
RowsExplainer = Callable[[np.ndarray], tuple[np.ndarray, list[str]]]  # cells -> (contributions, feature names)


class Explanations:
    """The top contributing features of each cell of one forecast."""

    def __init__(self, n_cells: int, explain_rows: RowsExplainer):
        self._explain_rows: RowsExplainer | None = explain_rows
        self._done = np.zeros(n_cells, dtype=bool)
        self._index = np.zeros((n_cells, TOP_FEATURES), dtype=np.int32)
        self._value = np.zeros((n_cells, TOP_FEATURES), dtype=np.float64)
        self._names: list[str] = []
        self._lock = threading.Lock()

    def top(self, cells: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per cell (in the order given): (feature, contribution) pairs, largest |contribution| first."""
        cells = np.asarray(cells, dtype=np.int64)
        with self._lock:
            missing = np.unique(cells[~self._done[cells]])
            if missing.size:
                if self._explain_rows is None:  # released only once every cell is explained
                    raise RuntimeError("explanations: cells are missing but the input rows were released")
                contrib, names = self._explain_rows(missing)
                # a forecaster without explanations gives no columns: its cells carry no drivers
                contrib = np.asarray(contrib, dtype=np.float64).reshape(missing.size, len(names))
                if names and names[-1] == "bias":
                    contrib, names = contrib[:, :-1], list(names[:-1])
                top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :TOP_FEATURES]
                self._index[missing, : top.shape[1]] = top
                self._value[missing, : top.shape[1]] = np.take_along_axis(contrib, top, axis=1)
                self._names, self._done[missing] = list(names), True
                if self._done.all():
                    self._explain_rows = None
        width = min(TOP_FEATURES, len(self._names))
        names, index, value = self._names, self._index[cells, :width].tolist(), self._value[cells, :width].tolist()
        return [[(names[j], v) for j, v in zip(js, vs)] for js, vs in zip(index, value)]
