"""The audit log's flagged cells (migration 0003) keep the hash chain valid: rows chained before the column
existed verify unchanged after the upgrade, rows with flags are hashed with them, and editing or clearing the
flags is caught. And the realised scoring's window and baseline arithmetic on small synthetic arrays."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command

from forecasting.realised import pooled, rolling, score_flags
from serving.chain import chain_insert, verify
from serving.db import Database
from serving.migrate import alembic_config, head

ROW = {"at": datetime(2020, 2, 1, tzinfo=UTC), "key_id": "k", "role": "planner", "endpoint": "/v1/hotspots",
       "city": "toronto-mci", "model_version": "1", "response_bytes": 10}


def old_hash(row_id: int, row: dict, previous: str) -> str:
    """The chain's hash as revision 0002 wrote it (no flagged column)."""
    fields = [row["at"].isoformat(timespec="microseconds"), row["key_id"], row["role"], row["endpoint"], row["params"],
              row["city"], row["model_version"], row["response_bytes"]]
    payload = ["audit_log", row_id, fields, previous]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def test_rows_chained_before_0003_still_verify_and_flags_are_hashed(tmp_path):
    path = tmp_path / "serving.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    engine.dispose()
    previous = ""
    with sqlite3.connect(path) as raw:  # two rows as a 0002 service wrote them
        for i in (1, 2):
            row = {**ROW, "params": json.dumps({"shift_id": i})}
            previous = old_hash(i, row, previous)
            raw.execute("INSERT INTO audit_log (id, at, key_id, role, endpoint, params, city, model_version, "
                        "response_bytes, row_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (i, row["at"].replace(tzinfo=None).isoformat(sep=" "), row["key_id"], row["role"],
                         row["endpoint"], row["params"], row["city"], row["model_version"], row["response_bytes"],
                         previous))
            raw.execute("UPDATE log_chain SET last_id = ?, last_hash = ? WHERE table_name = 'audit_log'", (i, previous))
    db = Database(f"sqlite:///{path}")  # migrates to head: 0003 adds the column
    assert head() == "0003" and verify(db.engine) == []
    with db.engine.begin() as conn:
        ids = chain_insert(conn, "audit_log", [{**ROW, "params": "{}", "flagged": json.dumps(["89a", "89b"])},
                                               {**ROW, "params": "{}"}])  # one batch, with and without flags
    assert ids == [3, 4] and verify(db.engine) == []
    db.dispose()
    for edit in ("UPDATE audit_log SET flagged = '[\"89c\"]' WHERE id = 3", "UPDATE audit_log SET flagged = NULL WHERE id = 3",
                 "UPDATE audit_log SET flagged = '[\"89c\"]' WHERE id = 2"):
        copy = tmp_path / "edited.db"
        copy.unlink(missing_ok=True)
        with sqlite3.connect(path) as source, sqlite3.connect(copy) as dest:
            source.backup(dest)
        with sqlite3.connect(copy) as raw:
            raw.execute("DROP TRIGGER audit_log_no_update")
            raw.execute(edit)
        tampered = Database(f"sqlite:///{copy}")
        found = verify(tampered.engine)
        tampered.dispose()
        assert [b.kind for b in found] == ["trigger", "edited"], (edit, found)


def test_scores_rolling_windows_and_pooling_on_a_small_stream():
    per_day = 3
    shift_ids = np.array([10, 11, 12, 13, 30, 31])  # a gap: shifts 30-31 are more than 2 days after 13
    observed = np.array([[1, 0, 2], [0, 0, 0], [3, 1, 0], [0, 2, 2], [1, 1, 1], [0, 4, 0]], dtype=float)
    flagged = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    areas = np.array([1.0, 1.0, 2.0])
    s = score_flags(shift_ids[::-1], flagged[::-1], observed[::-1], areas)  # any order in, sorted out
    assert s.shift_ids.tolist() == shift_ids.tolist()
    assert s.hits.tolist() == [1, 0, 4, 2, 1, 4] and s.crimes.tolist() == [3, 0, 4, 4, 3, 4]
    assert s.area_share.tolist() == [0.25, 0.25, 0.5, 0.25, 0.25, 0.25]
    assert np.isnan(s.hit_rate[1]) and s.pai[2] == pytest.approx(2.0)
    rate, pai = rolling(s, per_day, days=2)  # 6 shifts back: 13 pools 10..13, 30 pools only 30 (25 < id)
    assert rate[3] == pytest.approx(7 / 11) and pai[3] == pytest.approx((7 / 11) / np.mean([0.25, 0.25, 0.5, 0.25]))
    assert rate[4] == pytest.approx(1 / 3) and rate[5] == pytest.approx(5 / 7)
    assert np.isnan(rolling(score_flags(shift_ids[1:2], flagged[1:2], observed[1:2], areas), per_day)[0][0])
    everything = pooled(s)
    assert everything.hit_rate == pytest.approx(12 / 18) and everything.n_shifts == 6
    assert pooled(s, np.zeros(6, dtype=bool)).hit_rate is None


def test_the_baseline_flags_as_many_cells_as_were_served_and_from_history_only():
    from functools import partial

    import h3
    from test_forecasters import CENTER, FIRST, idx, toy_panel

    from forecasting.baselines import Naive
    from forecasting.realised import baseline_flags

    hot = h3.grid_disk(CENTER, 1)[1]
    events = {(hot, offset): 2 for offset in range(0, 150)}
    events.update({(CENTER, offset): 5 for offset in range(150, 200)})  # after the fit point: must not move flags
    panel, area = toy_panel(events)
    shift_ids = np.array([FIRST + 150, FIRST + 151, FIRST + 152])
    flags = baseline_flags(partial(Naive, window_days=7), panel, shift_ids, np.array([1, 3, 2]))
    assert flags.shape == (3, len(area)) and flags.sum(axis=1).tolist() == [1, 3, 2]
    assert flags[0, idx(area, hot)] and not flags[0, idx(area, CENTER)]
