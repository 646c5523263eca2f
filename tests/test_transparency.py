"""The public transparency page: no key, the accuracy record against the baseline, the model, the data period,
the drift status and the retention rule, and no cell list of any shift."""

from __future__ import annotations

import pytest
from accuracy_support import live_service
from service_support import CITY, get

from serving.keys import Role


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with live_service(toronto_incidents, tmp_path_factory.mktemp("transparency")) as service:
        yield service


def test_the_page_renders_without_a_key_and_shows_the_record(svc):
    r = svc.client.get(f"/transparency/{CITY}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    record = get(svc, f"/v1/models/{CITY}", Role.analyst).json()["accuracy"]
    rolling = record["rolling"]
    assert 'id="accuracy-record"' in page and "30 served shift(s) scored" in page
    assert f"{rolling['hit_rate']:.1%}" in page and f"{rolling['baseline_hit_rate']:.1%}" in page
    assert f"{rolling['pai']:.2f}" in page and "naive" in page
    band = record["backtest"]
    assert f"{band['hit_rate_low']:.1%} – {band['hit_rate_high']:.1%}" in page
    assert f"version <strong>{svc.version}</strong>" in page
    assert "No drift alarm." in page and "Data retention" in page and "hotspots retention --max-age-days" in page
    assert "Bias audit" in page and "Feedback-loop diagnostics" in page


def test_the_page_lists_no_cells(svc):
    page = svc.client.get(f"/transparency/{CITY}").text
    flagged = {c["h3"] for response in svc.served for c in response["hotspots"]}
    assert flagged and not any(cell in page for cell in flagged)
    assert not any(cell in page for cell in svc.panel.study_area.h3_ids)


def test_an_unknown_city_is_a_clear_404(svc):
    r = svc.client.get("/transparency/atlantis")
    assert r.status_code == 404 and "atlantis" in r.json()["detail"]
