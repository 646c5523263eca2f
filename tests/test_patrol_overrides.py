"""Human oversight in the patrol log: a planner records that flagged cells were NOT patrolled, and why (fixed
reasons, 'other' with a short code, no free text). Stored append-only in their own hash chain, idempotent on
retry, audited, and counted: the share of flags not patrolled, by reason. Small real Toronto panel, no model."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import polars as pl
import pytest
from service_support import CITY, isolated_mlflow_env, panel_only_service

from forecasting.patrol_dose import override_summary
from serving.chain import verify as verify_chain
from serving.keys import Role

SHIFT = "2020-02-10T14:00:00-05:00"
NOW = datetime(2020, 2, 12, 17, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with isolated_mlflow_env(), panel_only_service(toronto_incidents, tmp_path_factory.mktemp("overrides"), NOW) as s:
        yield s


def post(svc, body, role: Role = Role.planner, key: str | None = None, path: str = "/v1/patrols/overrides"):
    headers = {"X-API-Key": svc.keys[role], **({"Idempotency-Key": key} if key else {})}
    return svc.client.post(path, json=body, headers=headers)


def summary(svc, role: Role = Role.analyst, **params):
    return svc.client.get("/v1/patrols/overrides", params={"city": CITY, **params},
                          headers={"X-API-Key": svc.keys[role]})


def stored(svc, table: str = "patrol_overrides") -> list[tuple]:
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw:
        return raw.execute(f"select h3, reason, code from {table} order by id").fetchall()


def messages(response) -> list[str]:
    assert response.status_code == 422, response.text
    return [p["msg"] for p in response.json()["detail"]]


def test_overrides_are_stored_idempotent_and_counted(svc):
    a, b, c, d, e = svc.cells[:5]
    # the shift's flags as planners account for them: three patrolled, three not (one of them twice)
    assert post(svc, {"city": CITY, "shift": SHIFT, "patrols": [{"h3": x, "dose_minutes": 30} for x in (a, b, c)]},
                path="/v1/patrols").status_code == 201
    body = {"city": CITY, "shift": SHIFT, "overrides": [
        {"h3": d, "reason": "other_priorities"}, {"h3": e, "reason": "no_access"},
        {"h3": c, "reason": "other", "code": "flooding"}]}
    first = post(svc, body, key="overrides-1")
    assert first.status_code == 201, first.text
    receipt = first.json()
    assert receipt["count"] == 3 and receipt["by_reason"] == {"no_access": 1, "other": 1, "other_priorities": 1}
    assert receipt["shift"]["start"] == SHIFT
    # a retry with the same Idempotency-Key: the first answer, nothing stored again
    again = post(svc, body, key="overrides-1")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true" and again.json() == receipt
    assert stored(svc) == [(d, "other_priorities", None), (e, "no_access", None), (c, "other", "flooding")]
    # the key reused for another report is refused, naming the header
    other = {**body, "overrides": [{"h3": a, "reason": "safety"}]}
    assert "already used for another report" in messages(post(svc, other, key="overrides-1"))[0]

    # counted: 5 flagged cell-shifts accounted for (a, b, c patrolled; d, e overridden; c both: contradicted)
    response = summary(svc)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["flags"] == 5 and got["not_patrolled"] == 3 and got["share_not_patrolled"] == pytest.approx(0.6)
    assert got["contradicted"] == 1
    shares = {(r["reason"], r["code"]): (r["count"], r["share_of_flags"]) for r in got["by_reason"]}
    assert shares == {("other_priorities", None): (1, 0.2), ("no_access", None): (1, 0.2), ("other", "flooding"): (1, 0.2)}
    assert summary(svc, start="2020-02-11T00:00").json()["flags"] == 0  # a later window: nothing
    assert summary(svc, role=Role.planner).status_code == 403  # reading the log is the analyst's
    # the audit trail names the request without any cell list; the chain is intact and the table append-only
    audit = svc.client.get("/v1/audit", headers={"X-API-Key": svc.keys[Role.auditor]}).json()["entries"]
    posted = [x for x in audit if x["endpoint"] == "/v1/patrols/overrides" and "n_cells" in x["params"]]
    assert len(posted) == 1 and posted[0]["params"]["by_reason"] == receipt["by_reason"]
    assert verify_chain(svc.app.state.db.engine) == []
    with sqlite3.connect(svc.settings.data_dir / "serving.db") as raw, pytest.raises(sqlite3.IntegrityError,
                                                                                      match="append-only"):
        raw.execute("update patrol_overrides set reason = 'safety'")


def test_no_free_text_and_every_problem_named(svc):
    a, b = svc.cells[5:7]
    before = stored(svc)
    bad_reason = post(svc, {"city": CITY, "shift": SHIFT, "overrides": [{"h3": a, "reason": "busy"}]})
    assert any("other_priorities" in m for m in messages(bad_reason))
    sentence = post(svc, {"city": CITY, "shift": SHIFT, "overrides": [
        {"h3": a, "reason": "other", "code": "Officer Smith was at lunch"}]})
    assert any("string should match pattern" in m.lower() for m in messages(sentence))
    assert any("needs a short code" in m for m in messages(
        post(svc, {"city": CITY, "shift": SHIFT, "overrides": [{"h3": a, "reason": "other"}]})))
    assert any("only reason 'other' takes a code" in m for m in messages(
        post(svc, {"city": CITY, "shift": SHIFT, "overrides": [{"h3": a, "reason": "safety", "code": "x"}]})))
    assert any("note" in m or "extra" in m.lower() for m in messages(
        post(svc, {"city": CITY, "shift": SHIFT, "overrides": [{"h3": a, "reason": "safety", "note": "why"}]})))
    mixed = messages(post(svc, {"city": CITY, "shift": "2020-02-10T15:00", "overrides": [
        {"h3": "not-a-cell", "reason": "safety"}, {"h3": b, "reason": "safety"}, {"h3": b, "reason": "no_access"}]}))
    assert any("not the start of a shift" in m for m in mixed) and any("not an H3 cell id" in m for m in mixed)
    assert any("already at overrides[1]" in m for m in mixed)
    assert post(svc, {"city": CITY, "shift": SHIFT, "overrides": [{"h3": a, "reason": "safety"}]},
                role=Role.planner).status_code == 201
    assert stored(svc) == before + [(a, "safety", None)]


def test_override_summary_against_given_flags():
    flags = pl.DataFrame({"shift_id": [1, 1, 1, 2], "h3": ["a", "b", "c", "a"]})
    patrols = pl.DataFrame({"shift_id": [1], "h3": ["a"], "dose_minutes": [20.0]})
    overrides = pl.DataFrame({"shift_id": [1, 1, 2, 3], "h3": ["b", "b", "a", "z"],
                              "reason": ["no_access", "safety", "other", "safety"], "code": [None, None, "flood", None]},
                             schema_overrides={"code": pl.String})
    s = override_summary(overrides, patrols, flags)
    assert (s.flags, s.not_patrolled, s.outside_flags, s.contradicted) == (4, 2, 1, 0)
    assert s.share_not_patrolled == 0.5
    m = s.metrics()
    assert m["share_not_patrolled.no_access"] == 0.25 and m["share_not_patrolled.other"] == 0.25
    assert m["share_not_patrolled.safety"] == 0.0  # b's second reason is not counted twice
    assert s.payload()["flags_source"] == "the flags given"
