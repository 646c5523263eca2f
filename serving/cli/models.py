"""Model commands: train, backtest with the claim test and promotion gate, the claim on a saved backtest, and
``run``, the whole journey from a city's export to a served champion."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from features.paths import DataPaths
from forecasting.metrics import HEADLINE_COVERAGES
from serving.cli.common import (
    DataDir,
    Resolution,
    audit_layer,
    console,
    fail,
    last_full_month,
    last_full_year,
    load_panel,
    project_settings,
    source_profile,
    stage,
)
from serving.cli.data import ingest, panel

app = typer.Typer()

Params = typer.Option(None, "--param", help="A forecaster parameter as KEY=VALUE for LightGBM, or NAME.KEY=VALUE for "
                                             "the forecaster NAME, e.g. --param n_estimators=50 --param "
                                             "sepp.bandwidth_m=150 (repeatable).")
SCALARS = (bool, int, float, str)


def parse_params(pairs: list[str] | None, name: str) -> dict[str, object]:
    """KEY=VALUE pairs typed after the forecaster's own parameters (its get_params), or a message naming them."""
    from forecasting import registry

    defaults = {key: value for key, value in registry.make(name).get_params(deep=False).items()
                if key not in ("category", "features", "name") and (value is None or isinstance(value, SCALARS))}
    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            fail(f"--param {pair!r}: {name} has no parameter {key!r}; it has {', '.join(sorted(defaults))}")
        out[key] = _typed(name, key, raw.strip(), defaults[key])
    return out


def _typed(name: str, key: str, raw: str, default: object) -> object:
    """``raw`` as the type of the default (a None default: none, an int, a float, else the text)."""
    if isinstance(default, bool):
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            fail(f"--param {key}={raw!r}: {name}'s {key} is true or false")
        return raw.lower() in ("1", "true", "yes")
    kinds = [type(default)] if default is not None else [int, float, str]
    if default is None and raw.lower() == "none":
        return None
    for kind in kinds:
        try:
            return kind(raw)
        except ValueError:
            continue
    fail(f"--param {key}={raw!r}: {name}'s {key} must be of type {type(default).__name__}, e.g. {key}={default}")


def params_by_forecaster(pairs: list[str] | None, chosen: list[str],
                         bare: str = "lightgbm") -> dict[str, dict[str, object]]:
    """--param pairs per forecaster: NAME.KEY=VALUE for NAME, a bare KEY=VALUE for ``bare``."""
    grouped: dict[str, list[str]] = {}
    for pair in pairs or []:
        key = pair.partition("=")[0]
        name, dot, rest = key.partition(".")
        name = name.strip() if dot else bare
        if name not in chosen:
            fail(f"--param {pair!r} is for {name}, which this run does not fit (forecasters: {', '.join(chosen)})")
        grouped.setdefault(name, []).append(pair[len(key) - len(rest):] if dot else pair)
    return {name: parse_params(group, name) for name, group in grouped.items()}


def chosen_factories(forecaster: list[str] | None, param: list[str] | None) -> dict:
    """The factories of the --forecaster names (default: every registered one but those run by request), with
    their --param values."""
    from forecasting import registry

    chosen = forecaster or registry.default_names()
    unknown = [f for f in chosen if f not in registry.names()]
    if unknown:
        fail(f"unknown forecaster(s) {unknown}; choose from {registry.names()}")
    return registry.factories(chosen, params=params_by_forecaster(param, chosen))


