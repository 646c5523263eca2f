"""The hash chain of the append-only logs (audit and patrol): every row carries sha256(canonical row + the
previous row's hash), and ``log_chain`` holds each table's last id and hash.

Writers take the chain's head with a write first (an UPDATE of the head row: SQLite's write lock, a PostgreSQL row
lock), so concurrent writers, in any process, extend the chain one after the other; ids are assigned from the
head, so they are contiguous. :func:`verify` recomputes the chain and names the first break: an edited row
(hash mismatch), removed rows (an id gap, or a head beyond the last row), a row written outside the chain, or a
dropped append-only trigger.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from serving.db import AuditRow, OverrideRow, PatrolRow, as_utc

_meta = MetaData()
log_chain = Table("log_chain", _meta, Column("table_name", String(40), primary_key=True),
                  Column("last_id", BigInteger), Column("last_hash", String(64)))
# the mapped classes' tables (declarative __table__ is typed as a FromClause; it is a Table)
TABLES: dict[str, Table] = {"audit_log": cast(Table, AuditRow.__table__), "patrol_log": cast(Table, PatrolRow.__table__),
                            "patrol_overrides": cast(Table, OverrideRow.__table__)}
FIELDS = {
    "audit_log": ("at", "key_id", "role", "endpoint", "params", "city", "model_version", "response_bytes"),
    "patrol_log": ("city", "shift_id", "shift_start", "h3", "dose_minutes", "key_id", "recorded_at"),
    "patrol_overrides": ("city", "shift_id", "shift_start", "h3", "reason", "code", "key_id", "recorded_at"),
}
# columns added later (serving/migrations 0003+): hashed only when set, so rows written before them keep their hashes
OPTIONAL_FIELDS = {"audit_log": ("flagged",), "patrol_log": (), "patrol_overrides": ()}
SQLITE_TRIGGERS = {f"{t}_no_{kind}" for t in TABLES for kind in ("update", "delete", "replace")}
PG_TRIGGERS = {f"{t}_{kind}" for t in TABLES for kind in ("append_only", "no_truncate")}


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat(timespec="microseconds")
    if isinstance(value, float):
        return repr(value)
    return value


def row_hash(table: str, row_id: int, row: dict[str, Any], previous: str) -> str:
    values = [_canonical(row.get(name)) for name in FIELDS[table]]
    values += [[name, row[name]] for name in OPTIONAL_FIELDS[table] if row.get(name) is not None]
    payload = [table, int(row_id), values, previous]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":"), sort_keys=False).encode()).hexdigest()


def _utc(value: Any) -> Any:
    """Datetimes in UTC before they are stored: SQLite keeps no offset, and the hash must survive the trip."""
    return value.astimezone(UTC) if isinstance(value, datetime) and value.tzinfo is not None else value


def chain_insert(conn: Connection, table: str, rows: list[dict[str, Any]]) -> list[int]:
    """Insert ``rows`` into ``table`` at the end of its chain (in the caller's transaction); their ids."""
    if not rows:
        return []
    head = log_chain.c.table_name == table
    conn.execute(update(log_chain).where(head).values(last_id=log_chain.c.last_id))  # the write lock first
    last_id, last_hash = conn.execute(select(log_chain.c.last_id, log_chain.c.last_hash).where(head)).one()
    stored = []
    for row in rows:
        last_id += 1
        values = {name: _utc(value) for name, value in row.items()}
        for name in OPTIONAL_FIELDS[table]:  # every row of one executemany names the same columns
            values.setdefault(name, None)
        last_hash = row_hash(table, last_id, values, last_hash)
        stored.append({**values, "id": last_id, "row_hash": last_hash})
    conn.execute(insert(TABLES[table]), stored)
    conn.execute(update(log_chain).where(head).values(last_id=last_id, last_hash=last_hash))
    return [r["id"] for r in stored]


@dataclass(frozen=True)
class Break:
    table: str
    row_id: int | None
    kind: str  # edited | removed | unchained | head | trigger
    message: str


def _triggers(conn: Connection) -> set[str]:
    if conn.dialect.name == "sqlite":
        return set(conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars())
    return set(conn.execute(text("SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                 "WHERE NOT t.tgisinternal AND c.relname IN ('audit_log', 'patrol_log', 'patrol_overrides') "
                                 "AND pg_table_is_visible(c.oid)")).scalars())


def _verify_table(conn: Connection, table: str, start: int) -> Iterable[Break]:
    t = TABLES[table]
    last_id, last_hash = conn.execute(select(log_chain.c.last_id, log_chain.c.last_hash)
                                      .where(log_chain.c.table_name == table)).one()
    previous, expected_id = "", start + 1
    columns = [t.c.id, t.c.row_hash, *(t.c[name] for name in FIELDS[table] + OPTIONAL_FIELDS[table])]
    for row in conn.execute(select(*columns).where(t.c.id > start).order_by(t.c.id)).mappings():
        if row["id"] != expected_id:
            yield Break(table, expected_id, "removed", f"{table}: rows {expected_id}..{row['id'] - 1} are missing "
                                                     f"(removed after they were written)")
            return
        if row["row_hash"] is None:
            yield Break(table, row["id"], "unchained", f"{table}: row {row['id']} was written outside the hash chain")
            return
        if row_hash(table, row["id"], dict(row), previous) != row["row_hash"]:
            yield Break(table, row["id"], "edited", f"{table}: row {row['id']} does not match its hash (edited, or "
                                                    f"its hash rewritten)")
            return
        previous, expected_id = row["row_hash"], expected_id + 1
    end = expected_id - 1
    if end != last_id or (end > start and previous != last_hash):
        yield Break(table, expected_id - 1, "head", f"{table}: the chain ends at row {expected_id - 1} but its head "
                                                    f"names row {last_id}: the rows after it were removed")


def chain_start(conn: Connection, table: str) -> int:
    """The last id written before the chain existed (rows up to it carry no hash)."""
    t = TABLES[table]
    first = conn.execute(select(t.c.id).where(t.c.row_hash.is_not(None)).order_by(t.c.id).limit(1)).scalar()
    if first is not None:
        return int(first) - 1
    return int(conn.execute(select(log_chain.c.last_id).where(log_chain.c.table_name == table)).scalar_one())


def verify(engine: Engine) -> list[Break]:
    """Every table's first break (empty: the logs are intact), dropped triggers first."""
    breaks: list[Break] = []
    with engine.connect() as conn:
        expected = SQLITE_TRIGGERS if conn.dialect.name == "sqlite" else PG_TRIGGERS
        for name in sorted(expected - _triggers(conn)):
            breaks.append(Break(name.split("_no_")[0].split("_append")[0], None, "trigger",
                                f"the append-only trigger {name} was dropped: rows may have been changed unseen"))
        for table in TABLES:
            breaks.extend(_verify_table(conn, table, chain_start(conn, table)))
    return breaks
