"""The cells a hotspots response flagged, in the audit row that served them (JSON list of H3 ids, rank order),
so the realised-accuracy record scores what was handed out, not a recomputation.

Additive: one nullable column. Rows written before it keep NULL and their hashes: the chain hashes the column
only when it is set (serving.chain), so the existing chain stays valid.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("audit_log")}
    if "flagged" not in columns:
        op.add_column("audit_log", sa.Column("flagged", sa.Text, nullable=True))
