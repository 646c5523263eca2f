"""A throwaway PostgreSQL server for the test suite, from the pip-installed ``pgserver`` binaries (no system
PostgreSQL needed). Used by ``./dev.sh test``:

    python tools/throwaway_postgres.py start DIR   # prints the URL for HOTSPOTS_TEST_DATABASE_URL
    python tools/throwaway_postgres.py stop DIR    # stops the server and deletes DIR

The server listens only on a Unix socket inside DIR, so checkouts on one machine never fight over a port.
PostgreSQL refuses to run as root; as root, pgserver runs it as a system user ``pgserver`` (created on first
use), which must be able to reach the binaries inside .venv. Rather than open a private folder (e.g. /root)
to other users, ``start`` then refuses with exit code 3 and dev.sh falls back to Debian's PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import warnings
from pathlib import Path

DATABASE = "hotspots_test"
ROLE = "hotspots"
REFUSED = 3
# pgserver keeps its lock in platformdirs' runtime folder, which warns when XDG_RUNTIME_DIR is unset: harmless
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")


def closed_ancestor(path: Path) -> Path | None:
    """The first folder above ``path`` that other users cannot traverse, if any."""
    for folder in path.resolve().parents:
        if not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def start(pgdata: Path) -> str:
    """Start (or reuse) the server in ``pgdata``, create the test database, return its SQLAlchemy URL."""
    import pgserver
    import psycopg
    from pgserver._commands import POSTGRES_BIN_PATH

    if os.geteuid() == 0 and (closed := closed_ancestor(POSTGRES_BIN_PATH)) is not None:
        print(f"pgserver would have to open {closed} to other users (running as root)", file=sys.stderr)
        sys.exit(REFUSED)
    server = pgserver.get_server(pgdata, cleanup_mode=None)  # stays up after this process; `stop` ends it
    info = server.get_postmaster_info()
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is None:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE}' CREATEDB")
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    # the same role, password and database as the Debian fallback: the tests check the password is masked
    return f"postgresql+psycopg://{ROLE}:{ROLE}@/{DATABASE}?host={info.socket_dir}&port={info.port}"


def stop(pgdata: Path) -> None:
    """Stop the server (fast shutdown: tests are over) and delete its folder."""
    if (pgdata / "postmaster.pid").exists():
        import pgserver

        user = "pgserver" if os.geteuid() == 0 else None
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    shutil.rmtree(pgdata, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tools/throwaway_postgres.py start|stop DIR", file=sys.stderr)
        return 2
    pgdata = Path(argv[1]).resolve()
    if argv[0] == "start":
        print(start(pgdata))
    else:
        stop(pgdata)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