@app.command()
def train(
    source: str = typer.Argument(...),
    until: datetime | None = typer.Option(None, help="Train on incidents before this local time (default: all)."),
    category: str | None = typer.Option(None, help="Target one category (default: all)."),
    resolution: int | None = Resolution,
    seed: int = typer.Option(0),
    forecaster: str = typer.Option("lightgbm", "--forecaster", help="The forecaster to train, by registry name "
                                   "(lightgbm, naive, kde, prospective, sepp, all_history, last_year, exp_weighted)."),
    param: list[str] | None = Params,
    baseline: str | None = typer.Option(None, help="The map the validation window's diagnostics compare with, by "
                                        "registry name (default: the strongest baseline of the city's latest "
                                        "backtest at this resolution, else naive)."),
    audit_preset: str | None = typer.Option(None, help="Also audit the validation window's flags on this shipped "
                                               "area layer (default: the source's own, when HOTSPOTS_SHARED_DATA "
                                               "has it; see `hotspots audit`)."),
    data_dir: Path | None = DataDir,
) -> None:
    """Train one forecaster (--forecaster, default LightGBM; --param goes to it) and log it to MLflow as a
    registered model version (not promoted: only a backtest's winner against the strongest baseline moves the
    champion alias). The run also logs the diagnostics of the model's flags over its validation window (and,
    with --audit-preset, the bias audit)."""
    from zoneinfo import ZoneInfo

    from forecasting import registry
    from forecasting.reporting.runs import run_training

    for name in (forecaster, baseline):
        if name is not None and name not in registry.names():
            fail(f"unknown forecaster {name!r}; choose from {', '.join(registry.names())}")
    layer = audit_layer(audit_preset, source)
    settings = project_settings(data_dir, resolution)
    built = load_panel(settings, source)
    zone = ZoneInfo(built.calendar.timezone)
    cutoff = built.end_shift if until is None else built.calendar.shift_of(until.replace(tzinfo=until.tzinfo or zone))
    params = params_by_forecaster(param, [forecaster], bare=forecaster).get(forecaster, {})
    model = registry.make(forecaster, **params)
    if category is not None:
        model.set_params(category=category)
    if "seed" in model.get_params(deep=False):
        model.set_params(seed=seed)
    baseline = baseline or _latest_strongest(settings, source, built.study_area.resolution) or "naive"
    with stage(f"train {model.name} on {source}") as step:
        try:
            trained = run_training(built, source, settings, model, cutoff, baseline=baseline, audit_layer=layer,
                                   progress=step)
        except ValueError as exc:
            fail(str(exc))
    summary = ", ".join(f"{k} {v:g}" for k, v in model.fit_summary().items())
    console.print(f"run {trained.run_id}: registered {trained.version and f'version {trained.version}'} "
                  f"of hotspots-{source} ({model.name}" + (f": {summary}" if summary else "") + ")")


def _latest_strongest(settings, source: str, resolution: int) -> str | None:
    """The strongest baseline the city's latest backtest at this resolution chose, if there is one."""
    from forecasting.saved import SavedBacktest

    try:
        return SavedBacktest.load(DataPaths(settings).latest_backtest(source, resolution)).strongest_baseline
    except (FileNotFoundError, ValueError):
        return None


def print_backtest(tracked) -> None:
    if tracked.strongest is not None:
        console.print(tracked.strongest.sentence())
    table = Table("forecaster", "coverage", "hit rate [95% CI]", "pessimistic ties", "PAI [95% CI]", "PEI*", "fit s")
    for name, summary in tracked.summaries.items():
        for j, cov in enumerate(summary.coverages):
            if cov not in HEADLINE_COVERAGES:
                continue
            p, lo, hi = summary.point, summary.low, summary.high
            worst = summary.pessimistic.get("hit_rate")
            label = name + (" (strongest baseline)" if tracked.strongest and name == tracked.strongest.name else "")
            table.add_row(label, f"{cov:.0%}", f"{p['hit_rate'][j]:.3f} [{lo['hit_rate'][j]:.3f}, {hi['hit_rate'][j]:.3f}]",
                          "" if worst is None else f"{worst[j]:.3f}",
                          f"{p['pai'][j]:.1f} [{lo['pai'][j]:.1f}, {hi['pai'][j]:.1f}]", f"{p['pei'][j]:.2f}",
                          f"{tracked.result.fit_seconds[name]:.0f}")
    console.print(table)
    for name, summary in tracked.references.items():
        rates = ", ".join(f"{summary.point['hit_rate'][j]:.3f} at {cov:.0%}" for j, cov in enumerate(summary.coverages)
                          if cov in HEADLINE_COVERAGES)
        console.print(f"reference (not a forecaster) {name}: hit rate {rates}")
    for claim in tracked.claims:
        console.print(claim.sentence())
    focus = tracked.assessed[0] if tracked.assessed else None
    for share in tracked.headroom:
        if share.forecaster == focus and share.ties == "random" and focus != share.strongest:
            said = share.text() if share.share is None else (
                f"{share.text()} of the headroom between {share.strongest} and the shift-of-day clairvoyant ceiling")
            console.print(f"{focus} at {share.coverage:.0%} of the area: {said}")
    if tracked.decision is not None:
        state = "PROMOTED to champion" if tracked.decision.promote else "not promoted"
        console.print(f"model version {tracked.model_version} ({tracked.decision.winner}): {state} ({tracked.decision.reason})")
    console.print(f"report: {tracked.out_dir / 'report.html'}; per-cell forecasts: {tracked.out_dir / 'forecasts.parquet'}"
                  f"  (MLflow run {tracked.run_id})")


