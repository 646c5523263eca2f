"""A tamper-evident audit and patrol log: a hash per row chained to the previous row, the chain's head per table,
REPLACE refused on SQLite, and the idempotency keys of patrol posts.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CHAINED = ("audit_log", "patrol_log")


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for table in CHAINED:
        # A database adopted by 0001 may have been made by create_all from models that already carry row_hash:
        # like 0001, add only what is missing.
        if "row_hash" not in {column["name"] for column in inspector.get_columns(table)}:
            op.add_column(table, sa.Column("row_hash", sa.String(64), nullable=True))
    if "log_chain" not in existing:
        op.create_table(
            "log_chain",
            sa.Column("table_name", sa.String(40), primary_key=True),
            sa.Column("last_id", sa.BigInteger, nullable=False),
            sa.Column("last_hash", sa.String(64), nullable=False),
        )
    headed = set(bind.execute(sa.text("SELECT table_name FROM log_chain")).scalars())
    for table in CHAINED:  # rows written before the chain are left as they are: it starts after them
        if table in headed:
            continue
        last = bind.execute(sa.text(f"SELECT coalesce(max(id), 0) FROM {table}")).scalar_one()
        bind.execute(sa.text("INSERT INTO log_chain (table_name, last_id, last_hash) VALUES (:t, :i, '')"),
                     {"t": table, "i": int(last)})
    if "idempotency_keys" not in existing:
        op.create_table(
            "idempotency_keys",
            sa.Column("key_id", sa.String(32), primary_key=True),
            sa.Column("idempotency_key", sa.String(200), primary_key=True),
            sa.Column("request_hash", sa.String(64), nullable=False),
            sa.Column("status", sa.Integer, nullable=False),
            sa.Column("body", sa.LargeBinary, nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
    if bind.dialect.name == "sqlite":
        # INSERT OR REPLACE / REPLACE INTO on an existing id deletes that row without firing DELETE triggers
        # (recursive_triggers is off); an upsert's DO UPDATE fires the UPDATE trigger. Refuse the insert itself.
        for table in CHAINED:
            op.execute(f"CREATE TRIGGER IF NOT EXISTS {table}_no_replace BEFORE INSERT ON {table} "
                       f"WHEN EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) "
                       f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END")
    # PostgreSQL has no REPLACE; INSERT ... ON CONFLICT DO UPDATE and MERGE fire the UPDATE trigger of 0001.
