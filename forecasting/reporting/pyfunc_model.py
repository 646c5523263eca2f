"""The one MLflow pyfunc flavour of every forecaster, logged as code (MLflow's "models from code").

The model's code is this package's ``model_code.py``; the fitted forecaster travels beside it as an artifact
that :meth:`HotspotModel.load_context` loads, so MLflow never cloudpickles the wrapper. MLflow warns on every cloudpickled
model and its option ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` (on today) would, once off, refuse to load one. The
forecaster file is a pickle of the forecaster's own state (``Forecaster.__getstate__``: no training caches, the
LightGBM booster as text): load models only from a registry you trust, as with any MLflow model.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel  # mypy does not see mlflow.pyfunc's re-export

FORECASTER_ARTIFACT = "forecaster"
MODEL_CODE = Path(__file__).with_name("model_code.py")


class HotspotModel(PythonModel):
    """Its ``model_inputs`` rows in (feature rows for LightGBM, the count map for a baseline), expected counts
    out, through the forecaster's own ``predict_inputs``. The wrapped forecaster (``.forecaster``) also forecasts
    from a panel for the API (``predict_explained``)."""

    def __init__(self, forecaster=None):
        self.forecaster = forecaster

    def load_context(self, context) -> None:
        if self.forecaster is None:  # a model logged as code; a cloudpickled one (older versions) carries it
            # the registry's own model file (see the module's docstring)
            self.forecaster = pickle.loads(Path(context.artifacts[FORECASTER_ARTIFACT]).read_bytes())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return np.asarray(self.forecaster.predict_inputs(model_input), dtype=np.float64)


def pyfunc_arguments(forecaster, folder: Path) -> dict:
    """What ``mlflow.pyfunc.save_model`` / ``log_model`` take for ``forecaster``: the code file and the
    forecaster written into ``folder`` (which must outlive the call)."""
    path = folder / "forecaster.pkl"
    path.write_bytes(pickle.dumps(forecaster, protocol=5))
    return {"python_model": str(MODEL_CODE), "artifacts": {FORECASTER_ARTIFACT: str(path)}}
