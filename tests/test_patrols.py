"""The patrol log through the ASGI client: recording, reading back (GET and the Python reader), role checks,
every 422 naming its field, the audit entry, and the append-only tables. The city is the small real Toronto
panel of the API tests, served without a champion model: recording patrols needs the panel only."""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import UTC, datetime

import h3
import polars as pl
import pytest
from service_support import CITY, isolated_mlflow_env, panel_only_service, start_databases_together

from serving.chain import verify as verify_chain
from serving.dependencies import get_now
from serving.keys import Role
from serving.patrols import patrol_log

SHIFT = "2020-02-10T14:00:00-05:00"  # a day shift inside the panel
NOW = datetime(2020, 2, 12, 17, 30, tzinfo=UTC)  # 12:30 Toronto: the next shift starts 14:00


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with isolated_mlflow_env(), panel_only_service(toronto_incidents, tmp_path_factory.mktemp("patrols"), NOW) as svc_:
        yield svc_


def post(svc, body, role: Role | None = Role.planner):
    headers = {"X-API-Key": svc.keys[role]} if role is not None else {}
    return svc.client.post("/v1/patrols", json=body, headers=headers)


def read(svc, role: Role | None = Role.analyst, **params):
    headers = {"X-API-Key": svc.keys[role]} if role is not None else {}
    params.setdefault("city", CITY)
    return svc.client.get("/v1/patrols", params={k: v for k, v in params.items() if v is not None}, headers=headers)


def problems(response, field: str) -> list[dict]:
    """The 422 problems for ``field``, asserting each names it (loc and message)."""
    assert response.status_code == 422, response.text
    found = [p for p in response.json()["detail"] if p["field"] == field]
    assert found, response.json()
    for p in found:
        assert p["msg"].startswith(f"{field}:") and p["loc"][-1] == field
    return found


def rows(svc) -> int:
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw:
        return raw.execute("select count(*) from patrol_log").fetchone()[0]


def shift_id(svc, iso: str) -> int:
    return svc.panel.calendar.shift_of(datetime.fromisoformat(iso))


# --- recording and reading back -------------------------------------------------------------------------