def panel_with_shifts(settings, source: str, built, shift_starts: str | None):
    """The saved panel, or (when ``--shift-starts`` names other shifts) the same study area re-binned from the
    incident store with those shifts, in memory. Returns (panel, shifts differ)."""
    if shift_starts is None:
        return built, False
    wanted = [part.strip() for part in shift_starts.split(",") if part.strip()]
    if wanted == list(built.calendar.labels):
        return built, False
    from features.pipeline import build_city_panel
    from features.store import IncidentStore
    from serving.cli.common import source_profile

    try:
        incidents = IncidentStore(settings.data_dir).read(source)
        rebuilt = build_city_panel(incidents, source_profile(source), settings, shift_starts=wanted,
                                   study_area=built.study_area, name=source)
    except FileNotFoundError as exc:
        fail(f"{exc}: --shift-starts re-bins the stored incidents; run `hotspots ingest {source}` first")
    except ValueError as exc:
        fail(f"--shift-starts {shift_starts!r}: {exc} (give local HH:MM starts separated by commas, e.g. 07:00,15:00,23:00)")
    return rebuilt.panel, True


@app.command()
def backtest(
    source: str = typer.Argument(...),
    test_start: datetime | None = typer.Option(None, help="First local day of the test period (default: last full year)."),
    test_end: datetime | None = typer.Option(None, help="End of the test period, exclusive."),
    forecaster: list[str] | None = typer.Option(None, help="Forecasters to compare, by registry name (default: all)."),
    ratio: float = typer.Option(1.5, help="The claim to test: candidate hit rate >= ratio x the strongest baseline."),
    n_boot: int = typer.Option(1000),
    register: bool = typer.Option(True, help="Fit the backtest's winner on all data, register it, apply the gate."),
    audit_preset: str | None = typer.Option(None, help="Run the bias audit on this shipped area layer "
                                               "(chicago-community-areas, toronto-neighbourhoods; default: the "
                                               "source's own, when HOTSPOTS_SHARED_DATA has it); see `hotspots audit`."),
    param: list[str] | None = Params,
    resolution: int | None = Resolution,
    shift_starts: str | None = typer.Option(None, "--shift-starts", help="Local shift starts, e.g. "
                                               "'00:00' (one 24-hour shift) or '07:00,15:00,23:00'. Default: the "
                                               "saved panel's. Other shifts re-bin the stored incidents on the same "
                                               "cells; such a backtest registers nothing (the service serves the "
                                               "saved panel's shifts)."),
    data_dir: Path | None = DataDir,
    cluster: Annotated[str | None, typer.Option(
        "--cluster", help="Run the refits as tasks on this Dask scheduler, e.g. tcp://10.0.0.5:8786 (extra `dask`; "
                          "default: setting dask_scheduler, env HOTSPOTS_DASK_SCHEDULER; unset: in this process). "
                          "Results are identical to a local run.")] = None,
) -> None:
    """Rolling-origin backtest (monthly refits) of every registered forecaster: the strongest traditional baseline
    chosen on the weeks before the test period, the claim test against it (and every other), per-cell forecasts
    in forecasts.parquet, the feedback-loop diagnostics and (with --audit-preset) the bias audit, all logged to
    MLflow; the winner against the strongest baseline is registered and promoted."""
    from contextlib import nullcontext

    from forecasting.cluster import connect
    from forecasting.reporting.runs import run_tracked_backtest

    layer = audit_layer(audit_preset, source)
    settings = project_settings(data_dir, resolution)
    built, other_shifts = panel_with_shifts(settings, source, load_panel(settings, source), shift_starts)
    start = test_start.date() if test_start else date(last_full_year(built), 1, 1)
    end = test_end.date() if test_end else date(start.year + 1, start.month, start.day)
    available = chosen_factories(forecaster, param)
    out_dir = None
    if other_shifts:
        out_dir = DataPaths(settings).backtest(source, start, end).with_name(
            DataPaths(settings).backtest(source, start, end).name + "-shifts" + "".join(
                "-" + label.replace(":", "") for label in built.calendar.labels))
        console.print(f"shifts {', '.join(built.calendar.labels)} differ from the saved panel's: nothing will be "
                      f"registered; results in {out_dir}")
    address = cluster or settings.dask_scheduler
    with stage(f"backtest {source} {start} to {end}") as step:
        try:  # connect before any work: a wrong address fails in seconds, not after the baseline choice
            with connect(address) if address else nullcontext() as client:
                tracked = run_tracked_backtest(
                    built, source, settings, start, end, forecasters=available, claimed_ratio=ratio, n_boot=n_boot,
                    register=register and not other_shifts, progress=step, audit_layer=layer, out_dir=out_dir,
                    cluster=client,
                )
        except ValueError as exc:
            fail(str(exc))
    print_backtest(tracked)


