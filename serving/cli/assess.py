"""``hotspots diagnose`` and ``hotspots audit``: assess a backtested model on demand and log the figures into
its MLflow run, where the model card and ``/v1/diagnostics`` read them."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import typer

from features.paths import DataPaths
from forecasting.metrics import HEADLINE_COVERAGES
from serving.cli.common import DataDir, console, fail, load_panel, project_settings, stage

app = typer.Typer()


def _backtest(settings, city: str, backtest_dir: Path | None, resolution: int | None):
    """The saved backtest (the latest, unless named) and the panel at the resolution it was made with."""
    from forecasting.saved import SavedBacktest

    try:
        saved = SavedBacktest.load(backtest_dir or DataPaths(settings).latest_backtest(city, resolution))
    except FileNotFoundError as exc:
        fail(str(exc))
    if saved.resolution is not None:
        settings = settings.model_copy(update={"h3_resolution": saved.resolution})
    panel = load_panel(settings, city)
    try:
        saved.check(panel)
    except ValueError as exc:
        fail(str(exc))
    return saved, panel


def _pair(saved, model: str | None, baseline: str | None) -> tuple[str, str | None]:
    """The forecasters named, else the backtest's own winner and strongest baseline."""
    try:
        return saved.assessed_pair(model, baseline)
    except ValueError as exc:
        fail(f"{exc}; e.g. --model NAME --baseline NAME")


def _run_id(settings, city: str, saved) -> str:
    """The backtest's own run; folders from before run.json existed fall back to the champion's record."""
    from mlflow.tracking import MlflowClient

    from forecasting.reporting.tracking import CHAMPION, assessment_run_id, registered_name

    if saved.run_id:
        return saved.run_id
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    try:
        version = client.get_model_version_by_alias(registered_name(city), CHAMPION).version
    except Exception:  # noqa: BLE001
        fail(f"{saved.out_dir} names no MLflow run and {city} has no champion: run `hotspots backtest {city}`")

    console.print(f"[yellow]{saved.out_dir} names no run: logging into champion version {version}'s record[/]")
    run_id = assessment_run_id(client, city, str(version))
    if run_id is None:
        fail(f"champion version {version} of {city} has no MLflow run to log into: run `hotspots backtest {city}`")
    return run_id


def _patrol_forecasts(settings, city: str, panel, patrols, saved, model: str):
    """(origins, expected, observed) for the patrol analysis: the backtest's own forecasts when patrols were
    logged in its test period, else the champion's forecasts for the logged shifts the panel has counts for."""
    import mlflow
    import numpy as np

    from forecasting.reporting.tracking import CHAMPION, registered_name

    logged = np.unique(patrols["shift_id"].to_numpy())
    inside = np.isin(saved.origins, logged)
    if inside.any():
        return saved.origins[inside], saved.predictions[model][inside], saved.observed[inside], f"backtest {model}"
    origins = logged[(logged > panel.first_shift) & (logged < panel.end_shift)]
    if origins.size == 0:
        return None
    mlflow.set_registry_uri(settings.tracking_uri)
    champion = mlflow.pyfunc.load_model(f"models:/{registered_name(city)}@{CHAMPION}").unwrap_python_model().forecaster
    expected = np.asarray(champion.predict(panel, origins), dtype=np.float64).reshape(origins.size, -1)
    observed = panel.dense(int(origins[0]), int(origins[-1]) + 1)[origins - origins[0]]
    return origins, expected, observed, "champion"


HEADLINE = {"gini": "Gini of flag counts", "share_ever_flagged": "share of cells ever flagged",
            "jaccard_mean": "Jaccard, consecutive shifts", "jaccard_day_mean": "Jaccard, same shift next day",
            "run_days_mean": "mean days a cell stays flagged", "tie_share": "flags decided by ties"}