def test_record_read_back_and_sum(svc):
    a, b, c = svc.cells[:3]
    first = post(svc, {"city": CITY, "shift": SHIFT, "patrols": [{"h3": a, "dose_minutes": 30},
                                                                   {"h3": b.upper(), "dose_minutes": 12.5},
                                                                   {"h3": c, "dose_minutes": 480}]})
    assert first.status_code == 201, first.text
    receipt = first.json()
    assert receipt["city"] == CITY and receipt["count"] == 3 and receipt["total_minutes"] == 522.5
    assert receipt["shift"] == {"shift_id": shift_id(svc, SHIFT), "start": "2020-02-10T14:00:00-05:00",
                                "end": "2020-02-10T22:00:00-05:00", "hours": 8.0, "timezone": "America/Toronto"}
    assert datetime.fromisoformat(receipt["recorded_at"]).tzinfo is not None
    # the same cell and shift again (written in UTC this time, then in local time): a new row each, summed by readers
    assert post(svc, {"city": CITY, "shift": "2020-02-10T19:00:00Z",
                      "patrols": [{"h3": a, "dose_minutes": 15}]}).status_code == 201
    other = "2020-02-10T22:00"  # no offset: Toronto time, the night shift
    assert post(svc, {"city": CITY, "shift": other, "patrols": [{"h3": a, "dose_minutes": 60}]}).json()["shift"]["start"] \
        == "2020-02-10T22:00:00-05:00"

    totals = read(svc, start="2020-02-10T00:00:00-05:00", end="2020-02-11T00:00:00-05:00")
    assert totals.status_code == 200, totals.text
    body = totals.json()
    got = {(r["shift_start"], r["h3"]): r["dose_minutes"] for r in body["patrols"]}
    assert got == {("2020-02-10T14:00:00-05:00", a): 45.0, ("2020-02-10T14:00:00-05:00", b): 12.5,
                   ("2020-02-10T14:00:00-05:00", c): 480.0, ("2020-02-10T22:00:00-05:00", a): 60.0}
    assert body["count"] == 4 and body["total_minutes"] == 597.5 and body["truncated"] is False
    assert [r["shift_id"] for r in body["patrols"]] == sorted(r["shift_id"] for r in body["patrols"])
    # start/end bound the shift start; limit truncates and says so
    day_only = read(svc, start="2020-02-10T14:00", end="2020-02-10T22:00").json()
    assert {r["h3"] for r in day_only["patrols"]} == {a, b, c} and day_only["count"] == 3
    limited = read(svc, start="2020-02-10T00:00", end="2020-02-11T00:00", limit=2).json()
    assert limited["count"] == 2 and limited["truncated"] is True

    # the Python reader of the feedback-loop diagnostics: the same sums, typed
    log = patrol_log(svc.app.state.db, CITY)
    assert log.schema == pl.Schema({"shift_id": pl.Int64, "h3": pl.String, "dose_minutes": pl.Float64})
    day = shift_id(svc, SHIFT)
    assert log.filter(pl.col("shift_id") == day).sort("h3").rows() == sorted(
        [(day, a, 45.0), (day, b, 12.5), (day, c, 480.0)], key=lambda r: r[1])
    assert patrol_log(svc.app.state.db, CITY, start_shift=day + 1).rows() == [(day + 1, a, 60.0)]
    assert patrol_log(svc.app.state.db, CITY, start_shift=day, end_shift=day + 1)["dose_minutes"].sum() == 537.5
    empty = patrol_log(svc.app.state.db, "atlantis")
    assert empty.height == 0 and empty.schema == log.schema
    # stored rows: one per report (append), nothing personal: only these columns
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw:
        columns = [r[1] for r in raw.execute("pragma table_info(patrol_log)")]
        stored = raw.execute("select h3, dose_minutes, shift_start from patrol_log where h3 = ? order by id", (a,)).fetchall()
        hashes = raw.execute("select row_hash from patrol_log order by id").fetchall()
    assert columns == ["id", "city", "shift_id", "shift_start", "h3", "dose_minutes", "key_id", "recorded_at", "row_hash"]
    # row_hash is the hash chain's sha256 (serving.chain), one per row, and the chain verifies
    assert len({h for (h,) in hashes}) == len(hashes) and all(len(h) == 64 and int(h, 16) >= 0 for (h,) in hashes)
    assert verify_chain(svc.app.state.db.engine) == []
    assert [(h, d) for h, d, _ in stored[:3]] == [(a, 30.0), (a, 15.0), (a, 60.0)]
    assert stored[0][2].startswith("2020-02-10 19:00:00")  # UTC


def test_a_whole_study_area_in_one_report(svc):
    before = rows(svc)
    shift = "2020-01-15T06:00:00-05:00"
    doses = [float(i % 480 + 1) for i in range(len(svc.cells))]
    response = post(svc, {"city": CITY, "shift": shift,
                          "patrols": [{"h3": h, "dose_minutes": d} for h, d in zip(svc.cells, doses)]})
    assert response.status_code == 201, response.text
    assert response.json()["count"] == len(svc.cells) and response.json()["total_minutes"] == pytest.approx(sum(doses))
    assert rows(svc) == before + len(svc.cells)
    sid = shift_id(svc, shift)
    log = patrol_log(svc.app.state.db, CITY, start_shift=sid, end_shift=sid + 1)
    assert log["h3"].to_list() == sorted(svc.cells) and log.sort("h3")["dose_minutes"].to_list() == \
        [d for _, d in sorted(zip(svc.cells, doses))]


