"""Each city's panel and champion model, kept loaded for the API.

Cities are the panels saved by ``hotspots panel`` under ``data_dir/panels/<city>-r<resolution>`` (at the
configured resolution); a city's model is the version its registered model ``hotspots-<city>`` carries under
the ``champion`` alias. Every champion that loads is also kept on disk, ``data_dir/serving/<city>/v<version>``
(the MLflow model folder, downloaded from the registry) with ``champion.json`` naming it: the last-good copy.
When the registry cannot be reached the store keeps serving what it has in memory, or at start-up loads that
local copy and says so (``source == "local_fallback"``).

:meth:`ModelStore.refresh` re-reads the panels folder (new, changed or removed panels) and the registry
(champion moved, removed or new) and swaps in a new snapshot under a lock; requests call
:meth:`ModelStore.maybe_refresh`, which starts such a refresh in a background thread at most every
``refresh_seconds`` and returns at once: a moved champion is downloaded, unpickled and warmed (``warm``: the
forecasts recently asked of the city, computed with the new model) off the request path, and swapped in when
ready, so no request waits for a model load. Readers only ever see whole snapshots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import forecasting.registry  # noqa: F401  (every forecaster's module imported before a model is unpickled: never the model's code copy)
from features.panel import CountPanel
from features.paths import DataPaths, split_run_name
from features.settings import Settings
from forecasting.reporting.tracking import CHAMPION, registered_name
from serving.caches import ComputeOnceCache

log = logging.getLogger("hotspots.serving")

ModelSource = Literal["registry", "local_fallback"]
KEEP_COPIES = 3  # model versions kept on disk per city (the champion included)
NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
# Background refreshes start at least this long after the previous one ended, even with refresh_seconds 0: a
# registry read is tens of ms of Python, and back-to-back reads would take the GIL from the requests.
MIN_REFRESH_GAP = 0.25
# A background refresh (registry read, model unpickling, warm-up forecasts) runs at this nice on its own thread
# (Linux applies nice per thread): on a busy machine the request threads get the CPU first, the swap waits.
REFRESH_NICE = 10


class RegistryUnreachable(RuntimeError):
    """The MLflow registry did not answer (server down, database unreadable, ...)."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    forecaster: Any  # any fitted registered forecaster
    source: ModelSource
    run_id: str | None
    loaded_at: datetime
    path: Path
    trained: dict[str, str] = field(default_factory=dict)  # resolution, shift_starts of the training run

    @property
    def target(self) -> str:
        """The category the model forecasts: 'all', one category, or several joined by '+'."""
        category = getattr(self.forecaster, "category", None)
        if category is None:
            return "all"
        return category if isinstance(category, str) else "+".join(category)


@dataclass(frozen=True)
class CityState:
    city: str
    registered_name: str
    panel_dir: Path
    panel: CountPanel | None
    panel_token: str
    model: LoadedModel | None
    status: Literal["ready", "no_champion", "registry_unreachable", "load_failed", "panel_error", "model_mismatch"]
    message: str | None
    registry_reachable: bool
    checked_at: datetime

    @property
    def ready(self) -> bool:
        return self.model is not None and self.panel is not None and self.status != "model_mismatch"


def _now() -> datetime:
    return datetime.now(UTC)


