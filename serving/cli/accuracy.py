"""``hotspots accuracy CITY``: the realised-accuracy record of a city's served flags (from the service's audit
log and the city's panel), beside its backtest and strongest baseline, with the drift alarms; the same record
the model card and the transparency page show."""

from __future__ import annotations

from pathlib import Path

import typer

from serving.cli.common import DataDir, Resolution, console, fail, project_settings

app = typer.Typer()


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@app.command()
def accuracy(
    city: str = typer.Argument(..., help="City (source) name, as served."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON (the model card's `accuracy`)."),
    data_dir: Path | None = DataDir,
    resolution: int | None = Resolution,
) -> None:
    """Realised hit rate and PAI of the served flags per shift and rolling, against the backtest's interval and
    the strongest baseline; exit 1 when a drift alarm fired."""
    from serving.accuracy import AccuracyRecords
    from serving.db import Database
    from serving.models_store import ModelStore

    settings = project_settings(data_dir, resolution)
    try:
        db = Database.for_settings(settings)
    except RuntimeError as exc:
        fail(str(exc))
    try:
        models = ModelStore(settings)
        state = models.refresh().get(city)
        if state is None:
            known = ", ".join(sorted(models.cities())) or "none"
            fail(f"no panel for {city!r} under {models.panels_root} (cities: {known}): run `hotspots panel {city}`")
        if not state.ready:
            fail(f"{city} cannot be scored: {state.message or state.status}")
        record = AccuracyRecords(db, models, settings).try_record(city)
    finally:
        db.dispose()
    if record is None:
        fail(f"the accuracy record of {city} could not be computed (the reason is in the log above)")
    if as_json:
        console.print_json(record.model_dump_json())
    else:
        console.print(f"{city}: champion version {record.model_version}, category {record.category}, "
                      f"{record.scored_shifts} served shift(s) scored; baseline {record.baseline or '-'}",
                      soft_wrap=True, highlight=False)
        for w in (record.rolling, record.overall):
            label = f"last {w.days} days" if w.days else "every scored shift"
            console.print(f"  {label}: {w.n_shifts} shifts, {w.crimes:g} incidents, hit rate {_rate(w.hit_rate)}, "
                          f"PAI {_num(w.pai)}; baseline hit rate {_rate(w.baseline_hit_rate)}, PAI "
                          f"{_num(w.baseline_pai)}", soft_wrap=True, highlight=False)
        if record.backtest is not None:
            b = record.backtest
            console.print(f"  backtest {b.backtest} at {b.coverage:.1%} of the area: {b.forecaster} {_rate(b.hit_rate)} "
                          f"({_rate(b.hit_rate_low)} to {_rate(b.hit_rate_high)})"
                          + (f"; {b.baseline} {_rate(b.baseline_hit_rate)}" if b.baseline else ""),
                          soft_wrap=True, highlight=False)
        for alarm in record.drift:
            mark = "ALARM" if alarm.fired else "ok"
            console.print(f"  drift {alarm.kind}: {mark}: {alarm.reason}", soft_wrap=True, highlight=False, markup=False)
        if record.hint:
            console.print(f"  note: {record.hint}", soft_wrap=True, highlight=False, markup=False)
    if record.degraded:
        raise typer.Exit(1)
