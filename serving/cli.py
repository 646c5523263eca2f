"""The ``hotspots`` command line."""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from features.calendar import ShiftCalendar
from features.grid import StudyArea, read_boundary
from features.ingest import IngestError
from features.profile import ProfileError, SourceProfile, builtin_profiles, load_profile
from features.settings import Settings

app = typer.Typer(help="Place-based crime hotspot forecasting on H3 cells and patrol shifts.", no_args_is_help=True)
console = Console()


def _settings(data_dir: Optional[Path], resolution: Optional[int] = None) -> Settings:
    overrides = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if resolution is not None:
        overrides["h3_resolution"] = resolution
    return Settings(**overrides)


@contextmanager
def _stage(label: str) -> Iterator[None]:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(label, total=1)
        yield
        bar.update(task, completed=1)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


DataDir = typer.Option(None, "--data-dir", help="Data folder (default: settings data_dir, env HOTSPOTS_DATA_DIR).")


def _profile(source: str, profile: Optional[str]) -> SourceProfile:
    try:
        return load_profile(profile or source)
    except ProfileError as exc:
        _fail(str(exc))
        raise


def _input_path(source: str, path: Optional[Path], settings: Settings) -> Path:
    if path is not None:
        return path
    if source == "toronto-mci":
        from features.sources.toronto import materialise

        return materialise(settings.data_dir / "raw" / "toronto-mci.csv")
    _fail(f"give the input file for source {source!r} (CSV, CSV.gz or Parquet)")
    raise AssertionError


@app.command()
def profiles() -> None:
    """List the built-in source profiles."""
    table = Table("name", "description", "time zone", "licence")
    for name in builtin_profiles():
        p = load_profile(name)
        table.add_row(name, p.description, p.timezone, p.licence)
    console.print(table)


