"""The ``hotspots`` command line: one Typer app made of command groups that share only ``common``.

- ``data``: profiles, ingest, fetch, panel, features, prepare, quarantine, retention
- ``models``: train, backtest, claim, run
- ``assess``: diagnose, audit
- ``service``: serve, keys
- ``store``: verify
- ``batch``: batch (a backtest grid, one task per point)
- ``pooled``: pooled (a LightGBM pooled across cities vs each city's own)
- ``audit_log``: log verify (the service's audit and patrol hash chains)
- ``accuracy``: accuracy (the realised-accuracy record and drift alarms of a served city)
- ``profiles``: the ``profile`` sub-app (init, check): the profile assistant
- ``live``: update (fetch or drop folder -> store -> appended panel), retrain (latest months, gated promotion)
"""

from __future__ import annotations

import typer

from serving.cli import accuracy, assess, audit_log, batch, data, live, models, pooled, profiles, service, store

app = typer.Typer(help="Place-based crime hotspot forecasting on H3 cells and patrol shifts.", no_args_is_help=True)
for group in (data, models, assess, service, store, audit_log, live, batch, pooled, accuracy):
    app.add_typer(group.app)
app.add_typer(profiles.app, name="profile")

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