@app.command()
def claim(
    source: str = typer.Argument(...),
    backtest_dir: Path | None = typer.Option(None, help="A backtest folder (default: the latest for the source)."),
    candidate: str | None = typer.Option(None, help="Forecaster the claim is about (default: the backtest's "
                                            "winner; the learned candidate when the strongest baseline won)."),
    baseline: str | None = typer.Option(None, help="Baseline to compare with (default: the strongest baseline "
                                           "the backtest chose on its validation window)."),
    ratio: float = typer.Option(1.5, help="Claimed ratio of hit rates (1.5 = '50% more effective')."),
    coverage: list[float] = typer.Option(list(HEADLINE_COVERAGES), help="Area coverages to test."),
    n_boot: int = typer.Option(2000),
    resolution: int | None = typer.Option(None, help="Resolution of the backtest (default: the latest at any)."),
    data_dir: Path | None = DataDir,
) -> None:
    """Test 'candidate is at least RATIO times as effective as baseline' on a saved backtest, and state the
    candidate's share of the headroom between the baseline and the shift-of-day clairvoyant ceiling."""
    from forecasting.claim import claim_test
    from forecasting.references import ceiling_hit_rates
    from forecasting.saved import SavedBacktest

    settings = project_settings(data_dir)
    try:
        saved = SavedBacktest.load(backtest_dir or DataPaths(settings).latest_backtest(source, resolution))
        candidate, paired = saved.assessed_pair(candidate, baseline)
        if paired is None:
            raise ValueError(f"{candidate} is the backtest's strongest baseline itself: name another with --baseline")
        baseline = paired
        pair = saved.pair(candidate, baseline)
        per_day = saved.per_day
    except (FileNotFoundError, KeyError, ValueError) as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    results = claim_test(pair[candidate], pair[baseline], saved.observed, saved.areas, saved.origins, per_day,
                         coverages=tuple(coverage), claimed_ratio=ratio, n_boot=n_boot, names=(candidate, baseline))
    ceilings = ceiling_hit_rates(saved.observed, saved.areas, saved.origins, per_day, tuple(coverage))
    for r in results:
        console.print(r.sentence())
        console.print(f"  difference {r.difference:+.3f} ({r.level:.0%} CI {r.difference_low:+.3f} to {r.difference_high:+.3f})")
        console.print("  " + r.headroom_sentence(ceilings[r.coverage]))


QUICK_LIGHTGBM = {"train_days": 365, "learning_rate": 0.1, "n_estimators": 400}


@app.command()
def run(
    source: str = typer.Argument("toronto-mci", help="Source to run end to end: a built-in name or a profile file."),
    path: Path | None = typer.Argument(None, help="Input file (toronto-mci: read from its wheel)."),
    resolution: int | None = Resolution,
    ratio: float = typer.Option(1.5),
    quick: bool = typer.Option(False, "--quick", help="A first look in a few minutes: the last month as the test "
                               "period, LightGBM (a year of training shifts) against the naive, SEPP and all-history maps, no "
                               "bias audit. The full run stays the default."),
    serve_after: bool = typer.Option(True, "--serve/--no-serve", help="Start the service on the new champion afterwards."),
    host: str = typer.Option("127.0.0.1", help="Address the service listens on (with --serve)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port of the service (with --serve)."),
    data_dir: Path | None = DataDir,
) -> None:
    """The whole journey: ingest, panel, backtest of the last full year against every baseline, claim verdict,
    registration and the promotion gate; then (unless --no-serve) a planner key if there is none, and the
    service with the map's URL."""
    from serving.cli.service import ensure_planner_key, serve_forever, show_new_key
    from serving.keys import Role

    ingest(source=source, path=path, profile=None, encoding=None, boundary=None, data_dir=data_dir, no_wait=False,
           cluster=None)
    source = source_profile(source, None, project_settings(data_dir)).name  # a profile file's source name
    panel(source=source, resolution=resolution, boundary=None, layer=None, profile=None, data_dir=data_dir)
    if quick:
        settings = project_settings(data_dir, resolution)
        start, end = last_full_month(load_panel(settings, source))
        backtest(source=source, test_start=datetime(start.year, start.month, 1), test_end=datetime(end.year, end.month, 1),
                 forecaster=["lightgbm", "naive", "sepp", "all_history"], ratio=ratio, n_boot=300, register=True,
                 audit_preset=None, param=[f"{k}={v}" for k, v in QUICK_LIGHTGBM.items()], resolution=resolution,
                 shift_starts=None, cluster=None, data_dir=data_dir)
    else:
        backtest(source=source, test_start=None, test_end=None, forecaster=None, ratio=ratio, n_boot=1000,
                 register=True, audit_preset=None, param=None, resolution=resolution, shift_starts=None,
                 cluster=None, data_dir=data_dir)
    if not serve_after:
        return
    settings = project_settings(data_dir, resolution)
    created = ensure_planner_key(settings)
    if created is not None:
        show_new_key(created, Role.planner)
    serve_forever(settings, host, port, workers=1, reload_seconds=None, access_log=True)
