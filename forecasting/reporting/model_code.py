"""The code MLflow logs for every hotspots model and runs to load one (see ``pyfunc_model``)."""

import mlflow

from forecasting.reporting.pyfunc_model import HotspotModel

mlflow.models.set_model(HotspotModel())