class ModelStore:
    def __init__(self, settings: Settings, refresh_seconds: float = 60.0):
        self.settings = settings
        self.refresh_seconds = refresh_seconds
        paths = DataPaths(settings)
        self.panels_root = paths.panels_root
        self.local_root = paths.serving_root
        self.registry_reachable: bool | None = None
        self.registry_error: str | None = None
        self._states: dict[str, CityState] = {}
        # the last KEEP_COPIES versions loaded, in memory: an alias moved back (a rollback) is not unpickled again
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()
        self._last_refresh: float | None = None
        # called with a city's next state when its model or panel changed, before that state is swapped in
        self.warm: Callable[[CityState], None] | None = None

    # --- reading -----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, CityState]:
        return self._states

    def cities(self) -> list[str]:
        return sorted(self._states)

    def get(self, city: str) -> CityState | None:
        return self._states.get(city)

    # --- refreshing --------------------------------------------------------------------------------
    @property
    def refreshed(self) -> bool:
        """Whether a first snapshot exists (before it, :meth:`maybe_refresh` refreshes in line)."""
        return self._last_refresh is not None

    def maybe_refresh(self) -> None:
        """Never waits for a load: before the first snapshot (start-up) it refreshes in line (there is nothing to
        serve yet); afterwards, when one is due and none is running, a background thread refreshes."""
        if self._last_refresh is None:
            self.refresh()
            return
        if time.monotonic() - self._last_refresh < max(self.refresh_seconds, MIN_REFRESH_GAP):
            return
        if self._lock.acquire(blocking=False):  # someone else refreshing: serve the current snapshot
            try:
                threading.Thread(target=self._refresh_in_background, name="model-refresh", daemon=True).start()
            except BaseException:
                self._lock.release()
                raise

    def _refresh_in_background(self) -> None:
        """Runs with ``_lock`` held (taken by :meth:`maybe_refresh`), releases it when done."""
        try:
            _lower_priority()
            self._refresh_locked()
        except Exception:  # noqa: BLE001 - a failed refresh must not fail anything: keep the snapshot
            log.exception("model refresh failed; still serving the previous snapshot")
        finally:
            self._lock.release()

    def refresh(self) -> dict[str, CityState]:
        with self._lock:
            return self._refresh_locked()

    def registry_file(self) -> Path | None:
        """The SQLite file of an embedded registry (None for a server or another store)."""
        uri = self.settings.tracking_uri
        return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None

    def registry_present(self) -> bool:
        """Cheap check for /readyz: an embedded registry's file still exists."""
        path = self.registry_file()
        return path is None or path.is_file()

    def client(self):
        """A client on the registry; never creates one: MLflow makes an empty SQLite registry on connect, so a
        missing file, or one without the registry's tables, counts as unreachable (the local copy is served)."""
        from mlflow.tracking import MlflowClient

        path = self.registry_file()
        if path is not None:
            if not path.is_file():
                raise RegistryUnreachable(f"the registry file {path.name} is missing")
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as raw:
                found = raw.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                    "AND name = 'registered_models'").fetchone()
            if found is None:
                raise RegistryUnreachable(f"the registry file {path.name} holds no model registry")
        uri = self.settings.tracking_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _refresh_locked(self) -> dict[str, CityState]:
        panels = self._discover()
        try:
            client = self.client()
            reachable, error = True, None
        except Exception as exc:  # noqa: BLE001 - any failure to open the registry is "unreachable"
            client, reachable, error = None, False, _redact(f"{type(exc).__name__}: {exc}")
        states: dict[str, CityState] = {}
        for city, folder in panels.items():
            old = self._states.get(city)
            panel, token, panel_error = self._panel(folder, old)
            champion = None
            if reachable:
                try:
                    champion = self._champion(client, city)
                except RegistryUnreachable as exc:
                    reachable, error = False, str(exc)  # do not wait on the registry again for the other cities
            model, status, message = self._model(client, city, old, champion, reachable, error)
            mismatch = _mismatch(model, panel) if panel is not None and model is not None else None
            if mismatch:
                status, message = "model_mismatch", mismatch
            if panel is None:
                status = "panel_error"
                message = f"panel at {folder} could not be read ({panel_error}): run `hotspots panel {city}`"
            states[city] = CityState(city, registered_name(city), folder, panel, token, model, status, message,
                                     reachable, _now())
            if old is not None and self.warm is not None and states[city].ready and (
                    old.model is None or old.model.version != model.version or old.panel_token != token):
                try:  # before the swap: the first requests on the new model find its forecasts computed
                    self.warm(states[city])
                except Exception:  # noqa: BLE001 - a cold cache is slower, not wrong
                    log.exception("warming %s version %s failed", city, model.version)
        self._states = states
        self.registry_reachable, self.registry_error = reachable, error
        self._last_refresh = time.monotonic()
        return states

    def _discover(self) -> dict[str, Path]:
        """Cities: the saved panels at the settings' resolution (``<city>-r<resolution>`` folders)."""
        if not self.panels_root.is_dir():
            return {}
        found = ((split_run_name(d.name, self.settings.h3_resolution), d) for d in sorted(self.panels_root.iterdir()))
        return {city: d for city, d in found if city and d.is_dir() and (d / "panel.json").is_file()}

    @staticmethod
    def _panel_token(folder: Path) -> str:
        parts = []
        for name in ("panel.json", "counts.parquet"):
            try:
                stat = (folder / name).stat()
                parts.append(f"{stat.st_mtime_ns}:{stat.st_size}")
            except OSError:
                parts.append("missing")
        return "/".join(parts)

    def _panel(self, folder: Path, old: CityState | None) -> tuple[CountPanel | None, str, str | None]:
        token = self._panel_token(folder)
        if old is not None and old.panel is not None and old.panel_token == token:
            return old.panel, token, None
        try:
            return CountPanel.load(folder), token, None
        except Exception as exc:  # noqa: BLE001 - a broken panel must not take the other cities down
            log.exception("cannot read the panel at %s", folder)
            return (old.panel if old is not None else None), token, f"{type(exc).__name__}: {exc}"

    def _champion(self, client, city: str) -> tuple[str, str | None] | None:
        """(version, run id) of the city's champion, None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            found = client.get_model_version_by_alias(registered_name(city), CHAMPION)
        except MlflowException as exc:
            if exc.error_code in NOT_FOUND_CODES:
                return None
            raise RegistryUnreachable(_redact(f"{type(exc).__name__}: {exc}")) from exc
        except Exception as exc:  # noqa: BLE001
            raise RegistryUnreachable(_redact(f"{type(exc).__name__}: {exc}")) from exc
        return str(found.version), found.run_id

    def _model(self, client, city: str, old: CityState | None, champion, reachable: bool, error: str | None):
        current = old.model if old is not None else None
        if not reachable:
            if current is not None:
                return current, "ready", f"model registry unreachable ({error}); serving the model loaded before"
            fallback = self._load_local(city)
            if fallback is not None:
                return fallback, "ready", f"model registry unreachable ({error}); serving the last-good local copy"
            return None, "registry_unreachable", (
                f"model registry unreachable ({error}) and no local copy of a champion for {city!r} in "
                f"{self.local_root / city}: check HOTSPOTS_MLFLOW_TRACKING_URI / the registry server")
        if champion is None:
            return None, "no_champion", (
                f"no champion model for {city!r}: run `hotspots backtest {city}`, which registers the backtest's "
                f"winner against the strongest baseline and makes it the champion")
        version, run_id = champion
        if current is not None and current.version == version:
            return (current if current.source == "registry" else replace(current, source="registry")), "ready", None
        try:
            return self._load_version(client, city, version, run_id), "ready", None
        except Exception as exc:  # noqa: BLE001 - keep serving the previous model
            log.exception("cannot load %s version %s", registered_name(city), version)
            message = f"champion version {version} of {registered_name(city)} failed to load ({type(exc).__name__}: {exc})"
            if current is not None:
                return current, "load_failed", message + f"; still serving version {current.version}"
            return None, "load_failed", message

    # --- loading and the local copy ----------------------------------------------------------------
    def _load_version(self, client, city: str, version: str, run_id: str | None) -> LoadedModel:
        import mlflow

        name = registered_name(city)
        folder = self.local_root / city
        target = folder / f"v{version}"
        kept = self._loaded.get((name, version))
        if kept is not None and (target / "MLmodel").is_file():  # registry versions are immutable
            model = replace(kept, source="registry", loaded_at=_now())
            self._write_pointer(folder, model)
            return model
        if not (target / "MLmodel").is_file():  # registry versions are immutable: a complete copy is reusable
            partial = folder / f".v{version}-{uuid.uuid4().hex[:8]}.partial"
            uri = self.settings.tracking_uri
            try:
                got = mlflow.artifacts.download_artifacts(artifact_uri=_storage_uri(client, name, version),
                                                          dst_path=str(partial), tracking_uri=uri, registry_uri=uri)
                if target.exists():  # an incomplete copy
                    shutil.rmtree(target, ignore_errors=True)
                try:
                    os.replace(got, target)
                except OSError:
                    if not (target / "MLmodel").is_file():  # not another process finishing the same copy first
                        raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        model = LoadedModel(name, version, _load_forecaster(target), "registry", run_id, _now(), target,
                            _trained(client, run_id))
        self._write_pointer(folder, model)
        self._loaded[(name, version)] = model
        for old in list(self._loaded)[:-KEEP_COPIES]:
            del self._loaded[old]
        return model

    def _write_pointer(self, folder: Path, model: LoadedModel) -> None:
        tmp = folder / f".champion-{uuid.uuid4().hex[:8]}.json"
        tmp.write_text(json.dumps({"name": model.name, "version": model.version, "run_id": model.run_id,
                                   "path": model.path.name, "saved_at": model.loaded_at.isoformat(),
                                   "trained": model.trained}, indent=2))
        os.replace(tmp, folder / "champion.json")
        # keep the last-good copy and the most recent others: swapping back needs no download, and another
        # worker sharing the folder is not left loading a version this one has just removed
        others = sorted((p for p in folder.iterdir() if p.is_dir() and p != model.path and not p.name.startswith(".")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for other in others[KEEP_COPIES - 1:]:
            shutil.rmtree(other, ignore_errors=True)

    def _load_local(self, city: str) -> LoadedModel | None:
        pointer = self.local_root / city / "champion.json"
        if not pointer.is_file():
            return None
        try:
            meta = json.loads(pointer.read_text())
            path = pointer.parent / meta["path"]
            return LoadedModel(meta["name"], str(meta["version"]), _load_forecaster(path), "local_fallback",
                               meta.get("run_id"), _now(), path, dict(meta.get("trained") or {}))
        except Exception:  # noqa: BLE001
            log.exception("cannot load the local copy for %s", city)
            return None

    # --- registry listing (for /v1/models) ---------------------------------------------------------
    def versions(self, city: str) -> tuple[bool, dict[str, str], list]:
        """(registered?, aliases -> version, model versions) of the city's registered model."""
        from mlflow.exceptions import MlflowException

        name = registered_name(city)
        try:
            client = self.client()
            try:
                registered = client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code in NOT_FOUND_CODES:
                    return False, {}, []
                raise
            escaped = name.replace("'", "\\'")
            versions = client.search_model_versions(f"name = '{escaped}'")
        except Exception as exc:  # noqa: BLE001
            raise RegistryUnreachable(_redact(f"{type(exc).__name__}: {exc}")) from exc
        aliases = {alias: str(version) for alias, version in (registered.aliases or {}).items()}
        return True, aliases, sorted(versions, key=lambda v: -int(v.version))


