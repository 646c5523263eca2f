"""The reporting layer: MLflow tracking, HTML reports and figures, the tracked runs users start.

It sits above the computation in ``forecasting`` and below ``serving``; nothing in ``forecasting`` imports it."""
