"""The service's building blocks on their own: the caches (one computation per key, a byte budget for bodies),
cell geometry, the database's migrations (fresh, adopted from a pre-migration file, concurrent starts) and the
PostgreSQL driver as an optional extra."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime

import h3
import pytest
import shapely
from sqlalchemy import create_engine

from serving.caches import BodyCache, ComputeOnceCache
from serving.chain import chain_insert
from serving.chain import verify as verify_chain
from serving.db import Base, Database, MissingDriver
from serving.geometry import hexagon_ring
from serving.migrate import head


def test_compute_once_cache_computes_each_key_once_and_evicts_the_least_recent():
    cache: ComputeOnceCache[int] = ComputeOnceCache(2)
    calls: list[str] = []

    def slow(key: str) -> int:
        calls.append(key)
        time.sleep(0.2)
        return len(calls)

    results: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("a", lambda: slow("a"))))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"] and sorted(hit for _, hit in results) == [False, True, True, True, True]
    assert {value for value, _ in results} == {1}
    cache.get_or_compute("b", lambda: slow("b"))
    assert cache.get_or_compute("a", lambda: slow("a")) == (1, True)  # a is now the most recent
    cache.get_or_compute("c", lambda: slow("c"))  # evicts b, not a
    assert len(cache) == 2 and cache.get_or_compute("a", lambda: -1) == (1, True)
    assert cache.get_or_compute("b", lambda: -2) == (-2, False)


def test_compute_once_cache_keeps_nothing_when_the_computation_fails():
    cache: ComputeOnceCache[int] = ComputeOnceCache(4)
    with pytest.raises(ZeroDivisionError):
        cache.get_or_compute("x", lambda: 1 // 0)
    assert len(cache) == 0 and cache.get_or_compute("x", lambda: 7) == (7, False)


def test_body_cache_is_bounded_by_bytes_and_skips_oversized_bodies():
    cache = BodyCache(max_bytes=100, max_item_bytes=60)
    assert cache.get_or_make("a", lambda: b"a" * 40) == b"a" * 40
    cache.get_or_make("b", lambda: b"b" * 40)
    assert cache.current_bytes == 80
    assert cache.get_or_make("a", lambda: b"never made") == b"a" * 40  # hit: a is now the most recent
    cache.get_or_make("c", lambda: b"c" * 40)  # 120 > 100: the least recent (b) goes
    assert cache.current_bytes == 80
    assert cache.get_or_make("b", lambda: b"B" * 10) == b"B" * 10  # made again
    big = cache.get_or_make("big", lambda: b"x" * 61)  # served, never kept
    assert big == b"x" * 61 and cache.get_or_make("big", lambda: b"y") == b"y"
    assert cache.current_bytes <= 100


def test_hexagon_ring_is_a_closed_counter_clockwise_geojson_ring():
    cell = h3.latlng_to_cell(43.65, -79.39, 9)
    ring = hexagon_ring(cell)
    assert len(ring) == 7 and ring[0] == ring[-1]
    polygon = shapely.Polygon(ring)
    assert polygon.is_valid and polygon.exterior.is_ccw
    corners = {(round(lng, 7), round(lat, 7)) for lat, lng in h3.cell_to_boundary(cell)}
    assert set(ring) == corners
    lat, lng = h3.cell_to_latlng(cell)
    assert polygon.contains(shapely.Point(lng, lat))


def _schema(path) -> tuple[list[tuple[str, str]], str]:
    with sqlite3.connect(path) as raw:
        objects = raw.execute("select type, name from sqlite_master where name not like 'sqlite_%' "
                              "order by 1, 2").fetchall()
        version = raw.execute("select version_num from alembic_version").fetchone()[0]
    return objects, version


def test_a_fresh_sqlite_database_is_migrated_to_head(tmp_path):
    Database(f"sqlite:///{tmp_path / 'serving.db'}").dispose()
    objects, version = _schema(tmp_path / "serving.db")
    assert version == head()
    tables = {name for kind, name in objects if kind == "table"}
    assert tables == {"alembic_version", "api_keys", "audit_log", "idempotency_keys", "log_chain", "patrol_log",
                      "patrol_overrides"}
    assert {"audit_log_no_update", "audit_log_no_delete", "patrol_log_no_update", "patrol_log_no_delete"} <= {
        name for kind, name in objects if kind == "trigger"}


@pytest.mark.parametrize("with_row_hash", [True, False], ids=["today's models", "before the hash chain"])
def test_a_database_made_before_migrations_is_adopted_with_its_rows(tmp_path, with_row_hash):
    """A serving.db made by create_all (no alembic_version, no triggers yet), from today's models (row_hash
    already there) or older ones (no row_hash), keeps its rows, gains the migrations' schema, and its chain starts
    after the old rows."""
    path = tmp_path / "serving.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.tables["api_keys"].create(engine)
    Base.metadata.tables["audit_log"].create(engine)
    engine.dispose()
    with sqlite3.connect(path) as raw:
        if not with_row_hash:
            raw.execute("alter table audit_log drop column row_hash")
        raw.execute("insert into audit_log (at, key_id, role, endpoint, params, response_bytes) "
                    "values ('2020-01-01 00:00:00', 'k', 'planner', '/v1/hotspots', '{}', 10)")
    db = Database(f"sqlite:///{path}")
    objects, version = _schema(path)
    assert version == head() and ("table", "patrol_log") in objects and ("trigger", "audit_log_no_delete") in objects
    with db.engine.begin() as conn:
        assert chain_insert(conn, "audit_log", [{"at": datetime(2021, 1, 1, tzinfo=UTC), "key_id": "k2",
                                                 "role": "planner", "endpoint": "/v1/audit", "params": "{}",
                                                 "city": None, "model_version": None, "response_bytes": 5}]) == [2]
    assert verify_chain(db.engine) == []
    db.dispose()
    with sqlite3.connect(path) as raw:
        assert raw.execute("select key_id, endpoint, row_hash is null from audit_log order by id").fetchall() == [
            ("k", "/v1/hotspots", 1), ("k2", "/v1/audit", 0)]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("delete from audit_log")


def test_a_postgresql_url_without_psycopg_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(MissingDriver) as refused:
        Database("postgresql://hotspots:secret@127.0.0.1:5432/hotspots")
    message = str(refused.value)
    assert 'pip install "hotspots[postgres]"' in message and "\n" not in message and "secret" not in message