def test_shift_window_first_shift_to_next_shift(svc):
    cal, cell = svc.panel.calendar, svc.cells[0]
    next_start = cal.bounds([cal.next_shift(NOW)])["start_local"][0]
    assert next_start.isoformat() == "2020-02-12T14:00:00-05:00"
    first_start = cal.bounds([svc.panel.first_shift])["start_local"][0]
    for shift in (next_start.isoformat(), first_start.isoformat()):
        response = post(svc, {"city": CITY, "shift": shift, "patrols": [{"h3": cell, "dose_minutes": 10}]})
        assert response.status_code == 201, (shift, response.text)
    # after the panel's data (it ends 2020-03-01): patrols go on while the panel waits for an update
    svc.app.dependency_overrides[get_now] = lambda: datetime(2020, 3, 5, 10, 0, tzinfo=UTC)  # 05:00 local
    try:
        late = post(svc, {"city": CITY, "shift": "2020-03-05T06:00:00-05:00", "patrols": [{"h3": cell, "dose_minutes": 10}]})
        assert late.status_code == 201 and late.json()["shift"]["shift_id"] > svc.panel.end_shift
    finally:
        svc.app.dependency_overrides[get_now] = lambda: NOW
    after_next = post(svc, {"city": CITY, "shift": "2020-02-12T22:00:00-05:00", "patrols": [{"h3": cell, "dose_minutes": 1}]})
    assert "after the next shift" in problems(after_next, "shift")[0]["msg"]
    far = post(svc, {"city": CITY, "shift": "2031-01-01T06:00:00-05:00", "patrols": [{"h3": cell, "dose_minutes": 1}]})
    assert "after the next shift" in problems(far, "shift")[0]["msg"]
    before = post(svc, {"city": CITY, "shift": "2018-12-30T06:00:00-05:00", "patrols": [{"h3": cell, "dose_minutes": 1}]})
    assert "before the panel's first shift" in problems(before, "shift")[0]["msg"]


def test_daylight_saving_shifts_have_their_real_length(svc):
    cell = svc.cells[1]
    # the night of 2019-11-02 lasts 9 hours in Toronto (clocks go back), the night of 2019-03-09 lasts 7
    long_night = post(svc, {"city": CITY, "shift": "2019-11-02T22:00", "patrols": [{"h3": cell, "dose_minutes": 540}]})
    assert long_night.status_code == 201 and long_night.json()["shift"]["hours"] == 9.0
    short_night = post(svc, {"city": CITY, "shift": "2019-03-09T22:00", "patrols": [{"h3": cell, "dose_minutes": 421}]})
    assert "(420 minutes)" in problems(short_night, "dose_minutes")[0]["msg"]


# --- access control and bad input -----------------------------------------------------------------------

def test_roles_401_403(svc):
    body = {"city": CITY, "shift": SHIFT, "patrols": [{"h3": svc.cells[5], "dose_minutes": 5}]}
    missing = post(svc, body, role=None)
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    assert svc.client.post("/v1/patrols", json=body, headers={"X-API-Key": "hsk_0000_nope"}).status_code == 401
    assert read(svc, role=None, city=CITY).status_code == 401
    for role in Role:  # every role may record; reading the log needs analyst or above
        assert post(svc, body, role).status_code == 201, role
        response = read(svc, role, city=CITY)
        if role is Role.planner:
            assert response.status_code == 403
            assert "planner" in response.json()["detail"] and "analyst" in response.json()["detail"]
        else:
            assert response.status_code == 200, (role, response.text)
    revoked = svc.app.state.keys.create_key(Role.planner, "revoked")
    svc.app.state.keys.revoke_key(revoked.split("_")[1])
    assert svc.client.post("/v1/patrols", json=body, headers={"X-API-Key": revoked}).status_code == 401


def test_unknown_city_is_404(svc):
    body = {"city": "atlantis", "shift": SHIFT, "patrols": [{"h3": svc.cells[0], "dose_minutes": 5}]}
    for response in (post(svc, body), read(svc, city="atlantis")):
        assert response.status_code == 404 and "atlantis" in response.json()["detail"] and CITY in response.json()["detail"]


