"""One interface for every forecaster, LightGBM or baseline, so backtests, the claim test and the API treat
them alike (in the spirit of scikit-learn's estimator contract).

``fit(panel, until)`` learns from shifts strictly before ``until``; ``predict(panel, origins)`` returns the
expected count of every study-area cell for each origin shift, using only shifts before that origin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from features.matrix import cumulative, window_sums
from features.panel import CountPanel


class NotFittedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Explanation:
    """Why a forecast ranks cells as it does: ``rows(cells)`` gives each asked cell's additive contributions
    (columns ``names``), computed on demand because a whole city's explanations cost far more than the forecast."""

    names: list[str]
    rows: Callable[[np.ndarray], np.ndarray]


@dataclass
class Forecaster(ABC):
    """Base class. Subclasses are dataclasses whose fields are their hyper-parameters."""

    category: str | list[str] | None = None  # the target: one category, several, or all (None)
    fitted_until_: int | None = field(default=None, init=False, repr=False)

    name: str = field(default="forecaster", init=False, repr=False)
    # learned forecasters are candidates; the others are the traditional baselines the strongest is chosen from
    learned: ClassVar[bool] = False
    # attributes that are training caches, dropped when a fitted forecaster is pickled (registry, pyfunc)
    transient: ClassVar[tuple[str, ...]] = ()

    def fit(self, panel: CountPanel, until: int | None = None) -> Forecaster:
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
        """The hyper-parameters (shallow): what ``get_params(deep=False)`` returns."""
        return self.get_params(deep=False)

    # --- the scikit-learn parameter contract ---------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters; with ``deep``, nested dataclass parameters too as ``outer__inner`` (so the
        feature configuration is logged and set like any other parameter)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = value
            if deep and is_dataclass(value) and not isinstance(value, type):
                out.update({f"{f.name}__{k}": v for k, v in _dataclass_params(value).items()})
        return out

    def set_params(self, **params: Any) -> Forecaster:
        """Set parameters by name, nested ones as ``outer__inner``; unknown names raise a ValueError naming the
        valid ones."""
        valid = self.get_params(deep=False)
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            outer, sep, inner = key.partition("__")
            if outer not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {outer!r}; it has {', '.join(sorted(valid))}")
            if sep:
                nested.setdefault(outer, {})[inner] = value
            else:
                setattr(self, outer, value)
        for outer, values in nested.items():
            setattr(self, outer, replace(getattr(self, outer), **values))
        return self

    def __getstate__(self) -> dict:
        """Pickled state without training caches: a registered model carries what it needs to predict only."""
        state = dict(self.__dict__)
        for name in self.transient:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for f in fields(self):  # restore dropped caches as their empty defaults
            if f.name not in self.__dict__ and f.default_factory is not MISSING:
                self.__dict__[f.name] = f.default_factory()

    # --- what serving and the pyfunc flavour need ----------------------------------------------------
    def predict_explained(self, panel: CountPanel, origin: int) -> tuple[np.ndarray, Explanation | None]:
        """(expected count per cell for one origin, its explanation or None). Forecasters without explanations
        answer None: a map of counts has no per-cell drivers to show."""
        return self.predict(panel, origin)[0], None

    def input_columns(self) -> list[str]:
        """Columns of the pyfunc model's input frame."""
        return ["expected"]

    def model_inputs(self, panel: CountPanel, origin: int) -> pd.DataFrame:
        """The pyfunc input rows (one per cell) for one origin, from history before it. For a count map the
        input is the map itself, a statistic of past counts; learned models give their feature rows."""
        return pd.DataFrame({"expected": self.predict(panel, origin)[0]})

    def predict_inputs(self, frame: pd.DataFrame) -> np.ndarray:
        """Expected counts from :meth:`model_inputs` rows (what the pyfunc flavour's ``predict`` runs)."""
        missing = [c for c in self.input_columns() if c not in frame.columns]
        if missing:
            raise ValueError(f"model input lacks columns {missing}; {self.name} needs {self.input_columns()}")
        return frame["expected"].to_numpy(dtype=np.float64)

    def fit_summary(self) -> dict[str, float]:
        """Numbers a training run logs about the last fit (trees, rows, chosen settings); none by default."""
        return {}

    def feature_importance(self) -> dict[str, float] | None:
        """Gain per feature for learned models; None for forecasters without features."""
        return None

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


def _dataclass_params(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.init}
