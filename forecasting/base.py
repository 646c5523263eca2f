"""One interface for every forecaster, LightGBM or baseline, so backtests, the claim test and the API treat
them alike (in the spirit of scikit-learn's estimator contract).

``fit(panel, until)`` learns from shifts strictly before ``until``; ``predict(panel, origins)`` returns the
expected count of every study-area cell for each origin shift, using only shifts before that origin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from features.matrix import cumulative, window_sums
from features.panel import CountPanel


class NotFittedError(RuntimeError):
    pass


@dataclass
class Forecaster(ABC):
    """Base class. Subclasses are dataclasses whose fields are their hyper-parameters."""

    category: str | list[str] | None = None  # the target: one category, several, or all (None)
    fitted_until_: int | None = field(default=None, init=False, repr=False)

    name: str = field(default="forecaster", init=False, repr=False)

    def fit(self, panel: CountPanel, until: int | None = None) -> "Forecaster":
        """Learn from shifts [panel.first_shift, until). The panel is cut at ``until`` first, so nothing at or
        after it can reach the model."""
        until = panel.end_shift if until is None else int(until)
        self._fit(panel.until(until), until)
        self.fitted_until_ = until
        return self

    def predict(self, panel: CountPanel, origins: int | np.ndarray) -> np.ndarray:
        """Expected counts, shape (len(origins), n_cells), for each origin from history before it."""
        if self.fitted_until_ is None:
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        origins = np.atleast_1d(np.asarray(origins, dtype=np.int64))
        if np.any(np.diff(origins) <= 0):
            raise ValueError("origins must be strictly increasing")
        if origins[0] < panel.first_shift:
            raise ValueError(f"origin {int(origins[0])} precedes the panel's first shift {panel.first_shift}")
        # history for origin t stops at t: cut the panel at the last origin, windows do the rest
        out = self._predict(panel.until(int(origins[-1])), origins)
        return np.asarray(out, dtype=np.float64).reshape(origins.size, panel.n_cells)

    def params(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_") and not k.startswith("_") and k != "name"}

    @abstractmethod
    def _fit(self, panel: CountPanel, until: int) -> None: ...

    @abstractmethod
    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray: ...


def window_counts(panel: CountPanel, origins: np.ndarray, shifts: int, category=None) -> np.ndarray:
    """Counts over [o - shifts, o) per origin and cell, from one dense block and a cumulative sum."""
    lo = max(panel.first_shift, int(origins[0]) - shifts)
    hi = int(origins[-1])
    dense = panel.dense(lo, hi, category=category, dtype=np.float64)
    return window_sums(cumulative(dense), origins - lo, shifts)