def test_every_bad_input_is_a_422_naming_its_field_and_stores_nothing(svc):
    before = rows(svc)
    cell, other = svc.cells[0], svc.cells[1]

    def body(shift=SHIFT, patrols=None, **extra):
        return {"city": CITY, "shift": shift,
                "patrols": [{"h3": cell, "dose_minutes": 10}] if patrols is None else patrols, **extra}

    assert "not the start of a shift" in problems(post(svc, body(shift="2020-02-10T15:00:00-05:00")), "shift")[0]["msg"]
    for garbage in ("tomorrow", "2020-13-45T06:00", "", None, 12.5e30, "0001-01-01T00:00:00+05:00", "9999-12-31T23:59"):
        problems(post(svc, body(shift=garbage)), "shift")

    res8 = h3.cell_to_parent(cell, 8)
    outside = h3.latlng_to_cell(45.5, -73.6, 9)  # Montreal
    bad = post(svc, body(patrols=[{"h3": "nonsense", "dose_minutes": 5}, {"h3": res8, "dose_minutes": 5},
                                  {"h3": outside, "dose_minutes": 5}, {"h3": other, "dose_minutes": 5},
                                  {"h3": other.upper(), "dose_minutes": 5}]))
    found = {tuple(p["loc"]): p["msg"] for p in problems(bad, "h3")}
    assert "'nonsense' is not an H3 cell id" in found[("body", "patrols", 0, "h3")]
    assert f"'{res8}' is a resolution-8 cell; {CITY} uses resolution 9" in found[("body", "patrols", 1, "h3")]
    assert f"'{outside}' is outside {CITY}'s study area" in found[("body", "patrols", 2, "h3")]
    assert "already at patrols[3]" in found[("body", "patrols", 4, "h3")] and ("body", "patrols", 3, "h3") not in found
    for nonsense in ("-1", "8" * 32, "ffffffffffffffff", "0x" + cell[2:], ""):  # out of 64 bits, negative, empty...
        problems(post(svc, body(patrols=[{"h3": nonsense, "dose_minutes": 5}])), "h3")

    too_long = post(svc, body(patrols=[{"h3": cell, "dose_minutes": 480.5}]))
    assert "more than the shift's length (480 minutes)" in problems(too_long, "dose_minutes")[0]["msg"]
    assert problems(too_long, "dose_minutes")[0]["loc"] == ["body", "patrols", 0, "dose_minutes"]
    for dose in (0, -5, "lots", None, 1e300, True):
        problems(post(svc, body(patrols=[{"h3": cell, "dose_minutes": dose}])), "dose_minutes")
    for dose in (math.nan, math.inf):  # Python's json reads NaN and Infinity: refused all the same
        raw = json.dumps(body(patrols=[{"h3": cell, "dose_minutes": dose}])).encode()
        problems(svc.client.post("/v1/patrols", content=raw, headers={"X-API-Key": svc.keys[Role.planner],
                                                                      "Content-Type": "application/json"}), "dose_minutes")
    # several problems at once, each in its place
    mixed = post(svc, body(shift="2020-02-10T14:00:00-05:00", patrols=[{"h3": "x", "dose_minutes": 5},
                                                                        {"h3": cell, "dose_minutes": 9999}]))
    assert problems(mixed, "h3")[0]["loc"] == ["body", "patrols", 0, "h3"]
    assert problems(mixed, "dose_minutes")[0]["loc"] == ["body", "patrols", 1, "dose_minutes"]

    # no free text anywhere: unknown fields are refused, not ignored
    problems(post(svc, body(unit="car 12")), "unit")
    problems(post(svc, body(patrols=[{"h3": cell, "dose_minutes": 5, "officer": "J. Doe"}])), "officer")
    problems(post(svc, body(patrols=[])), "patrols")
    problems(post(svc, {"city": CITY, "shift": SHIFT}), "patrols")
    problems(post(svc, {"shift": SHIFT, "patrols": [{"h3": cell, "dose_minutes": 5}]}), "city")
    problems(post(svc, body(patrols=[{"dose_minutes": 5}])), "h3")
    bad_json = svc.client.post("/v1/patrols", content=b"{not json", headers={"X-API-Key": svc.keys[Role.planner],
                                                                                "Content-Type": "application/json"})
    assert bad_json.status_code == 422
    assert rows(svc) == before

    assert "not after start" in problems(read(svc, city=CITY, start="2020-02-11T00:00", end="2020-02-10T00:00"), "end")[0]["msg"]
    problems(read(svc, city=CITY, start="yesterday"), "start")
    assert "cannot be converted to UTC" in problems(read(svc, city=CITY, start="0001-01-01T00:00:00+05:00"), "start")[0]["msg"]
    problems(read(svc, city=CITY, end="9999-12-31T23:59"), "end")
    problems(read(svc, city=CITY, limit=0), "limit")
    problems(read(svc, city=CITY, cells="all"), "cells")
    problems(read(svc, city=None), "city")


# --- audit and append-only ------------------------------------------------------------------------------

