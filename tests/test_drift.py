"""Drift alarms: a perturbed stream fires them, a normal one does not. The checks on real Toronto slices (volume
surge, category-mix shift), then the service: incidents of the served shifts moved to other cells make the
rolling realised hit rate fall below the backtest band, and /readyz, the model card and the metrics say so;
the normal stream clears it again."""

from __future__ import annotations

import polars as pl
import pytest
from accuracy_support import live_service, moved_panel, scaled_panel, served_shift_ids, use_panel
from conftest import toronto_box_panel
from service_support import BOX, CITY, PANEL_END, PANEL_START, get

from features.settings import Settings
from forecasting.drift import hit_rate_check, volume_and_mix
from serving.keys import Role

S = Settings()


def checks(panel) -> dict:
    found = volume_and_mix(panel, S.drift_recent_days, S.drift_reference_days, S.drift_volume_change,
                           S.drift_mix_distance)
    return {c.kind: c for c in found}


@pytest.fixture(scope="module")
def box(toronto_incidents):
    return toronto_box_panel(toronto_incidents, *BOX, PANEL_START, PANEL_END)[1]


def test_a_normal_stream_raises_no_volume_or_mix_alarm(box):
    for cut in range(box.end_shift - 360, box.end_shift + 1, 60):  # the last four months, every 20 days
        found = checks(box.until(cut))
        assert not found["volume"].fired and not found["category_mix"].fired, (cut, found)


def test_a_volume_surge_fires_the_volume_alarm(box):
    found = checks(scaled_panel(box, S.drift_recent_days, 3))
    assert found["volume"].fired and not found["category_mix"].fired
    assert found["volume"].value == pytest.approx(3 * (1 + checks(box)["volume"].value) - 1)
    assert "beyond +-35%" in found["volume"].reason


def test_a_category_shift_fires_the_mix_alarm(box):
    start = box.end_shift - S.drift_recent_days * box.calendar.per_day
    theft = box.categories.index("auto_theft")
    surge = box.counts.with_columns(
        pl.when((pl.col("shift") >= start) & (pl.col("category") == theft)).then(pl.col("count") * 6)
        .otherwise(pl.col("count")).cast(box.counts["count"].dtype).alias("count"))
    from dataclasses import replace

    found = checks(replace(box, counts=surge, lineage="auto-theft-surge"))
    assert found["category_mix"].fired and "most in auto_theft" in found["category_mix"].reason


def test_the_hit_rate_check_needs_enough_shifts_and_compares_with_the_band_low():
    assert hit_rate_check(0.10, 30, 0.20, 0.05, 21).fired
    assert not hit_rate_check(0.25, 30, 0.20, 0.05, 21).fired
    assert not hit_rate_check(0.10, 5, 0.20, 0.05, 21).fired  # too few shifts to call it
    assert not hit_rate_check(None, 30, 0.20, 0.05, 21).fired and not hit_rate_check(0.1, 30, None, 0.05, 21).fired


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with live_service(toronto_incidents, tmp_path_factory.mktemp("drift")) as service:
        yield service


def state(svc) -> tuple[dict, dict, str]:
    card = get(svc, f"/v1/models/{CITY}", Role.analyst)
    assert card.status_code == 200, card.text
    return card.json()["accuracy"], svc.client.get("/readyz").json(), svc.client.get("/metrics").text


def test_incidents_moving_away_from_the_flags_fire_the_hit_rate_alarm_and_clear_when_they_do_not(svc):
    normal, ready, metrics = state(svc)
    assert not normal["degraded"] and ready["status"] == "ready"
    band = normal["backtest"]
    assert normal["rolling"]["hit_rate"] >= band["hit_rate_low"]

    use_panel(svc, moved_panel(svc.panel, served_shift_ids(svc.panel)))
    moved, ready, metrics = state(svc)
    assert moved["scored_shifts"] == normal["scored_shifts"]
    assert moved["rolling"]["hit_rate"] < band["hit_rate_low"]
    assert moved["degraded"] and len(moved["reasons"]) == 1 and "below the backtest interval" in moved["reasons"][0]
    assert ready["status"] == "degraded" and ready["ready"] is True  # still served
    city = next(c for c in ready["cities"] if c["city"] == CITY)
    assert city["degraded"] and city["degraded_reasons"] == moved["reasons"]
    assert f'hotspots_drift_alarm{{city="{CITY}",kind="hit_rate"}} 1.0' in metrics
    assert f'hotspots_degraded{{city="{CITY}"}} 1.0' in metrics

    use_panel(svc, svc.panel)  # the stream as it was: the alarm clears
    cleared, ready, metrics = state(svc)
    assert not cleared["degraded"] and ready["status"] == "ready"
    assert cleared["rolling"] == normal["rolling"]
    assert f'hotspots_drift_alarm{{city="{CITY}",kind="hit_rate"}} 0.0' in metrics


def test_a_volume_surge_makes_the_service_degraded(svc):
    use_panel(svc, scaled_panel(svc.panel, S.drift_recent_days, 3))
    try:
        surged, ready, metrics = state(svc)
        assert surged["degraded"] and any(r.startswith("incidents per day") for r in surged["reasons"])
        assert ready["status"] == "degraded"
        assert f'hotspots_drift_alarm{{city="{CITY}",kind="volume"}} 1.0' in metrics
    finally:
        use_panel(svc, svc.panel)
