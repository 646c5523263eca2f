"""Schema migrations of the service database (alembic, scripts in :mod:`serving.migrations`), run at start-up.

The caller holds a lock (a file lock beside a SQLite file, a transaction-scoped advisory lock on PostgreSQL) and
passes its open connection: several workers starting together migrate one after the other, and the later ones
find the schema at head and do nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:  # the migrations ship with the package: a broken install
        raise RuntimeError(f"no migration scripts in {MIGRATIONS}: reinstall the package")
    return revision


def current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection) -> None:
    """Bring the schema to head (a no-op when it is there: no script is loaded then)."""
    if current(connection) != head():
        command.upgrade(alembic_config(connection), "head")