def test_posts_are_audited_without_cell_lists(svc):
    response = post(svc, {"city": CITY, "shift": SHIFT, "patrols": [{"h3": h, "dose_minutes": 20} for h in svc.cells[10:14]]})
    assert response.status_code == 201
    entry = svc.client.get("/v1/audit", params={"limit": 1}, headers={"X-API-Key": svc.keys[Role.auditor]}).json()["entries"][0]
    planner_id = svc.keys[Role.planner].split("_")[1]
    assert entry["endpoint"] == "/v1/patrols" and entry["key_id"] == planner_id and entry["role"] == "planner"
    assert entry["city"] == CITY and entry["model_version"] is None and entry["response_bytes"] == len(response.content)
    assert entry["params"] == {"city": CITY, "shift": "2020-02-10T14:00:00-05:00", "shift_id": shift_id(svc, SHIFT),
                               "shift_start": "2020-02-10T14:00:00-05:00", "n_cells": 4, "total_minutes": 80.0}
    assert not any(h in str(entry) for h in svc.cells)
    # reading the log back is audited too
    read(svc, Role.analyst, city=CITY, start="2020-02-10T14:00", end="2020-02-10T22:00")
    entry = svc.client.get("/v1/audit", params={"limit": 1}, headers={"X-API-Key": svc.keys[Role.auditor]}).json()["entries"][0]
    assert entry["endpoint"] == "/v1/patrols" and entry["role"] == "analyst" and entry["params"]["rows"] > 0
    # an invalid report (422) leaves no audit entry: the one new entry is the audit read before it
    def audit_log() -> list[dict]:
        return svc.client.get("/v1/audit", params={"limit": 1000},
                              headers={"X-API-Key": svc.keys[Role.auditor]}).json()["entries"]

    count = len(audit_log())
    bad = {"city": CITY, "shift": "tomorrow", "patrols": [{"h3": svc.cells[0], "dose_minutes": 1}]}
    assert post(svc, bad).status_code == 422
    after = audit_log()
    auditor_id = svc.keys[Role.auditor].split("_")[1]
    assert len(after) == count + 1
    assert (after[0]["endpoint"], after[0]["key_id"], after[0]["role"], after[0]["params"]) == (
        "/v1/audit", auditor_id, "auditor", {"limit": 1000, "before_id": None, "rows": count})


def test_patrol_and_audit_tables_are_append_only(svc):
    assert post(svc, {"city": CITY, "shift": SHIFT, "patrols": [{"h3": svc.cells[20], "dose_minutes": 5}]}).status_code == 201
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw:
        for table in ("patrol_log", "audit_log"):
            count = raw.execute(f"select count(*) from {table}").fetchone()[0]
            assert count > 0
            for statement in (f"update {table} set key_id = 'someone'", f"delete from {table}"):
                with pytest.raises(sqlite3.DatabaseError, match=f"{table} is append-only"):
                    raw.execute(statement)
            assert raw.execute(f"select count(*) from {table}").fetchone()[0] == count


def test_workers_starting_together_on_a_fresh_sqlite_file(tmp_path):
    """Several workers (threads here) creating the schema at once: none fails, the triggers are there once."""
    url = f"sqlite:///{tmp_path / 'fresh' / 'serving.db'}"
    databases, errors = start_databases_together(url)
    for d in databases:
        d.dispose()
    assert not errors and len(databases) == 4
    with sqlite3.connect(tmp_path / "fresh" / "serving.db") as raw:
        triggers = sorted(r[0] for r in raw.execute("select name from sqlite_master where type = 'trigger'"))
    assert triggers == ["audit_log_no_delete", "audit_log_no_replace", "audit_log_no_update",
                        "patrol_log_no_delete", "patrol_log_no_replace", "patrol_log_no_update",
                        "patrol_overrides_no_delete", "patrol_overrides_no_replace", "patrol_overrides_no_update"]
    with sqlite3.connect(tmp_path / "fresh" / "serving.db") as raw:  # one chain head per log, not one per worker
        assert raw.execute("select table_name, last_id, last_hash from log_chain order by 1").fetchall() == [
            ("audit_log", 0, ""), ("patrol_log", 0, ""), ("patrol_overrides", 0, "")]
