"""The set-up pieces of ./dev.sh: the throwaway PostgreSQL server the test command starts, and the script's
own command-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url
from throwaway_postgres import REFUSED, closed_ancestor

REPO_ROOT = Path(__file__).resolve().parents[1]
HELPER = REPO_ROOT / "tests" / "throwaway_postgres.py"


def helper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=120)


def libpq(url: str) -> str:
    """The psycopg connection string of a SQLAlchemy URL whose host is a socket folder."""
    u = make_url(url)
    return f"dbname={u.database} user={u.username} password={u.password} host={u.query['host']} port={u.query['port']}"


def test_closed_ancestor_finds_the_first_private_folder(tmp_path):
    private = tmp_path / "private"
    (private / "a" / "b").mkdir(parents=True)
    private.chmod(0o700)
    try:
        assert closed_ancestor(private / "a" / "b") == private
        private.chmod(0o755)
        assert closed_ancestor(private / "a" / "b") != private
    finally:
        private.chmod(0o755)


@pytest.mark.filterwarnings("ignore:.*XDG_RUNTIME_DIR")  # pgserver's lock path fallback (platformdirs), harmless
def test_throwaway_server_starts_with_the_test_database_and_is_gone_after_stop():
    import pgserver._commands

    # a folder of its own under /tmp, as dev.sh makes: as root the server runs as the user `pgserver`, which must
    # reach it, and pytest closes /tmp/pytest-of-<user> to other users whenever another pytest session starts
    pgdata = Path(tempfile.mkdtemp(prefix="hotspots-pg-test."))
    started = helper("start", str(pgdata))
    if os.geteuid() == 0 and closed_ancestor(pgserver._commands.POSTGRES_BIN_PATH) is not None:
        # as root, a private folder above .venv: refuse (dev.sh falls back to Debian's server) and say why
        assert started.returncode == REFUSED and "to other users" in started.stderr
        shutil.rmtree(pgdata)
        return
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("postgresql+psycopg://hotspots:hotspots@/hotspots_test?host=")
        with psycopg.connect(libpq(url)) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == ("hotspots", "hotspots_test")
            conn.execute("CREATE SCHEMA owned_by_the_test_role")  # the tests make schemas of their own
        again = helper("start", str(pgdata))  # idempotent: the running server and the same database
        assert again.returncode == 0 and again.stdout.strip() == url
    finally:
        stopped = helper("stop", str(pgdata))
    assert stopped.returncode == 0, stopped.stderr
    assert not pgdata.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq(url), connect_timeout=2)


def test_as_root_it_refuses_to_open_a_private_folder(tmp_path, monkeypatch, capsys):
    import throwaway_postgres as helper_module

    monkeypatch.setattr(helper_module.os, "geteuid", lambda: 0)
    monkeypatch.setattr(helper_module, "closed_ancestor", lambda path: Path("/root"))
    with pytest.raises(SystemExit) as refused:
        helper_module.start(tmp_path / "pg")
    assert refused.value.code == REFUSED
    assert capsys.readouterr().err.strip() == "pgserver would have to open /root to other users (running as root)"
    assert not (tmp_path / "pg").exists()  # nothing was started or made


def test_helper_usage_error_is_one_line():
    wrong = helper("begin", "/tmp/x")
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0 and "start|stop DIR" in wrong.stderr


@pytest.mark.parametrize("args", [["deploy"], []])
def test_dev_sh_rejects_an_unknown_command_with_usage(args):
    done = subprocess.run([str(REPO_ROOT / "dev.sh"), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    assert "./dev.sh run" in done.stderr and "./dev.sh test" in done.stderr
    if args:
        assert done.stderr.splitlines()[0] == "dev.sh: unknown command deploy: use run or test"


def test_the_fast_loop_leaves_uncollected_only_modules_it_could_not_select():
    """conftest's pytest_ignore_collect: a slow module is not imported when -m cannot select any of its tests,
    and is collected as before for every expression that might (its tests may carry marks of their own)."""
    from conftest import _module_marks, _never_selected

    tests = Path(__file__).parent
    assert _module_marks(tests / "test_schemathesis.py") == {"slow", "service"}
    assert _module_marks(tests / "test_browser.py") == {"slow", "service", "browser"}
    assert _module_marks(tests.parent / "notebooks" / "01_analyst_quickstart.ipynb") == {"slow"}
    assert _module_marks(tests / "test_api.py") is None  # only some of its tests are slow
    assert _module_marks(tests / "service_support.py") is None
    dask = {"slow"}
    for expression in ("not slow", "not slow and not browser", "not (slow or browser)", "not slow and shared_data"):
        assert _never_selected(expression, dask), expression
    for expression in ("slow", "not browser", "shared_data", "not shared_data", "not slow or shared_data",
                       "slow and not shared_data", "not service", "device(serial='1')"):
        assert not _never_selected(expression, dask), expression
    assert _never_selected("not service", {"slow", "service"})
    assert _never_selected("not browser", {"slow", "service", "browser"})