def _print_diagnostics(diag, coverages) -> None:
    from rich.table import Table

    metrics = diag.to_dict()
    table = Table("measure", *[f"{name} {c:.0%}" for c in coverages for name in (diag.model, diag.baseline) if name])
    for key, label in HEADLINE.items():
        cells = []
        for c in coverages:
            tag = f"{c * 100:g}pct"
            cells.append(metrics.get(f"diag.{key}.{tag}"))
            if diag.baseline:
                cells.append(metrics.get(f"diag.baseline.{key}.{tag}"))
        table.add_row(label, *["n/a" if v is None else f"{v:.3f}" for v in cells])
    console.print(table)
    if "diag.gain_lagged_share" in metrics:
        console.print(f"share of {diag.model}'s gain from lagged counts: {metrics['diag.gain_lagged_share']:.1%}")


@app.command()
def diagnose(
    city: str = typer.Argument(..., help="City (source) with a backtest."),
    backtest_dir: Path | None = typer.Option(None, help="A backtest folder (default: the latest for the city)."),
    coverage: list[float] = typer.Option(list(HEADLINE_COVERAGES), help="Area coverages whose flags are diagnosed."),
    model: str | None = typer.Option(None, help="The backtested forecaster to diagnose (default: the backtest's "
                                               "winner; the learned candidate when the strongest baseline won)."),
    baseline: str | None = typer.Option(None, help="The forecaster it is compared with (default: the backtest's "
                                                   "strongest baseline)."),
    resolution: int | None = typer.Option(None, help="Resolution of the backtest (default: the latest at any)."),
    data_dir: Path | None = DataDir,
) -> None:
    """Feedback-loop diagnostics of the backtested model (concentration, churn, how long cells stay flagged,
    gain from lagged counts) and, when planners recorded patrols, recorded crime by patrol dose."""
    import mlflow

    from forecasting.assessment import run_diagnostics
    from forecasting.patrol_dose import override_summary, patrol_diagnostics
    from forecasting.reporting.assess import log_diagnostics
    from forecasting.reporting.tracking import configure, log_assessment
    from serving.db import Database
    from serving.patrols import PatrolLog, patrol_log

    settings = project_settings(data_dir)
    saved, panel = _backtest(settings, city, backtest_dir, resolution)
    model, baseline = _pair(saved, model, baseline)
    against = f"against {baseline}" if baseline else "alone (it is the strongest baseline)"
    with stage(f"diagnostics of {model} {against} in {saved.out_dir.name}"):
        try:
            diag = run_diagnostics(saved.predictions, saved.observed, saved.areas, saved.origins, panel,
                                   saved.importance_of(model), coverages=tuple(coverage), model=model,
                                   baseline=baseline)
        except KeyError as exc:
            fail(str(exc.args[0]))
    db = Database.for_settings(settings)
    try:
        patrols = patrol_log(db, city)
        overrides = PatrolLog(db).overrides(city)
    finally:
        db.dispose()
    oversight = override_summary(overrides, patrols) if overrides.height else None
    patrol = None
    if patrols.height:
        forecasts = _patrol_forecasts(settings, city, panel, patrols, saved, model)
        if forecasts is None:
            console.print(f"{patrols.height:,} patrol rows, none in a shift the panel has counts for: rebuild the "
                          f"panel with newer incidents (`hotspots ingest` + `hotspots panel`) to analyse them")
        else:
            *arrays, source = forecasts
            with stage(f"patrol-dose analysis ({patrols.height:,} patrol rows, {source} forecasts as control)"):
                patrol = patrol_diagnostics(patrols, panel, *arrays)
    configure(settings)
    with mlflow.start_run(run_id=_run_id(settings, city, saved)) as run:
        log_diagnostics(diag, saved.out_dir)
        if patrol is not None:
            log_assessment("patrol_diagnostics", patrol.payload(), patrol.metrics())
        if oversight is not None:
            log_assessment("patrol_overrides", oversight.payload(), oversight.metrics())
    _print_diagnostics(diag, coverage)
    if patrol is None:
        console.print("no patrol-dose analysis: no patrols recorded for shifts the panel has counts for")
    else:
        for key, value in sorted(patrol.metrics().items()):
            console.print(f"patrol {key}: {value:.3f}")
    if oversight is not None:
        console.print(f"flags not patrolled: {oversight.not_patrolled:,} of {oversight.flags:,} "
                      f"({oversight.share_not_patrolled:.1%}; flags = {oversight.flags_source})")
        for row in oversight.by_reason.iter_rows(named=True):
            reason = row["reason"] + (f" ({row['code']})" if row["code"] else "")
            console.print(f"  {reason}: {row['count']:,} ({row['share_of_flags']:.1%} of flags)")
    console.print(f"logged into MLflow run {run.info.run_id}; report: {saved.out_dir / 'diagnostics.html'}")


