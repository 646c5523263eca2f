"""A backtest grid (``hotspots batch GRID.toml``): sources x resolutions x shift schemes, one task per point.

Each point reads its inputs from the data folder (the incident store, the source's profile, the saved panel's
study area when there is one), re-bins the incidents at its resolution and shifts, backtests its forecasters and
writes its own result folder. A point's folder is built under a temporary name and renamed into place, so it is
either absent or complete; ``point.json`` inside it carries the point's digest (its settings and a stamp of its
inputs). A point whose folder holds the same digest is done and never re-run, so a retried task, a re-run batch
or a batch resumed after a crash adds nothing twice. Nothing here logs to MLflow: the client does that once per
point (``forecasting.reporting.batch_runs``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from features.grid import StudyArea
from features.paths import DataPaths, run_name
from features.pipeline import build_city_panel
from features.profile import ProfileError, load_profile
from features.settings import Settings
from features.store import IncidentStore
from features.storelock import StoreError, atomic_write_text
from forecasting import registry
from forecasting.backtest import run_backtest
from forecasting.metrics import HEADLINE_COVERAGES
from forecasting.saved import protocol_of, save_backtest, write_forecasts
from forecasting.strongest import VALIDATION_DAYS, choose_strongest

POINT_FILE = "point.json"
FIELDS = {"name", "sources", "resolutions", "shift_starts", "forecasters", "test_start", "test_end", "n_boot",
          "strongest_days", "seed", "params"}


class GridError(ValueError):
    """A grid file that cannot run: one line naming the field and the fix."""


@dataclass(frozen=True)
class GridPoint:
    """One task of the grid: everything its result depends on besides the stored incidents."""

    batch: str
    source: str
    resolution: int
    shift_starts: tuple[str, ...]
    forecasters: tuple[str, ...]
    test_start: str | None  # ISO local dates; None: the panel's last full month
    test_end: str | None
    n_boot: int
    strongest_days: int
    seed: int
    params: str  # forecaster parameters as sorted JSON (hashable)

    @property
    def folder_name(self) -> str:
        shifts = "-".join(s.replace(":", "") for s in self.shift_starts)
        period = (f"{self.test_start.replace('-', '')}-{self.test_end.replace('-', '')}"
                  if self.test_start and self.test_end else "last-month")
        return f"{run_name(self.source, self.resolution)}-shifts-{shifts}-{period}"

    def label(self) -> str:
        return f"{self.source} r{self.resolution} shifts {','.join(self.shift_starts)}"

    def spec(self) -> dict[str, Any]:
        return {**asdict(self), "params": json.loads(self.params)}


@dataclass(frozen=True)
class Grid:
    name: str
    points: tuple[GridPoint, ...]
    path: str = ""


@dataclass
class PointResult:
    """What a task returns: the point's summary (``point.json``), or a one-line error."""

    point: GridPoint
    folder: str
    digest: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    reused: bool = False  # the folder already held this digest: nothing was computed
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --- the grid file ----------------------------------------------------------------------------------------------
def load_grid(path: str | Path, settings: Settings | None = None) -> Grid:
    """Read and check a grid file; every problem is a GridError of one line naming the field and the fix."""
    path = Path(path)
    settings = settings or Settings()
    where = f"grid {path}"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{where}: no such file; give a TOML file with sources, resolutions and shift_starts") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GridError(f"{where}: not readable TOML ({exc}); fix the file's syntax") from None
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise GridError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(FIELDS))}")

    def strings(key: str, default: list[str] | None = None) -> list[str]:
        value = raw.get(key, default)
        if value is None:
            raise GridError(f"{where}: field {key} is required; e.g. {key} = [\"toronto-mci\"]")
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise GridError(f"{where}: field {key} must be a non-empty list of strings, not {value!r}")
        return value

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise GridError(f"{where}: field name {name!r} must be a folder name of letters, digits, '_', '.' and '-'")
    sources = strings("sources")
    resolutions = raw.get("resolutions", [settings.h3_resolution])
    if (not isinstance(resolutions, list) or not resolutions
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= 15 for r in resolutions)):
        raise GridError(f"{where}: field resolutions must be a list of H3 resolutions 0-15, e.g. [8, 9], not {resolutions!r}")
    schemes = []
    for scheme in raw.get("shift_starts", [",".join(settings.shift_starts)]):
        parts = scheme if isinstance(scheme, list) else str(scheme).split(",")
        starts = tuple(str(p).strip() for p in parts if str(p).strip())
        try:
            for s in starts:
                datetime.strptime(s, "%H:%M")
        except ValueError:
            starts = ()
        if not starts:
            raise GridError(f"{where}: field shift_starts: {scheme!r} is not a list of local HH:MM starts; "
                            "write e.g. shift_starts = [\"06:00,14:00,22:00\", \"00:00\"]")
        schemes.append(starts)
    forecasters = strings("forecasters", registry.default_names())
    unknown_f = [f for f in forecasters if f not in registry.names()]
    if unknown_f:
        raise GridError(f"{where}: field forecasters: unknown {unknown_f}; choose from {registry.names()}")
    period = [_date(raw.get(k), k, where) for k in ("test_start", "test_end")]
    if (period[0] is None) != (period[1] is None) or (period[0] and period[1] and period[0] >= period[1]):
        raise GridError(f"{where}: give both test_start and test_end (test_start before test_end), or neither "
                        "for each point's last full month")
    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(k in forecasters and isinstance(v, dict) for k, v in params.items()):
        raise GridError(f"{where}: field params must be tables of the grid's forecasters, e.g. "
                        "[params.lightgbm] n_estimators = 50")
    for forecaster, values in params.items():
        try:
            registry.make(forecaster, **values)
        except (TypeError, ValueError) as exc:
            raise GridError(f"{where}: [params.{forecaster}]: {exc}; use the forecaster's parameter names") from None
    numbers = {}
    for key, default, low in (("n_boot", 200, 1), ("strongest_days", VALIDATION_DAYS, 1), ("seed", 0, 0)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise GridError(f"{where}: field {key} must be an integer >= {low}, not {value!r}")
        numbers[key] = value
    points = tuple(
        GridPoint(name, source, res, scheme, tuple(forecasters), period[0], period[1], numbers["n_boot"],
                  numbers["strongest_days"], numbers["seed"], json.dumps(params, sort_keys=True))
        for source, res, scheme in itertools.product(sources, resolutions, schemes))
    if len({p.folder_name for p in points}) != len(points):
        raise GridError(f"{where}: the grid repeats a point; list each source, resolution and shift scheme once")
    return Grid(name, points, str(path))


def _date(value: Any, key: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    try:
        return date.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise GridError(f"{where}: field {key} {value!r} is not a date; write e.g. {key} = 2021-01-01") from None


# --- where a point's results live, and whether it is done -----------------------------------------------------
def batch_folder(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / "batches" / name


def point_folder(data_dir: str | Path, point: GridPoint) -> Path:
    return batch_folder(data_dir, point.batch) / point.folder_name


def inputs_stamp(data_dir: str | Path, source: str) -> list[list[Any]]:
    """Names, sizes and modification times of the source's stored incidents: a new ingest changes it, so a
    point whose inputs changed is computed again instead of being taken as done."""
    store = IncidentStore(data_dir)
    try:  # the committed partitions (or an unconverted single file): a new ingest changes their names
        files = store.partition_files(source)
    except FileNotFoundError:
        files = []
    return [[str(f.relative_to(Path(data_dir))), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def digest_of(point: GridPoint, data_dir: str | Path) -> str:
    blob = json.dumps({"point": point.spec(), "inputs": inputs_stamp(data_dir, point.source)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finished(folder: Path, digest: str) -> dict[str, Any] | None:
    """The point's summary when its folder is complete and made from these inputs, else None."""
    try:
        summary = json.loads((folder / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("digest") == digest else None


# --- one point: the task ----------------------------------------------------------------------------------------
def run_point(point: GridPoint, data_dir: str, digest: str | None = None) -> PointResult:
    """Compute one grid point into its own folder (or return the folder's summary when it is done). Problems of
    the data or the grid come back as a one-line error: retrying them would fail the same way."""
    started = time.perf_counter()
    digest = digest or digest_of(point, data_dir)
    folder = point_folder(data_dir, point)
    done = finished(folder, digest)
    if done is not None:
        return PointResult(point, str(folder), digest, done, reused=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        summary = _compute(point, Path(data_dir), tmp, digest)
        _publish(tmp, folder, digest)
    except (ValueError, FileNotFoundError, StoreError, ProfileError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return PointResult(point, str(folder), digest, error=f"{point.label()}: {first}",
                           seconds=time.perf_counter() - started)
    return PointResult(point, str(folder), digest, finished(folder, digest) or summary,
                       seconds=time.perf_counter() - started)


def _publish(tmp: Path, folder: Path, digest: str) -> None:
    """Rename the complete temporary folder into place. A twin attempt that finished first wins (same inputs,
    same bytes); a stale folder (other inputs) is moved aside and removed."""
    try:
        os.rename(tmp, folder)
        return
    except OSError:
        pass
    if finished(folder, digest) is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = folder.parent / f".old-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _compute(point: GridPoint, data_dir: Path, out: Path, digest: str) -> dict[str, Any]:
    started = time.perf_counter()
    settings = Settings(data_dir=data_dir, h3_resolution=point.resolution, shift_starts=list(point.shift_starts))
    paths = DataPaths(settings)
    profile = load_profile(point.source, remembered=paths.profiles_root)
    incidents = IncidentStore(data_dir).read(point.source)
    saved_area = paths.panel(point.source) / "study_area"
    area = StudyArea.load(saved_area) if saved_area.with_suffix(".json").is_file() else None
    panel = build_city_panel(incidents, profile, settings, resolution=point.resolution,
                             shift_starts=point.shift_starts, study_area=area, name=point.source).panel
    del incidents
    start, end = _period(point, panel)
    params = json.loads(point.params)
    forecasters = registry.factories(list(point.forecasters), seed=point.seed, params=params)
    baselines = {n: make for n, make in forecasters.items() if not make().learned}
    zone = ZoneInfo(panel.calendar.timezone)
    first = datetime(start.year, start.month, start.day, tzinfo=zone)
    firsts = panel.calendar.shift_range(first, first + timedelta(days=2))
    if firsts.size == 0:
        raise ValueError(f"no shift starts on {start}")
    strongest = choose_strongest(panel, int(firsts[0]), baselines, point.strongest_days) if baselines else None
    result = run_backtest(panel, start, end, forecasters, processes=1)  # the grid is parallel by point already
    summaries = result.summaries(n_boot=point.n_boot, seed=point.seed)
    result.tidy().write_parquet(out / "results.parquet")
    write_forecasts(out, panel, result.origins, result.observed, result.predictions)
    meta = protocol_of(panel, point.source, test_start=str(start), test_end=str(end), refit="monthly",
                       strongest_baseline=strongest.name if strongest else None, batch=point.batch)
    save_backtest(out, result.origins, result.observed, result.areas, result.predictions, meta)
    if strongest is not None:
        (out / "strongest.json").write_text(json.dumps(strongest.as_dict(), indent=2))
    metrics: dict[str, float] = {}
    for name, s in summaries.items():
        for j, cov in enumerate(s.coverages):
            if cov in HEADLINE_COVERAGES:
                tag = f"{cov * 100:g}pct"
                for metric in ("hit_rate", "pai", "pei"):
                    metrics[f"{name}.{metric}.{tag}"] = float(s.point[metric][j])
                metrics[f"{name}.hit_rate_low.{tag}"] = float(s.low["hit_rate"][j])
                metrics[f"{name}.hit_rate_high.{tag}"] = float(s.high["hit_rate"][j])
        metrics[f"{name}.poisson_deviance"] = float(s.deviance)
        metrics[f"{name}.fit_seconds"] = float(result.fit_seconds[name])
    summary = {"digest": digest, "point": point.spec(), "protocol": meta, "test_start": str(start),
               "test_end": str(end), "strongest_baseline": strongest.name if strongest else None,
               "n_shifts": int(result.origins.size), "n_cells": int(panel.n_cells),
               "crimes": float(np.asarray(result.observed).sum()), "metrics": metrics,
               "seconds": time.perf_counter() - started}
    atomic_write_text(json.dumps(summary, indent=2, default=str), out / POINT_FILE)  # last: marks the folder complete
    return summary


def _period(point: GridPoint, panel) -> tuple[date, date]:
    if point.test_start and point.test_end:
        return date.fromisoformat(point.test_start), date.fromisoformat(point.test_end)
    last_day = panel.calendar.local_date(panel.end_shift - 1)
    end = date(last_day.year, last_day.month, 1)
    if (last_day + timedelta(days=1)).month != last_day.month:
        end = last_day + timedelta(days=1)
    return date(end.year - (end.month == 1), (end.month - 2) % 12 + 1, 1), end


# --- many points: locally or as Dask tasks ------------------------------------------------------------------------
def run_points(points: list[GridPoint], data_dir: str | Path, client: Any = None,
               retries: int = 3) -> Iterator[PointResult]:
    """Every point, as results arrive: in this process one after another (``client`` None) or as Dask tasks
    with ``retries``. Points already done are answered from their folders without a task."""
    data_dir = str(Path(data_dir).resolve())
    todo: list[tuple[GridPoint, str]] = []
    for point in points:
        digest = digest_of(point, data_dir)
        done = finished(point_folder(data_dir, point), digest)
        if done is not None:
            yield PointResult(point, str(point_folder(data_dir, point)), digest, done, reused=True)
        else:
            todo.append((point, digest))
    if client is None:
        for point, digest in todo:
            yield run_point(point, data_dir, digest)
        _sweep(data_dir, points)
        return
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    # the key is the point's folder and digest: the same point submitted twice (two clients, a resubmitted batch)
    # is one task; the same point of another data folder is another
    where = hashlib.sha256(data_dir.encode()).hexdigest()[:8]
    futures = {client.submit(run_point, point, data_dir, digest, key=f"batch-point-{where}-{digest}", retries=retries,
                             pure=False): (point, digest) for point, digest in todo}
    try:
        for future in as_completed(futures):
            point, digest = futures[future]
            try:
                yield future.result()
            except KilledWorker as exc:
                yield PointResult(point, str(point_folder(data_dir, point)), digest,
                                  error=f"{point.label()}: the task killed every worker it ran on ({exc}); give the "
                                        "workers more memory (`dask worker --memory-limit`)")
            except Exception as exc:  # noqa: BLE001  # a bug in one task must not lose the other points' results
                first = (str(exc).strip().splitlines() or [""])[0]
                yield PointResult(point, str(point_folder(data_dir, point)), digest,
                                  error=f"{point.label()}: {type(exc).__name__}: {first}")
    finally:
        for future in futures:
            future.cancel()
    _sweep(data_dir, points)


def _sweep(data_dir: str | Path, points: list[GridPoint]) -> None:
    """Remove temporary folders left by attempts that died mid-write (every task of the batch has ended)."""
    for name in {p.batch for p in points}:
        for leftover in batch_folder(data_dir, name).glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in batch_folder(data_dir, name).glob(".old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