def public_message(state: CityState) -> str | None:
    """What /readyz (unauthenticated) may say about a city: versions and what to do, never error text or paths."""
    if state.status == "registry_unreachable":
        return "the model registry cannot be read and there is no local copy of a champion (details in the service log)"
    if state.status == "load_failed" and state.message:
        head = state.message.split(" failed to load", 1)[0]
        still = re.search(r"; still serving version \S+$", state.message)
        return f"{head} failed to load (details in the service log)" + (still.group(0) if still else "")
    if state.status == "ready" and state.model is not None and state.model.source == "local_fallback":
        return "the model registry cannot be read; serving the last-good local copy"
    if state.status == "ready" and state.message:
        return "the model registry cannot be read; serving the model loaded before"
    return state.message


def _redact(text: str) -> str:
    """Drop credentials from URLs in messages (/readyz is unauthenticated)."""
    return re.sub(r"://[^/@\s]+@", "://***@", text)


# a run's parameters never change: read once per run (get_run loads every param, metric and tag, ~70 ms of CPU);
# bounded, since a long-lived service sees a new training run with every retrain
_TRAINED: ComputeOnceCache[dict[str, str]] = ComputeOnceCache(256)


def _trained(client, run_id: str | None) -> dict[str, str]:
    """The training run's resolution and shift starts (best effort: older runs may lack them)."""
    if not run_id:
        return {}

    def read() -> dict[str, str]:
        params = client.get_run(run_id).data.params
        return {k: params[k] for k in ("resolution", "shift_starts") if k in params}

    try:
        trained, _ = _TRAINED.get_or_compute(run_id, read)
    except Exception:  # noqa: BLE001
        return {}  # not kept: the next load asks again
    return dict(trained)