@app.command()
def ingest(
    source: str = typer.Argument(..., help="Profile name (chicago, toronto-mci) or a profile file for any city."),
    path: Optional[Path] = typer.Argument(None, help="Input CSV/CSV.gz/Parquet (toronto-mci: read from its wheel)."),
    profile: Optional[str] = typer.Option(None, help="Profile name or file, if not the source name."),
    encoding: Optional[str] = typer.Option(None, help="Input text encoding (default: the profile's, utf-8)."),
    boundary: Optional[Path] = typer.Option(None, help="GeoJSON/GeoPackage polygon: points outside are out_of_area."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Validate a city export into the incident store; rejected rows go to quarantine with a reason."""
    from features.pipeline import ingest_file
    from features.store import IncidentStore

    settings = _settings(data_dir)
    prof = _profile(source, profile)
    file = _input_path(source, path, settings)
    shape = read_boundary(boundary) if boundary else None
    try:
        with _stage(f"ingest {file.name}"):
            summary = ingest_file(
                file, prof, IncidentStore(settings.data_dir), encoding=encoding, boundary=shape,
                future_tolerance=timedelta(minutes=settings.future_tolerance_minutes),
            )
    except IngestError as exc:
        _fail(str(exc))
    for line in summary.lines():
        console.print(line)
    console.print(f"summary written to {summary.report_path}")


@app.command()
def fetch(
    out: Path = typer.Option(..., help="CSV file to write (portal export columns)."),
    since: Optional[datetime] = typer.Option(None, help="Local time, inclusive."),
    until: Optional[datetime] = typer.Option(None, help="Local time, exclusive."),
    page_size: int = typer.Option(50_000),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Download Chicago incidents from the city's Socrata API into a CSV ready for `hotspots ingest chicago`."""
    from features.sources.socrata import SocrataError, fetch_to_csv

    settings = _settings(data_dir)
    try:
        with _stage("fetch from the Chicago data portal"):
            n = fetch_to_csv(out, since=since, until=until, app_token=settings.socrata_app_token, page_size=page_size)
    except SocrataError as exc:
        _fail(str(exc))
    console.print(f"wrote {n:,} rows to {out}")


def panel_dir(settings: Settings, source: str) -> Path:
    return settings.data_dir / "panels" / f"{source}-r{settings.h3_resolution}"


@app.command()
def panel(
    source: str = typer.Argument(..., help="Source name in the store."),
    resolution: Optional[int] = typer.Option(None, help="H3 resolution (default: settings, 9)."),
    boundary: Optional[Path] = typer.Option(None, help="Study-area polygon file (default: derived from the data)."),
    layer: Optional[str] = typer.Option(None, help="Layer of the boundary GeoPackage."),
    profile: Optional[str] = typer.Option(None, help="Profile name or file, if not the source name."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Bin stored incidents into the H3 x shift count panel."""
    from features.panel import build_panel, with_cells
    from features.store import IncidentStore

    settings = _settings(data_dir, resolution)
    prof = _profile(source, profile)
    try:
        incidents = IncidentStore(settings.data_dir).read(source)
    except FileNotFoundError as exc:
        _fail(str(exc))
    res = settings.h3_resolution
    with _stage(f"study area at H3 resolution {res}"):
        incidents = with_cells(incidents, res)
        if boundary:
            area = StudyArea.from_boundary(read_boundary(boundary, layer), res, source)
        else:
            area = StudyArea.from_cells(incidents["h3_cell"].to_numpy(), res, name=source)
    calendar = ShiftCalendar.from_strings(prof.timezone, settings.shift_starts)
    with _stage(f"bin {incidents.height:,} incidents into cells x shifts"):
        built, report = build_panel(incidents, area, calendar, prof.categories.canonical)
    folder = panel_dir(settings, source)
    built.save(folder)
    console.print(
        f"{len(area):,} cells, {built.n_shifts:,} shifts ({', '.join(calendar.labels)} {prof.timezone}), "
        f"{built.counts.height:,} non-zero (cell, shift, category) counts"
    )
    console.print(
        f"binned {report.binned:,}; outside study area {report.outside_study_area:,}; "
        f"outside period {report.outside_period:,} (of {report.incidents:,})"
    )
    console.print(f"panel saved to {folder}")


@app.command()
def features(
    source: str = typer.Argument(...),
    start: datetime = typer.Option(..., help="First forecast origin (local date or time)."),
    end: datetime = typer.Option(..., help="End of the origin range (exclusive)."),
    resolution: Optional[int] = typer.Option(None),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Build the feature matrix for every shift starting in [start, end) and save it as Parquet."""
    from zoneinfo import ZoneInfo

    from features.matrix import build_features, build_targets

    settings = _settings(data_dir, resolution)
    built = _load_panel(settings, source)
    zone = ZoneInfo(built.calendar.timezone)
    origins = built.calendar.shift_range(start.replace(tzinfo=start.tzinfo or zone), end.replace(tzinfo=end.tzinfo or zone))
    if origins.size == 0:
        _fail("no shift starts in that range")
    with _stage(f"features for {origins.size:,} shifts x {built.n_cells:,} cells"):
        matrix = build_features(built, origins)
        frame = matrix.frame()
        if origins[-1] < built.end_shift:
            frame = frame.with_columns(target=build_targets(built, origins))
    out = settings.data_dir / "features" / f"{source}-r{settings.h3_resolution}-{start:%Y%m%d}-{end:%Y%m%d}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out)
    console.print(f"{frame.height:,} rows x {len(matrix.columns)} features written to {out}")


@app.command()
def prepare(
    source: str = typer.Argument("toronto-mci", help="Source to prepare end to end."),
    path: Optional[Path] = typer.Argument(None, help="Input file (toronto-mci: read from its wheel)."),
    feature_year: Optional[int] = typer.Option(None, help="Year of origins to build features for (default: last full year)."),
    resolution: Optional[int] = typer.Option(None),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Ingest, validate, bin and build features in one go: the analyst's first run."""
    ingest(source=source, path=path, profile=None, encoding=None, boundary=None, data_dir=data_dir)
    panel(source=source, resolution=resolution, boundary=None, layer=None, profile=None, data_dir=data_dir)
    settings = _settings(data_dir, resolution)
    year = feature_year or _last_full_year(_load_panel(settings, source))
    features(source=source, start=datetime(year, 1, 1), end=datetime(year + 1, 1, 1), resolution=resolution, data_dir=data_dir)


def _load_panel(settings: Settings, source: str):
    from features.panel import CountPanel

    folder = panel_dir(settings, source)
    if not (folder / "panel.json").is_file():
        _fail(f"no panel for {source!r} at resolution {settings.h3_resolution}: run `hotspots panel {source}` first")
    return CountPanel.load(folder)


def _audit_layer(preset: Optional[str], source: str):
    """The shipped area layer named by --audit-preset, else the source's own when its file is present."""
    from forecasting.area_join import AreaJoinError
    from forecasting.area_presets import default_layer, get_preset

    if preset is None:
        layer = default_layer(source)
        if layer is None:
            console.print(f"no area layer for {source}: the bias audit is skipped (give --audit-preset, or "
                          f"`hotspots audit {source} --layer-config F.toml` afterwards)")
        return layer

    try:
        return get_preset(preset)
    except AreaJoinError as exc:
        _fail(str(exc))


def _last_full_year(built) -> int:
    last_day = date(1970, 1, 1) + timedelta(days=(built.end_shift - 1) // built.calendar.per_day)
    return last_day.year if last_day >= date(last_day.year, 12, 31) else last_day.year - 1


@app.command()
def train(
    source: str = typer.Argument(...),
    until: Optional[datetime] = typer.Option(None, help="Train on incidents before this local time (default: all)."),
    category: Optional[str] = typer.Option(None, help="Target one category (default: all)."),
    resolution: Optional[int] = typer.Option(None),
    seed: int = typer.Option(0),
    audit_preset: Optional[str] = typer.Option(None, help="Also audit the validation window's flags on this shipped "
                                               "area layer (default: the source's own, when HOTSPOTS_SHARED_DATA "
                                               "has it; see `hotspots audit`)."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Train the LightGBM forecaster and log it to MLflow as a registered model version (not promoted: only
    a backtest that beats the naive baseline moves the champion alias). The run also logs the diagnostics of
    the model's flags over its validation window (and, with --audit-preset, the bias audit)."""
    from zoneinfo import ZoneInfo

    import mlflow

    from features.matrix import build_features
    from forecasting.lgbm import LightGBMForecaster
    from experiments.assess import assess_training
    from forecasting.tracking import code_version, configure, log_model

    layer = _audit_layer(audit_preset, source)
    settings = _settings(data_dir, resolution)
    built = _load_panel(settings, source)
    cutoff = built.end_shift if until is None else built.calendar.shift_of(until.replace(tzinfo=until.tzinfo or ZoneInfo(built.calendar.timezone)))
    configure(settings)
    model = LightGBMForecaster(seed=seed, category=category)
    with mlflow.start_run(run_name=f"train-{source}") as run:
        mlflow.set_tags({"kind": "train", "city": source})
        mlflow.log_params({"city": source, "resolution": settings.h3_resolution, "shift_starts": ",".join(built.calendar.labels),
                           "cutoff_shift": cutoff, "category": category or "all", "data_fingerprint": built.fingerprint(),
                           "code_version": code_version(),
                           **{k: v for k, v in model.params().items() if not hasattr(v, "__dict__") and k != "category"}})
        with _stage("train LightGBM"):
            model.fit(built, cutoff)
        mlflow.log_metrics({"best_iteration": model.best_iteration_, "train_rows": model.train_rows_,
                            "valid_poisson": float(model.booster_.best_score["valid_0"]["poisson"]) if model.objective == "poisson" else 0.0})
        mlflow.log_dict(model.feature_importance(), "feature_importance.json")
        sample = build_features(built, cutoff - 1, model.features).frame().drop("origin", "cell").head(200)
        info = log_model(model, sample.to_pandas(), source)
        with _stage("diagnostics" + (" and bias audit" if layer else "") + " on the validation window"):
            assess_training(model, built, cutoff, audit_layer=layer)
    console.print(f"run {run.info.run_id}: registered {info.registered_model_version and f'version {info.registered_model_version}'} "
                  f"of hotspots-{source} ({model.best_iteration_} trees, {model.train_rows_:,} training rows)")


def _print_backtest(tracked) -> None:
    table = Table("forecaster", "coverage", "hit rate [95% CI]", "PAI [95% CI]", "PEI*", "fit s")
    for name, summary in tracked.summaries.items():
        for j, cov in enumerate(summary.coverages):
            if cov not in (0.01, 0.05):
                continue
            p, lo, hi = summary.point, summary.low, summary.high
            table.add_row(name, f"{cov:.0%}", f"{p['hit_rate'][j]:.3f} [{lo['hit_rate'][j]:.3f}, {hi['hit_rate'][j]:.3f}]",
                          f"{p['pai'][j]:.1f} [{lo['pai'][j]:.1f}, {hi['pai'][j]:.1f}]", f"{p['pei'][j]:.2f}",
                          f"{tracked.result.fit_seconds[name]:.0f}")
    console.print(table)
    for claim in tracked.claims:
        console.print(claim.sentence())
    if tracked.decision is not None:
        state = "PROMOTED to champion" if tracked.decision.promote else "not promoted"
        console.print(f"model version {tracked.model_version}: {state} ({tracked.decision.reason})")
    console.print(f"report: {tracked.out_dir / 'report.html'}  (MLflow run {tracked.run_id})")


@app.command()
def backtest(
    source: str = typer.Argument(...),
    test_start: Optional[datetime] = typer.Option(None, help="First local day of the test period (default: last full year)."),
    test_end: Optional[datetime] = typer.Option(None, help="End of the test period, exclusive."),
    forecaster: Optional[list[str]] = typer.Option(None, help="Forecasters to compare (default: all)."),
    ratio: float = typer.Option(1.5, help="The claim to test: candidate hit rate >= ratio x naive."),
    n_boot: int = typer.Option(1000),
    register: bool = typer.Option(True, help="Fit on all data, register, and apply the promotion gate."),
    audit_preset: Optional[str] = typer.Option(None, help="Run the bias audit on this shipped area layer "
                                               "(chicago-community-areas, toronto-neighbourhoods; default: the "
                                               "source's own, when HOTSPOTS_SHARED_DATA has it); see `hotspots audit`."),
    resolution: Optional[int] = typer.Option(None),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Rolling-origin backtest (monthly refits) of LightGBM against every baseline, with the claim test, the
    feedback-loop diagnostics and (with --audit-preset) the bias audit, all logged to MLflow."""
    from experiments.backtest import default_forecasters, run_tracked_backtest

    layer = _audit_layer(audit_preset, source)
    settings = _settings(data_dir, resolution)
    built = _load_panel(settings, source)
    year = _last_full_year(built)
    start = test_start.date() if test_start else date(year, 1, 1)
    end = test_end.date() if test_end else date(start.year + 1, start.month, start.day)
    available = default_forecasters()
    chosen = forecaster or list(available)
    unknown = [f for f in chosen if f not in available]
    if unknown:
        _fail(f"unknown forecaster(s) {unknown}; choose from {list(available)}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"backtest {source} {start} to {end}", total=None)
        tracked = run_tracked_backtest(
            built, source, settings, start, end, forecasters={k: available[k] for k in chosen}, claimed_ratio=ratio,
            n_boot=n_boot, register=register and "lightgbm" in chosen,
            progress=lambda message: bar.update(task, description=f"backtest {source}: {message}"), audit_layer=layer,
        )
    _print_backtest(tracked)


@app.command()
def claim(
    source: str = typer.Argument(...),
    backtest_dir: Optional[Path] = typer.Option(None, help="A backtest folder (default: the latest for the source)."),
    candidate: str = typer.Option("lightgbm"),
    baseline: str = typer.Option("naive"),
    ratio: float = typer.Option(1.5, help="Claimed ratio of hit rates (1.5 = '50% more effective')."),
    coverage: list[float] = typer.Option([0.01, 0.05], help="Area coverages to test."),
    n_boot: int = typer.Option(2000),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Test 'candidate is at least RATIO times as effective as baseline' on a saved backtest."""
    import numpy as np

    from forecasting.claim import claim_test

    settings = _settings(data_dir)
    if backtest_dir is None:
        found = sorted((settings.data_dir / "backtests").glob(f"{source}-*/predictions.npz"), key=lambda p: p.stat().st_mtime)
        if not found:
            _fail(f"no backtest for {source!r}: run `hotspots backtest {source}` first")
        backtest_dir = found[-1].parent
    data = np.load(backtest_dir / "predictions.npz")
    names = [k[5:] for k in data.files if k.startswith("pred_")]
    for name in (candidate, baseline):
        if name not in names:
            _fail(f"forecaster {name!r} is not in {backtest_dir}; it has {names}")
    meta = json.loads((backtest_dir / "summary.json").read_text()).get("meta", {}) if (backtest_dir / "summary.json").is_file() else {}
    per_day = len(str(meta.get("shift_starts", "06:00,14:00,22:00")).split(","))
    results = claim_test(data[f"pred_{candidate}"], data[f"pred_{baseline}"], data["observed"], data["areas"], data["origins"],
                         per_day, coverages=tuple(coverage), claimed_ratio=ratio, n_boot=n_boot, names=(candidate, baseline))
    for r in results:
        console.print(r.sentence())
        console.print(f"  difference {r.difference:+.3f} ({r.level:.0%} CI {r.difference_low:+.3f} to {r.difference_high:+.3f})")


@app.command()
def run(
    source: str = typer.Argument("toronto-mci", help="Source to run end to end."),
    path: Optional[Path] = typer.Argument(None, help="Input file (toronto-mci: read from its wheel)."),
    resolution: Optional[int] = typer.Option(None),
    ratio: float = typer.Option(1.5),
    serve_after: bool = typer.Option(True, "--serve/--no-serve", help="Start the service on the new champion afterwards."),
    host: str = typer.Option("127.0.0.1", help="Address the service listens on (with --serve)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port of the service (with --serve)."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """The whole journey: ingest, panel, backtest of the last full year against every baseline, claim verdict,
    registration and the promotion gate; then (unless --no-serve) a planner key if there is none, and the
    service with the map's URL."""
    ingest(source=source, path=path, profile=None, encoding=None, boundary=None, data_dir=data_dir)
    panel(source=source, resolution=resolution, boundary=None, layer=None, profile=None, data_dir=data_dir)
    backtest(source=source, test_start=None, test_end=None, forecaster=None, ratio=ratio, n_boot=1000, register=True,
             audit_preset=None, resolution=resolution, data_dir=data_dir)
    if not serve_after:
        return
    from serving.keys import Role

    settings = _settings(data_dir, resolution)
    created = ensure_planner_key(settings)
    if created is not None:
        _show_new_key(created, Role.planner)
    _serve(settings, host, port, workers=1, reload_seconds=None, access_log=True)


def ensure_planner_key(settings: Settings) -> Optional[str]:
    """A new planner key (plaintext, to show once) when the data folder has no active one, else None."""
    from serving.keys import Role, create_key, list_keys

    if any(k.role is Role.planner and k.revoked_at is None for k in list_keys(settings)):
        return None
    return create_key(Role.planner, "planner (created by hotspots run)", settings)


# --- the service ---------------------------------------------------------------------------------------


def _public_host(host: str) -> str:
    """The address to print for a browser: a wildcard bind is reachable on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)


def _serve(settings: Settings, host: str, port: int, workers: int, reload_seconds: Optional[float],
           access_log: bool) -> None:
    """Run uvicorn on the app factory. Settings travel as HOTSPOTS_* variables so that every worker process
    (which imports the app afresh) builds the same service."""
    import os
    import signal

    import uvicorn

    from features.settings import get_settings

    os.environ["HOTSPOTS_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    os.environ["HOTSPOTS_H3_RESOLUTION"] = str(settings.h3_resolution)
    if reload_seconds is not None:
        os.environ["HOTSPOTS_MODEL_REFRESH_SECONDS"] = repr(float(reload_seconds))
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        # /metrics sums every worker's counters from this folder (prometheus_client's multiprocess mode)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="hotspots-metrics-")
    get_settings.cache_clear()  # this process may have read other settings before
    base = f"http://{_public_host(host)}:{port}"
    console.print(f"data folder {Path(settings.data_dir).resolve()}; {workers} worker(s)"
                  + (" (each keeps its own forecast cache)" if workers > 1 else ""))
    console.print(f"map:  {base}/map", soft_wrap=True)
    console.print(f"docs: {base}/docs   (API under {base}/v1, key in the X-API-Key header)", soft_wrap=True)
    # uvicorn drains requests and runs the shutdown on SIGTERM, then re-raises the signal to the handler in
    # place before it started; a no-op one here makes a graceful stop exit 0, as service managers expect
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run("serving.app:create_app", factory=True, host=host, port=port, workers=workers,
                access_log=access_log, timeout_graceful_shutdown=10)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=1, max=65535),
    workers: int = typer.Option(1, min=1, help="Worker processes; each keeps its own forecast cache."),
    reload_seconds: Optional[float] = typer.Option(
        None, min=0, help="How often at most the registry is re-read for a moved champion (default: setting "
                          "model_refresh_seconds, 60; 0: on every request)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="uvicorn's per-request log line "
                                    "(the audit log is kept either way)."),
    resolution: Optional[int] = typer.Option(None, help="H3 resolution of the panels to serve (default: settings, 9)."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Start the hotspot service (FastAPI on uvicorn): the API under /v1, the planner map at /map."""
    _serve(_settings(data_dir, resolution), host, port, workers, reload_seconds, access_log)


# --- API keys ------------------------------------------------------------------------------------------

keys_app = typer.Typer(help="API keys of the service: create (shown once), revoke, list. Stored hashed.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _show_new_key(plaintext: str, role) -> None:
    console.print(f"new {role.value} key (send it in the X-API-Key header):")
    typer.echo(plaintext)  # plain echo: never wrapped or re-styled, so it can be copied whole
    console.print("[bold yellow]warning:[/] the key is shown only now; it is stored hashed and cannot be recovered. "
                  "Lost keys are revoked and replaced.")


@keys_app.command("create")
def keys_create(
    role: str = typer.Option(..., help="planner (forecasts), analyst (+ models), auditor (+ audit log) or admin."),
    name: str = typer.Option(..., help="A label for the key's use, e.g. 'night desk' or 'dispatch GIS': never a "
                                       "person's name (the service keeps no personal data)."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Create an API key and print it once."""
    from serving.keys import Role, create_key

    try:
        chosen = Role(role)
    except ValueError:
        _fail(f"unknown role {role!r}; choose from {', '.join(r.value for r in Role)}")
    label = name.strip()
    if not 1 <= len(label) <= 200:
        _fail("--name must be 1 to 200 characters: a label such as 'night desk'")
    if "@" in label:
        _fail("--name looks like an e-mail address; use a label for the key's use such as 'night desk' (no personal data)")
    _show_new_key(create_key(chosen, label, _settings(data_dir)), chosen)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (the part after hsk_, see `hotspots keys list`)."),
                data_dir: Optional[Path] = DataDir) -> None:
    """Revoke a key: requests with it get 401 from then on (the row stays for the audit trail)."""
    from serving.keys import revoke_key

    if not revoke_key(key_id, _settings(data_dir)):
        _fail(f"no active key with id {key_id!r}: see `hotspots keys list`")
    console.print(f"key {key_id} revoked")


@keys_app.command("list")
def keys_list(data_dir: Optional[Path] = DataDir) -> None:
    """Keys with their ids, names, roles and dates (never the secrets)."""
    from serving.keys import list_keys

    found = list_keys(_settings(data_dir))
    if not found:
        console.print("no keys: create one with `hotspots keys create --role planner --name 'night desk'`")
        return
    table = Table()
    for title, wrap in (("id", False), ("name", True), ("role", False), ("created (UTC)", False), ("revoked (UTC)", False)):
        table.add_column(title, no_wrap=not wrap)
    for k in found:
        table.add_row(k.key_id, k.name, k.role.value, f"{k.created_at:%Y-%m-%d %H:%M:%S}",
                      f"{k.revoked_at:%Y-%m-%d %H:%M:%S}" if k.revoked_at else "")
    console.print(table)


@app.command()
def quarantine(source: str, data_dir: Optional[Path] = DataDir) -> None:
    """Show quarantined rows by reason."""
    from features.store import IncidentStore

    rows = IncidentStore(_settings(data_dir).data_dir).read_quarantine(source)
    if rows.height == 0:
        console.print(f"nothing quarantined for {source!r}")
        return
    table = Table("file", "reason", "rows")
    for file, reason, n in rows.group_by("file", "reason").len().sort("file", "len", descending=[False, True]).iter_rows():
        table.add_row(file, reason, f"{n:,}")
    console.print(table)


@app.command()
def retention(
    max_age_days: int = typer.Option(..., min=1, help="Delete incidents that occurred more than this many days ago."),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """Data-protection retention: delete old incidents (and quarantine files) from the store."""
    from features.store import IncidentStore

    deleted = IncidentStore(_settings(data_dir).data_dir).delete_older_than(timedelta(days=max_age_days))
    console.print(json.dumps(deleted))


import serving.cli_assess  # noqa: E402,F401  (registers `diagnose` and `audit`)

if __name__ == "__main__":  # pragma: no cover
    app()
