"""The service's database on a real PostgreSQL server: schema and append-only triggers (created once even when
several workers start together), API keys, the audit log and the patrol log, through the stores and the API.

The server comes from HOTSPOTS_TEST_DATABASE_URL (`./dev.sh test` starts a throwaway one and sets it). Every
run works in schemas of its own (search_path set in the URL's ``options``), dropped at the end, so runs do not
collide. No server, no pass: the tests fail and say how to start it."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import polars as pl
import pytest
from service_support import (
    CITY,
    closed_port,
    isolated_mlflow_env,
    panel_only_service,
    start_databases_together,
)
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from serving.audit import AuditLog
from serving.chain import verify as verify_chain
from serving.db import APPEND_ONLY_TABLES, AuditRow, Database
from serving.keys import KeyStore, Principal, Role
from serving.patrols import patrol_log

DEFAULT_URL = "postgresql+psycopg://hotspots:hotspots@127.0.0.1:5432/hotspots_test"
URL = os.environ.get("HOTSPOTS_TEST_DATABASE_URL", DEFAULT_URL)
NOW = datetime(2020, 2, 12, 17, 30, tzinfo=UTC)


def connect_or_fail(url: str):
    """An engine on ``url``, or a test failure telling how to start the server."""
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        shown = make_url(url).render_as_string(hide_password=True)
        pytest.fail(f"PostgreSQL is not reachable at {shown} ({str(exc.orig).strip().splitlines()[0]}). Run the tests "
                    f"with `./dev.sh test` (it starts a server), or set HOTSPOTS_TEST_DATABASE_URL to one.", pytrace=False)
    return engine


@pytest.fixture(scope="module")
def pg():
    admin = connect_or_fail(URL)
    schemas: list[str] = []

    def new_schema() -> str:
        """A fresh schema; the URL whose connections use it."""
        name = f"hotspots_test_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        schemas.append(name)
        return make_url(URL).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)

    try:
        yield SimpleNamespace(admin=admin, new_schema=new_schema, schemas=schemas)
    finally:
        with admin.begin() as conn:
            for name in schemas:
                conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def db(pg):
    database = Database(pg.new_schema())
    yield database
    database.dispose()


def test_an_unreachable_server_fails_with_what_to_run():
    dead = f"postgresql+psycopg://hotspots:secret@127.0.0.1:{closed_port()}/hotspots_test"
    with pytest.raises(pytest.fail.Exception, match=r"\./dev\.sh test") as failed:
        connect_or_fail(dead)
    assert "secret" not in str(failed.value)
    # the service says which setting to fix, without the password
    with pytest.raises(RuntimeError, match="HOTSPOTS_DATABASE_URL") as refused:
        Database(dead.replace("+psycopg", ""))
    assert "secret" not in str(refused.value) and "postgresql+psycopg://hotspots:***@" in str(refused.value)


def test_a_plain_postgresql_url_uses_psycopg(pg):
    url = pg.new_schema().replace("postgresql+psycopg://", "postgresql://")
    database = Database(url)
    try:
        assert database.engine.dialect.driver == "psycopg" and database.dialect == "postgresql"
        assert KeyStore(database).verify(KeyStore(database).create_key(Role.admin, "plain url"))[1] is Role.admin
    finally:
        database.dispose()


def test_schema_and_triggers_are_created_once_by_concurrent_workers(pg):
    url = pg.new_schema()
    schema = pg.schemas[-1]
    databases, errors = start_databases_together(url)
    assert not errors, errors
    databases.append(Database(url))  # and again on a ready schema
    for d in databases:
        d.dispose()
    with pg.admin.connect() as conn:
        tables = set(conn.execute(text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                                  {"s": schema}).scalars())
        triggers = conn.execute(text(
            "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s AND NOT t.tgisinternal ORDER BY 1, 2"),
            {"s": schema}).all()
        functions = conn.execute(text("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                                      "WHERE n.nspname = :s AND p.proname = 'hotspots_append_only'"), {"s": schema}).scalar()
    assert tables == {"alembic_version", "api_keys", "audit_log", "idempotency_keys", "log_chain", "patrol_log",
                      "patrol_overrides"}
    assert [tuple(t) for t in triggers] == [(table, f"{table}_{kind}") for table in sorted(APPEND_ONLY_TABLES)
                                            for kind in ("append_only", "no_truncate")]
    assert functions == 1
    assert Database(url).display_url.count("***") == 1


def test_keys_on_postgres(db, pg):
    store = KeyStore(db)
    plaintext = store.create_key(Role.analyst, "pg analyst")
    key_id, role = store.verify(plaintext)
    assert role is Role.analyst and plaintext.startswith(f"hsk_{key_id}_")
    assert store.verify(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    secret = plaintext.split("_", 2)[2]
    with db.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM api_keys WHERE key_id = :k"), {"k": key_id}).one()
    assert secret not in str(stored) and secret.encode() not in bytes(stored.digest) + bytes(stored.salt)
    listed = {k.key_id: k for k in store.list_keys()}
    assert listed[key_id].created_at.tzinfo is not None and listed[key_id].revoked_at is None
    assert store.revoke_key(key_id) and not store.revoke_key(key_id) and store.verify(plaintext) is None
    assert {k.key_id: k for k in store.list_keys()}[key_id].revoked_at is not None


def test_audit_log_on_postgres_is_append_only(db):
    audit = AuditLog(db)
    who = Principal("abc123", Role.planner)
    first = audit.record(who, "/v1/hotspots", {"city": CITY, "k": 5}, 1234, city=CITY, model_version="3")
    second = audit.record(who, "/v1/forecast", {"city": CITY}, 99, city=CITY, model_version="3")
    entries = audit.entries(limit=10)
    assert [e.id for e in entries[:2]] == [second, first] and entries[1].params == {"city": CITY, "k": 5}
    assert entries[0].at.tzinfo is not None and entries[0].response_bytes == 99
    for statement in ("UPDATE audit_log SET role = 'admin'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
        with pytest.raises(DBAPIError, match="audit_log is append-only"):
            with db.engine.begin() as conn:
                conn.execute(text(statement))
    with pytest.raises(DBAPIError, match="audit_log is append-only"):  # through the ORM as well
        with db.session.begin() as session:
            session.execute(update(AuditRow).where(AuditRow.id == first).values(endpoint="/elsewhere"))
    after = audit.entries(limit=10)
    assert [(e.id, e.role, e.endpoint) for e in after] == [(e.id, e.role, e.endpoint) for e in entries]


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory, pg):
    url = pg.new_schema()
    with isolated_mlflow_env() as env:
        env.setenv("HOTSPOTS_DATABASE_URL", url)  # the operator's setting, read like any other
        with panel_only_service(toronto_incidents, tmp_path_factory.mktemp("pg"), NOW, label="pg") as service:
            assert service.settings.database_url == url
            service.url, service.schema = url, pg.schemas[-1]
            yield service


def test_patrol_log_through_the_api_on_postgres(svc, pg):
    a, b = svc.cells[:2]
    planner = {"X-API-Key": svc.keys[Role.planner]}
    shift = "2020-02-10T14:00:00-05:00"
    first = svc.client.post("/v1/patrols", headers=planner, json={
        "city": CITY, "shift": shift, "patrols": [{"h3": a, "dose_minutes": 30}, {"h3": b, "dose_minutes": 20}]})
    assert first.status_code == 201, first.text
    assert first.json()["count"] == 2 and first.json()["shift"]["start"] == shift
    again = svc.client.post("/v1/patrols", headers=planner, json={
        "city": CITY, "shift": "2020-02-10T19:00:00Z", "patrols": [{"h3": a, "dose_minutes": 15}]})
    assert again.status_code == 201
    # role checks with keys stored in PostgreSQL
    assert svc.client.get("/v1/patrols", params={"city": CITY}, headers=planner).status_code == 403
    assert svc.client.post("/v1/patrols", json={"city": CITY, "shift": shift, "patrols": []}).status_code == 401
    bad = svc.client.post("/v1/patrols", headers=planner, json={"city": CITY, "shift": shift,
                                                                "patrols": [{"h3": a, "dose_minutes": 481}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "dose_minutes"

    body = svc.client.get("/v1/patrols", params={"city": CITY}, headers={"X-API-Key": svc.keys[Role.analyst]}).json()
    assert {(r["shift_start"], r["h3"]): r["dose_minutes"] for r in body["patrols"]} == {(shift, a): 45.0, (shift, b): 20.0}
    sid = svc.panel.calendar.shift_of(datetime.fromisoformat(shift))
    log = patrol_log(svc.app.state.db, CITY, start_shift=sid, end_shift=sid + 1)
    assert sorted(log.rows()) == sorted([(sid, a, 45.0), (sid, b, 20.0)])
    assert log.schema == pl.Schema({"shift_id": pl.Int64, "h3": pl.String, "dose_minutes": pl.Float64})

    # newest first: the analyst's read, the two refused requests (401 without a key, 403 for the planner's
    # read; the 422 leaves no entry), then the second report
    latest = svc.client.get("/v1/audit", params={"limit": 4}, headers={"X-API-Key": svc.keys[Role.auditor]}).json()["entries"]
    planner_id = svc.keys[Role.planner].split("_")[1]
    assert [(e["endpoint"], e["role"]) for e in latest] == [("/v1/patrols", "analyst"), ("/v1/patrols", "refused"),
                                                           ("/v1/patrols", "refused"), ("/v1/patrols", "planner")]
    assert latest[0]["params"]["rows"] == 2
    assert latest[1]["key_id"] == "none" and latest[1]["params"]["status"] == 401
    assert "missing API key" in latest[1]["params"]["reason"]
    assert latest[2]["key_id"] == planner_id and latest[2]["params"]["status"] == 403
    assert "may not access" in latest[2]["params"]["reason"]
    assert latest[3]["key_id"] == planner_id and latest[3]["params"]["n_cells"] == 1

    # it is all in PostgreSQL, in this run's schema: nothing went to SQLite
    assert not (svc.settings.data_dir / "serving.db").exists()
    with pg.admin.connect() as conn:
        stored = conn.execute(text(f'SELECT h3, dose_minutes, shift_start FROM "{svc.schema}".patrol_log ORDER BY id')).all()
        hashes = conn.execute(text(f'SELECT row_hash FROM "{svc.schema}".patrol_log ORDER BY id')).scalars().all()
    assert [(h, d) for h, d, _ in stored] == [(a, 30.0), (b, 20.0), (a, 15.0)]
    assert stored[0][2] == datetime(2020, 2, 10, 19, tzinfo=UTC)
    # every row is in the hash chain, and the chain (audit and patrol logs) verifies on PostgreSQL
    assert len(set(hashes)) == 3 and all(len(h) == 64 and int(h, 16) >= 0 for h in hashes)
    assert verify_chain(svc.app.state.db.engine) == []
    for statement in ("UPDATE patrol_log SET dose_minutes = 0", "DELETE FROM patrol_log", "TRUNCATE patrol_log"):
        with pytest.raises(DBAPIError, match="patrol_log is append-only"):
            with svc.app.state.db.engine.begin() as conn:
                conn.execute(text(statement))
    with svc.app.state.db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM patrol_log")).scalar() == 3