@app.command()
def audit(
    city: str = typer.Argument(..., help="City (source) with a backtest."),
    preset: str | None = typer.Option(None, help="A shipped area layer: chicago-community-areas, toronto-neighbourhoods."),
    layer_file: Path | None = typer.Option(None, "--layer-config", help="TOML describing any city's area layer "
                                              "(path, layer, groups, total, table, key, split)."),
    backtest_dir: Path | None = typer.Option(None, help="A backtest folder (default: the latest for the city)."),
    coverage: list[float] = typer.Option(list(HEADLINE_COVERAGES), help="Area coverages whose flags are audited."),
    model: str | None = typer.Option(None, help="The backtested forecaster to audit (default: the backtest's "
                                               "winner; the learned candidate when the strongest baseline won)."),
    baseline: str | None = typer.Option(None, help="The forecaster it is compared with (default: the backtest's "
                                                   "strongest baseline)."),
    n_boot: int = typer.Option(1000, min=100),
    resolution: int | None = typer.Option(None, help="Resolution of the backtest (default: the latest at any)."),
    data_dir: Path | None = DataDir,
) -> None:
    """Bias audit of the backtested model against the strongest baseline: exposure of each population group (and
    hardship or low-income quintile) to flagging, against its population and its share of recorded crime,
    with hit rate, PAI and calibration per group; day-block bootstrap intervals."""
    import mlflow

    from forecasting.area_join import AreaJoinError
    from forecasting.area_presets import AreaLayerSpec, get_preset
    from forecasting.assessment import run_audit
    from forecasting.reporting.assess import log_audit
    from forecasting.reporting.tracking import configure

    if (preset is None) == (layer_file is None):
        fail("give exactly one of --preset NAME or --layer-config FILE.toml")
    settings = project_settings(data_dir)
    try:
        layer = get_preset(preset) if preset is not None else AreaLayerSpec.from_toml(cast(Path, layer_file))
    except AreaJoinError as exc:
        fail(str(exc))
    saved, panel = _backtest(settings, city, backtest_dir, resolution)
    model, baseline = _pair(saved, model, baseline)
    base = settings.shared_data_dir if layer_file is None else Path(layer_file).parent
    with stage(f"bias audit of {saved.out_dir.name} on {layer.name}"):
        try:
            result = run_audit(saved.predictions, saved.observed, saved.areas, saved.origins, panel, layer, base,
                               coverages=tuple(coverage), n_boot=n_boot, title=f"Bias audit: {city}, {layer.name}",
                               model=model, baseline=baseline)
        except KeyError as exc:
            fail(str(exc.args[0]))
        except (AreaJoinError, FileNotFoundError) as exc:
            fail(str(exc))
    configure(settings)
    with mlflow.start_run(run_id=_run_id(settings, city, saved)) as run:
        log_audit(result, saved.out_dir)
    for sentence in result.findings():
        console.print(sentence)
    console.print(f"logged into MLflow run {run.info.run_id}; report: {saved.out_dir / 'bias_audit.html'}")
