"""The service's own database (API keys, the audit log, the patrol log) via SQLAlchemy: SQLite at
``data_dir/serving.db`` by default, any SQLAlchemy URL with ``HOTSPOTS_DATABASE_URL`` (PostgreSQL through
psycopg 3: ``postgresql+psycopg://user:password@host:5432/db``; ``?options=-csearch_path%3Dschema`` picks a schema).

The schema is made and evolved by alembic migrations (:mod:`serving.migrate`), run at start-up under a lock.
The audit and patrol tables are append-only: the service only ever inserts, and triggers (made by the
migrations) make UPDATE and DELETE (and TRUNCATE on PostgreSQL) fail, so a bug or a stray query cannot rewrite
history. (A retention job would drop the triggers explicitly.) :class:`Database` is the one place that knows
dialects.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    DateTime,
    Double,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from features.settings import Settings
from serving.migrate import upgrade

log = logging.getLogger("hotspots.serving")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite keeps no offset: values are written in UTC and read back naive."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    salt: Mapped[bytes] = mapped_column(LargeBinary(32))
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    role: Mapped[str] = mapped_column(String(20))
    endpoint: Mapped[str] = mapped_column(String(200))
    params: Mapped[str] = mapped_column(Text)  # JSON object of the request parameters (resolved shift included)
    city: Mapped[str | None] = mapped_column(String(100), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    response_bytes: Mapped[int] = mapped_column(Integer)
    row_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # see serving.chain
    flagged: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON H3 ids a hotspots response flagged


class PatrolRow(Base):
    """One report of patrol time in a cell and shift. Reports are only added: readers sum the doses."""

    __tablename__ = "patrol_log"
    __table_args__ = (Index("ix_patrol_log_city_shift", "city", "shift_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    city: Mapped[str] = mapped_column(String(100))
    shift_id: Mapped[int] = mapped_column(BigInteger)
    shift_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC
    h3: Mapped[str] = mapped_column(String(16))
    dose_minutes: Mapped[float] = mapped_column(Double)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    row_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # see serving.chain


class OverrideRow(Base):
    """A flagged cell that was not patrolled in a shift, and why: one of OVERRIDE_REASONS (``other`` with a short
    lower-case code), never free text. Only added, like the patrol log."""

    __tablename__ = "patrol_overrides"
    __table_args__ = (Index("ix_patrol_overrides_city_shift", "city", "shift_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    city: Mapped[str] = mapped_column(String(100))
    shift_id: Mapped[int] = mapped_column(BigInteger)
    shift_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC
    h3: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    code: Mapped[str | None] = mapped_column(String(24), nullable=True)
    key_id: Mapped[str] = mapped_column(String(32))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    row_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # see serving.chain


class IdempotencyRow(Base):
    """The first answer to a patrol post sent with an Idempotency-Key: a retry gets it back, nothing is stored twice."""

    __tablename__ = "idempotency_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


APPEND_ONLY_TABLES = ("audit_log", "patrol_log", "patrol_overrides")


_PG_SCHEMA_LOCK = 0x686F7473706F7473 >> 2  # any constant bigint: serialises schema set-up across workers


def database_url(settings: Settings) -> str:
    """``settings.database_url`` (HOTSPOTS_DATABASE_URL), else SQLite in the data folder."""
    if settings.database_url:
        return settings.database_url
    return f"sqlite:///{(Path(settings.data_dir) / 'serving.db').resolve()}"


@contextmanager
def _schema_lock(sqlite_path: str | None) -> Iterator[None]:
    """Workers starting together on one SQLite file create the schema one at a time (an advisory lock on a file
    beside it, across processes and threads); PostgreSQL serialises with an advisory lock of its own."""
    if not sqlite_path or sqlite_path == ":memory:":
        yield
        return
    with open(f"{sqlite_path}.schema-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MissingDriver(RuntimeError):
    """The configured database needs a driver that is not installed."""


def _require_driver(dialect: str) -> None:
    if dialect == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise MissingDriver('HOTSPOTS_DATABASE_URL names a PostgreSQL database but its driver, psycopg, is not '
                                'installed: pip install "hotspots[postgres]"') from None


class Database:
    """One engine and session factory; the schema is migrated to head when it is opened."""

    def __init__(self, url: str):
        parsed = make_url(url)
        if parsed.drivername in ("postgresql", "postgres"):  # the installed driver is psycopg 3, not psycopg2
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.url = url = parsed.render_as_string(hide_password=False)
        self.dialect = parsed.get_backend_name()
        _require_driver(self.dialect)
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        try:
            with _schema_lock(parsed.database if self.dialect == "sqlite" else None):
                with self.engine.begin() as conn:
                    self._create_schema(conn)
        except OperationalError as exc:
            self.engine.dispose()
            raise RuntimeError(f"cannot use the service database at {self.display_url}: "
                               f"{str(exc.orig).strip()} (check HOTSPOTS_DATABASE_URL)") from exc
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def _create_schema(self, conn: Connection) -> None:
        """Migrate to head; several workers may start at once: one migrates, the others then find it done."""
        if self.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
        elif self.dialect != "sqlite":
            log.warning("%s: the audit and patrol logs are append-only by the service's code only (triggers are "
                        "installed on SQLite and PostgreSQL)", self.dialect)
        upgrade(conn)

    @property
    def display_url(self) -> str:
        """The URL with its password hidden (for logs and messages)."""
        return make_url(self.url).render_as_string(hide_password=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> Database:
        return cls(database_url(settings))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer (audit inserts)
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