def _mismatch(model: LoadedModel, panel: CountPanel) -> str | None:
    """A model trained on another grid or shift calendar would silently mis-forecast this panel."""
    resolution, starts = model.trained.get("resolution"), model.trained.get("shift_starts")
    if resolution is not None and str(resolution) != str(panel.study_area.resolution):
        return (f"champion version {model.version} of {model.name} was trained at H3 resolution {resolution}, the panel "
                f"is at {panel.study_area.resolution}: serve with HOTSPOTS_H3_RESOLUTION={resolution} or promote a "
                f"model trained at {panel.study_area.resolution}")
    if starts is not None and starts != ",".join(panel.calendar.labels):
        return (f"champion version {model.version} of {model.name} was trained on shifts starting {starts}, the panel "
                f"has {','.join(panel.calendar.labels)}: rebuild the panel or promote a model trained on these shifts")
    return None


def _lower_priority() -> None:
    """Nice the calling thread by REFRESH_NICE (Linux: per thread; elsewhere, or when refused, nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), REFRESH_NICE)
    except (AttributeError, OSError) as exc:
        log.debug("background refresh keeps the normal priority: %s", exc)


def _storage_uri(client, name: str, version: str) -> str:
    """Where the version's files are, asked of *our* client: ``models:/name/version`` URIs are resolved by
    MLflow against the process-wide registry URI, whatever registry_uri is passed to download_artifacts."""
    uri = client.get_model_version_download_uri(name, version)
    if uri.startswith("models:/"):  # a logged-model reference (MLflow 3): resolve it to its artifact location
        uri = client.get_logged_model(uri.removeprefix("models:/").split("/")[0]).artifact_location
    return uri


# the model environments (requirements.txt + python_env.yaml) already checked against this process's packages
_CHECKED_ENVIRONMENTS: set[str] = set()


def _environment(path: Path) -> str | None:
    """A digest of the model's declared environment, None when it declares none."""
    import hashlib

    parts = [path / "requirements.txt", path / "python_env.yaml"]
    if not any(p.is_file() for p in parts):
        return None
    return hashlib.blake2b(b"\0".join(p.read_bytes() if p.is_file() else b"" for p in parts), digest_size=16).hexdigest()


def _load_forecaster(path: Path):
    """The forecaster of a pyfunc model folder. MLflow warns when the model's declared packages or Python differ
    from this process's; that check (~50 ms of CPU, reading package metadata) runs once per distinct environment:
    a retrained champion declares the same one, and each load's CPU is taken from the requests served beside it."""
    import mlflow

    environment = _environment(path)
    checked = environment is not None and environment in _CHECKED_ENVIRONMENTS
    pyfunc = mlflow.pyfunc.load_model(str(path), suppress_warnings=checked)
    if environment is not None:
        _CHECKED_ENVIRONMENTS.add(environment)
    forecaster = pyfunc.unwrap_python_model().forecaster
    for needed in ("predict", "predict_explained"):
        if not callable(getattr(forecaster, needed, None)):
            raise TypeError(f"the model's forecaster ({type(forecaster).__name__}) has no {needed}(): re-register it "
                            f"with this version of hotspots (`hotspots backtest`)")
    return forecaster
