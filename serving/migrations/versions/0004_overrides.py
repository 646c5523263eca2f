"""Human oversight in the patrol log: a planner records that a flagged cell was not patrolled, and why, from a
fixed list of reasons (no free text). Additive: a new append-only, hash-chained table; nothing else changes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "patrol_overrides"


def upgrade() -> None:
    bind = op.get_bind()
    if TABLE not in set(sa.inspect(bind).get_table_names()):
        op.create_table(
            TABLE,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
            sa.Column("city", sa.String(100), nullable=False),
            sa.Column("shift_id", sa.BigInteger, nullable=False),
            sa.Column("shift_start", sa.DateTime(timezone=True), nullable=False),
            sa.Column("h3", sa.String(16), nullable=False),
            sa.Column("reason", sa.String(32), nullable=False),
            sa.Column("code", sa.String(24), nullable=True),
            sa.Column("key_id", sa.String(32), nullable=False),
            sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("row_hash", sa.String(64), nullable=True),
        )
        op.create_index("ix_patrol_overrides_city_shift", TABLE, ["city", "shift_id"])
    if bind.execute(sa.text("SELECT count(*) FROM log_chain WHERE table_name = :t"), {"t": TABLE}).scalar_one() == 0:
        bind.execute(sa.text("INSERT INTO log_chain (table_name, last_id, last_hash) VALUES (:t, 0, '')"), {"t": TABLE})
    if bind.dialect.name == "postgresql":
        op.execute(f"""DO $do$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{TABLE}'::regclass AND tgname = '{TABLE}_append_only') THEN
    CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE}
      FOR EACH ROW EXECUTE FUNCTION hotspots_append_only();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = '{TABLE}'::regclass AND tgname = '{TABLE}_no_truncate') THEN
    CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE}
      FOR EACH STATEMENT EXECUTE FUNCTION hotspots_append_only();
  END IF;
END $do$""")
    elif bind.dialect.name == "sqlite":
        for kind in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_{kind.lower()} BEFORE {kind} ON {TABLE} "
                       f"BEGIN SELECT RAISE(ABORT, '{TABLE} is append-only'); END")
        op.execute(f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_replace BEFORE INSERT ON {TABLE} "
                   f"WHEN EXISTS (SELECT 1 FROM {TABLE} WHERE id = NEW.id) "
                   f"BEGIN SELECT RAISE(ABORT, '{TABLE} is append-only'); END")
