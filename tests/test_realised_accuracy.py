"""The realised-accuracy record: the cells the service handed out for each shift (its audit rows) scored against
the incidents the panel holds for that shift, here re-scored independently with plain numpy from the audit
database and the panel's counts; beside the saved backtest's band and the strongest baseline; in the model card,
the metrics and `hotspots accuracy`. The audit rows' new column keeps the hash chain valid."""

from __future__ import annotations

import json

import h3
import numpy as np
import pytest
import sqlalchemy as sa
from accuracy_support import COVERAGE, live_service, served_shift_ids
from service_support import CITY, get
from typer.testing import CliRunner

from features.paths import DataPaths
from serving.keys import Role


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with live_service(toronto_incidents, tmp_path_factory.mktemp("realised")) as service:
        yield service


def audit_flags(settings) -> dict[int, list[str]]:
    """shift id -> the H3 ids of the latest hotspots response for it, straight from the audit table."""
    engine = sa.create_engine(f"sqlite:///{settings.data_dir / 'serving.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT params, flagged FROM audit_log WHERE flagged IS NOT NULL ORDER BY id"))
            return {json.loads(p)["shift_id"]: json.loads(f) for p, f in rows}
    finally:
        engine.dispose()


def independent(svc) -> dict[str, np.ndarray]:
    """Per served shift: incidents, incidents in the flagged cells, flagged area share (numpy, h3, the counts)."""
    flags = audit_flags(svc.settings)
    cells = svc.panel.study_area.h3_ids
    row = {h: i for i, h in enumerate(cells)}
    areas = np.array([h3.cell_area(h, "km^2") for h in cells])
    counts = svc.panel.counts
    shift, cell, n = (counts[c].to_numpy() for c in ("shift", "cell", "count"))
    out: dict[str, list] = {"shift": [], "crimes": [], "hits": [], "area": []}
    for sid in sorted(flags):
        observed = np.bincount(cell[shift == sid], weights=n[shift == sid], minlength=len(cells))
        idx = np.array([row[h] for h in flags[sid]])
        out["shift"].append(sid)
        out["crimes"].append(observed.sum())
        out["hits"].append(observed[idx].sum())
        out["area"].append(areas[idx].sum() / areas.sum())
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def card_accuracy(svc) -> dict:
    r = get(svc, f"/v1/models/{CITY}", Role.analyst)
    assert r.status_code == 200, r.text
    return r.json()["accuracy"]


def test_every_served_shift_has_its_flags_in_the_audit_log(svc):
    flags = audit_flags(svc.settings)
    assert sorted(flags) == served_shift_ids(svc.panel).tolist()
    for response in svc.served:
        assert flags[response["shift"]["shift_id"]] == [c["h3"] for c in response["hotspots"]]


def test_the_record_equals_an_independent_scoring_of_the_audit_rows(svc):
    record, mine = card_accuracy(svc), independent(svc)
    shifts = record["shifts"]
    assert record["scored_shifts"] == len(mine["shift"]) == len(shifts) == 30
    assert [s["shift_id"] for s in shifts] == mine["shift"].astype(int).tolist()
    np.testing.assert_allclose([s["crimes"] for s in shifts], mine["crimes"])
    np.testing.assert_allclose([s["hits"] for s in shifts], mine["hits"])
    np.testing.assert_allclose([s["area_share"] for s in shifts], mine["area"], rtol=1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = mine["hits"] / mine["crimes"]
    np.testing.assert_allclose([np.nan if s["hit_rate"] is None else s["hit_rate"] for s in shifts], rate)
    np.testing.assert_allclose([np.nan if s["pai"] is None else s["pai"] for s in shifts], rate / mine["area"])
    pooled = mine["hits"].sum() / mine["crimes"].sum()  # ten days: all inside the rolling 28-day window
    assert record["rolling"]["hit_rate"] == pytest.approx(pooled)
    assert record["rolling"]["pai"] == pytest.approx(pooled / mine["area"].mean())
    assert record["overall"]["hit_rate"] == pytest.approx(pooled) and record["rolling"]["n_shifts"] == 30
    assert shifts[-1]["rolling_hit_rate"] == pytest.approx(pooled)
    first_day = slice(0, 3)
    assert shifts[2]["rolling_hit_rate"] == pytest.approx(mine["hits"][first_day].sum() / mine["crimes"][first_day].sum())


def test_the_record_sits_beside_the_backtest_band_and_the_strongest_baseline(svc):
    record = card_accuracy(svc)
    summary = json.loads((DataPaths(svc.settings).backtests_root / svc.backtest / "summary.json").read_text())
    band = record["backtest"]
    assert band["coverage"] == COVERAGE and band["forecaster"] == "lightgbm" and band["baseline"] == "naive"
    saved = {f: next(c for c in summary["forecasters"][f]["coverages"] if c["coverage"] == COVERAGE)["hit_rate"]
             for f in ("lightgbm", "naive")}
    assert (band["hit_rate_low"], band["hit_rate"], band["hit_rate_high"]) == pytest.approx(
        (saved["lightgbm"]["low"], saved["lightgbm"]["point"], saved["lightgbm"]["high"]))
    assert band["baseline_hit_rate"] == pytest.approx(saved["naive"]["point"])
    assert record["baseline"] == "naive"
    base = [s["baseline_hit_rate"] for s in record["shifts"] if s["crimes"] > 0]
    assert base and all(0 <= b <= 1 for b in base)
    assert 0 < record["rolling"]["baseline_hit_rate"] < 1 and record["rolling"]["baseline_pai"] > 0


def test_a_normal_stream_is_not_degraded_and_the_gauges_show_the_record(svc):
    record = card_accuracy(svc)
    assert not record["degraded"] and record["reasons"] == []
    assert {a["kind"]: a["fired"] for a in record["drift"]} == {"hit_rate": False, "volume": False, "category_mix": False}
    ready = svc.client.get("/readyz").json()
    city = next(c for c in ready["cities"] if c["city"] == CITY)
    assert ready["status"] == "ready" and city["degraded"] is False and city["degraded_reasons"] == []
    text = svc.client.get("/metrics").text
    assert f'hotspots_realised_hit_rate{{city="{CITY}",window="rolling"}} {record["rolling"]["hit_rate"]!r}' in text
    assert f'hotspots_drift_alarm{{city="{CITY}",kind="hit_rate"}} 0.0' in text
    assert f'hotspots_degraded{{city="{CITY}"}} 0.0' in text


def test_the_audit_chain_holds_with_the_flagged_cells(svc):
    from serving.chain import verify

    assert verify(svc.app.state.db.engine) == []


def test_accuracy_cli_prints_the_same_record(svc):
    from serving.cli import app

    record = card_accuracy(svc)
    result = CliRunner().invoke(app, ["accuracy", CITY, "--json", "--data-dir", str(svc.settings.data_dir)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["rolling"] == record["rolling"] and printed["scored_shifts"] == record["scored_shifts"]
    text = CliRunner().invoke(app, ["accuracy", CITY, "--data-dir", str(svc.settings.data_dir)])
    assert text.exit_code == 0 and "last 28 days: 30 shifts" in text.output and "drift hit_rate: ok" in text.output
    missing = CliRunner().invoke(app, ["accuracy", "atlantis", "--data-dir", str(svc.settings.data_dir)])
    assert missing.exit_code == 2 and "no panel for 'atlantis'" in missing.output and "Traceback" not in missing.output
