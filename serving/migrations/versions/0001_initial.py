"""The service's first schema: API keys, the audit log and the patrol log, with append-only triggers.

Databases made before migrations existed (``create_all``) already hold these tables: they are kept as they are,
and only what is missing is created, so such a database is adopted at this revision.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY_TABLES = ("audit_log", "patrol_log")

_PG_FUNCTION = """DO $do$ BEGIN
  IF to_regprocedure('hotspots_append_only()') IS NULL THEN
    CREATE FUNCTION hotspots_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only', ERRCODE = 'P0001'; END $fn$;
  END IF;
END $do$"""


def _pg_triggers(table: str) -> str:
    return f"""DO $do$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname = '{table}_append_only') THEN
    CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table}
      FOR EACH ROW EXECUTE FUNCTION hotspots_append_only();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname = '{table}_no_truncate') THEN
    CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
      FOR EACH STATEMENT EXECUTE FUNCTION hotspots_append_only();
  END IF;
END $do$"""


def _sqlite_triggers(table: str) -> list[str]:
    return [f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op_.lower()} BEFORE {op_} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END" for op_ in ("UPDATE", "DELETE")]


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("key_id", sa.String(32), primary_key=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("role", sa.String(20), nullable=False),
            sa.Column("salt", sa.LargeBinary(32), nullable=False),
            sa.Column("digest", sa.LargeBinary(32), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        )
    if "audit_log" not in existing:
        op.create_table(
            "audit_log",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("key_id", sa.String(32), nullable=False),
            sa.Column("role", sa.String(20), nullable=False),
            sa.Column("endpoint", sa.String(200), nullable=False),
            sa.Column("params", sa.Text, nullable=False),
            sa.Column("city", sa.String(100), nullable=True),
            sa.Column("model_version", sa.String(40), nullable=True),
            sa.Column("response_bytes", sa.Integer, nullable=False),
        )
        op.create_index("ix_audit_log_at", "audit_log", ["at"])
        op.create_index("ix_audit_log_key_id", "audit_log", ["key_id"])
    if "patrol_log" not in existing:
        op.create_table(
            "patrol_log",
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
            sa.Column("city", sa.String(100), nullable=False),
            sa.Column("shift_id", sa.BigInteger, nullable=False),
            sa.Column("shift_start", sa.DateTime(timezone=True), nullable=False),
            sa.Column("h3", sa.String(16), nullable=False),
            sa.Column("dose_minutes", sa.Double, nullable=False),
            sa.Column("key_id", sa.String(32), nullable=False),
            sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        )
        op.create_index("ix_patrol_log_city_shift", "patrol_log", ["city", "shift_id"])
        op.create_index("ix_patrol_log_key_id", "patrol_log", ["key_id"])
    if bind.dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        for table in APPEND_ONLY_TABLES:
            op.execute(_pg_triggers(table))
    elif bind.dialect.name == "sqlite":
        for table in APPEND_ONLY_TABLES:
            for statement in _sqlite_triggers(table):
                op.execute(statement)
