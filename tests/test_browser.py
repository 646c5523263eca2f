"""The planner's map page in a real browser against the real server.

uvicorn (``serving.app:create_app --factory``, settings from the environment; in a thread of the test process)
serves a data folder built by ``served_city`` (small real Toronto panel, registered champion);
Debian's Chromium, driven by Playwright, loads /map, signs in with a planner key, sees the hexes and the
ranked list agree with /v1/hotspots, switches shift, hovers a hex, prints to one page and saves a screenshot
that must not be blank. Every request the page makes must go to the service (no CDN, no tiles unless set).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import numpy as np
import pytest
import uvicorn
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from service_support import BARE, CITY, colour_stats, free_port, isolated_mlflow_env, served_city

from serving.db import Database
from serving.keys import KeyStore, Role

CHROMIUM = os.environ.get("HOTSPOTS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
TIMEOUT_MS = 30_000


def chromium_path() -> str:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install chromium chromium-driver` "
                    "(`./dev.sh test` does), or point HOTSPOTS_CHROMIUM at a Chromium binary")
    return CHROMIUM


@pytest.fixture(scope="module")
def server(toronto_incidents, tmp_path_factory):
    """uvicorn serving ``serving.app:create_app --factory`` (settings from HOTSPOTS_* variables, as the deployment
    runs it) on a loopback port, in a thread of this test process: a server process of its own cost 6-8 CPU-s of
    imports this process has already paid, and the page talks to it over real HTTP all the same."""
    chromium_path()  # fail early, before training anything, when the browser is missing
    root = tmp_path_factory.mktemp("browser")
    with isolated_mlflow_env():
        city = served_city(toronto_incidents, root)
    db = Database.for_settings(city.settings)
    try:
        key = KeyStore(db).create_key(Role.planner, "browser test")
    finally:
        db.dispose()
    port = free_port()
    env = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith(("HOTSPOTS_", "MLFLOW_"))]:
        env.delenv(name)
    env.setenv("HOTSPOTS_DATA_DIR", str(city.settings.data_dir.resolve()))
    env.setenv("HOTSPOTS_MODEL_REFRESH_SECONDS", "3600")
    env.setenv("HOTSPOTS_CONFIG", str(root / "no-config.toml"))
    uvicorn_server = uvicorn.Server(uvicorn.Config("serving.app:create_app", factory=True, host="127.0.0.1",
                                                   port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 90
        while not uvicorn_server.started:
            if not thread.is_alive():
                pytest.fail("the server stopped while starting (its error is in the captured log above)")
            if time.monotonic() > deadline:
                pytest.fail("the server did not start within 90 s")
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            assert response.status == 200
        yield SimpleNamespace(base=base, key=key, panel=city.panel, version=city.version)
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)
        env.undo()
        assert not thread.is_alive(), "the server did not stop within 30 s"


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab (own sessionStorage) that records every URL it requests."""
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.requested = []
    tab.errors = []
    tab.on("request", lambda request: tab.requested.append(request.url))
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    try:
        yield tab
    finally:
        context.close()


def api(server, path: str, **params) -> dict:
    request = urllib.request.Request(f"{server.base}{path}?{urlencode(params)}", headers={"X-API-Key": server.key})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def sign_in(page, server, key: str | None = None) -> None:
    page.goto(f"{server.base}/map")
    page.locator("#key-overlay").wait_for(state="visible")
    page.fill("#key-input", key or server.key)
    page.click("#key-submit")


def row_ids(page) -> list[str]:
    return page.locator("#ranked tbody tr").evaluate_all("rows => rows.map(r => r.dataset.h3)")


def only_own_requests(page, server) -> None:
    foreign = [url for url in page.requested if not url.startswith(server.base) and not url.startswith(("data:", "blob:"))]
    assert not foreign, foreign


def test_planner_page_end_to_end(page, server, tmp_path):
    hexes, rows = page.locator("#map polygon.hex"), page.locator("#ranked tbody tr")
    # a wrong key: the server's 401 message is shown and the key is asked again
    sign_in(page, server, key="hsk_000000000000_wrong")
    expect(page.locator("#key-message")).to_contain_text("invalid or revoked API key")
    expect(page.locator("#key-overlay")).to_be_visible()
    page.fill("#key-input", server.key)
    page.click("#key-submit")

    # the next shift: as many hexes as rows as k, in /v1/hotspots's order
    expect(hexes).to_have_count(20)
    expect(rows).to_have_count(20)
    expect(page.locator("#k")).to_have_value("20")
    truth = api(server, "/v1/hotspots", city=CITY, k=20)
    ids = row_ids(page)
    assert ids[0] == truth["hotspots"][0]["h3"] and ids == [h["h3"] for h in truth["hotspots"]]
    expect(rows.first.locator("td.num")).to_have_text(f"{truth['hotspots'][0]['expected_count']:.3f}")
    assert hexes.evaluate_all("hs => hs.map(h => h.dataset.h3)") == ids
    fills = hexes.evaluate_all("hs => hs.map(h => h.getAttribute('fill'))")
    assert fills[0] == "rgb(128,0,38)" and len(set(fills)) > 5  # the top cell darkest, a graded scale
    # the data stop in 2020, so 'next' is the first shift after the data, and the page says so
    expect(page.locator("#after-data")).to_be_visible()
    expect(page.locator("#after-data")).to_contain_text("Forecast for the first shift after the data ends")
    expect(page.locator("#shift-label")).to_contain_text("Sun 1 Mar 2020 · 06:00–14:00 EST")
    expect(page.locator("#model-label")).to_contain_text(f"v{server.version}")
    assert truth["shift"]["after_data"] is True

    # fewer cells
    page.select_option("#k", "10")
    expect(hexes).to_have_count(10)
    expect(rows).to_have_count(10)
    assert row_ids(page) == ids[:10]

    # another shift: the label, the map and the list follow
    before = api(server, f"/v1/cities/{CITY}/shifts", n=9)
    previous = next(s for s in before["shifts"] if s["offset"] == -1)
    page.select_option("#shift", previous["shift"])
    expect(page.locator("#shift-label")).to_contain_text("Sat 29 Feb 2020 · 22:00–Sun 1 Mar 06:00 EST")
    expect(page.locator("#after-data")).to_be_hidden()
    expect(hexes).to_have_count(10)
    night = api(server, "/v1/hotspots", city=CITY, k=10, shift=previous["shift"])
    expect(rows.first).to_have_attribute("data-h3", night["hotspots"][0]["h3"])
    assert row_ids(page) == [h["h3"] for h in night["hotspots"]]
    counts = [float(t) for t in page.locator("#ranked tbody td.num").all_inner_texts()]
    assert counts == pytest.approx([h["expected_count"] for h in night["hotspots"]], abs=5e-4)
    assert counts != pytest.approx([h["expected_count"] for h in truth["hotspots"][:10]], abs=5e-4)
    assert f"shift={previous['shift'].replace(':', '%3A').replace('+', '%2B')}" in page.url  # a shareable link

    # hover a hex: details, and its row lights up; hover a row: its hex lights up
    top = night["hotspots"][0]
    page.hover("#map polygon.hex[data-rank='1']")
    tooltip = page.locator("#tooltip")
    expect(tooltip).to_be_visible()
    expect(tooltip).to_contain_text(top["h3"])
    expect(tooltip).to_contain_text(f"{top['expected_count']:.3f} incidents")
    expect(tooltip).to_contain_text(f"{top['risk_percentile']:.1f}")
    expect(page.locator(f"#ranked tr[data-h3='{top['h3']}']")).to_have_class(re.compile(r"\bactive\b"))
    second = night["hotspots"][1]["h3"]
    page.hover(f"#ranked tr[data-h3='{second}']")
    expect(page.locator(f"#map polygon.hex[data-h3='{second}']")).to_have_class(re.compile(r"\bactive\b"))
    expect(tooltip).to_contain_text(second)

    # the screenshot is a real picture: many colours, mostly not background
    shot = tmp_path / "map.png"
    page.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (VIEWPORT["height"], VIEWPORT["width"])
    distinct, inked = colour_stats(pixels)
    assert distinct > 200, distinct
    assert inked > 0.3  # the most common colour (background) is not most of it
    reds = np.all(np.abs(pixels.astype(int) - (128, 0, 38)) <= 8, axis=2) | (
        (pixels[..., 0] > 200) & (pixels[..., 1] < 120) & (pixels[..., 2] < 80))
    assert reds.sum() > 300  # the hot end of the colour scale is on screen

    only_own_requests(page, server)
    assert not page.errors, page.errors


def test_print_view_puts_map_and_list_on_one_page(page, server):
    sign_in(page, server)
    expect(page.locator("#map polygon.hex")).to_have_count(20)
    expect(page.locator("#after-data")).to_be_visible()
    page.emulate_media(media="print")
    for hidden in ("#controls", "#print", "#change-key"):
        expect(page.locator(hidden)).to_be_hidden()
    for shown in ("#map", "#ranked", "#shift-label", "#after-data"):
        expect(page.locator(shown)).to_be_visible()
    pdf = page.pdf(format="A4", landscape=True, print_background=True)
    assert pdf.startswith(b"%PDF") and re.findall(rb"/Count (\d+)", pdf) == [b"1"]
    page.emulate_media(media="screen")
    expect(page.locator("#controls")).to_be_visible()
    only_own_requests(page, server)


def test_server_messages_are_shown_in_the_page(page, server):
    sign_in(page, server)
    expect(page.locator("#map polygon.hex")).to_have_count(20)
    # a city without a champion: the 503 and what to run, and no stale hexes left on the map
    page.select_option("#city", BARE)
    message = page.locator("#message")
    expect(message).to_be_visible()
    expect(message).to_contain_text("503")
    expect(message).to_contain_text(f"hotspots backtest {BARE}")
    expect(page.locator("#map polygon.hex")).to_have_count(0)
    expect(page.locator("#ranked tbody tr")).to_have_count(0)
    # a category the champion has no model for: the 422 names the field
    page.select_option("#city", CITY)
    expect(page.locator("#map polygon.hex")).to_have_count(20)
    expect(message).to_be_hidden()
    page.select_option("#category", "robbery")
    expect(message).to_contain_text("category: the champion model")
    # the briefing PNG button downloads the same image the API serves
    page.select_option("#category", "all")
    expect(page.locator("#map polygon.hex")).to_have_count(20)
    with page.expect_download() as download:
        page.click("#download")
    png = Path(download.value.path()).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] > 1600
    only_own_requests(page, server)


def test_area_names_zoom_pan_legend_and_map_app_links(page, server, tmp_path):
    sign_in(page, server)
    hexes, rows = page.locator("#map polygon.hex"), page.locator("#ranked tbody tr")
    expect(hexes).to_have_count(20)
    truth = api(server, "/v1/hotspots", city=CITY, k=20)["hotspots"]
    areas = api(server, f"/v1/cities/{CITY}/areas")
    assert areas["source"] != "none" and len(areas["areas"]) > 3

    # the list names each cell's area, its centre and a geo: link, as the API does
    names = page.locator("#ranked tbody td.where .area-name").all_inner_texts()
    expected = [h["area_name"] or f"near {h['location']['nearest_area']}" for h in truth]
    assert names == expected and len(set(names)) >= 2
    first = rows.first
    expect(first.locator(".coords")).to_have_text(f"{truth[0]['centroid']['lat']:.5f}, {truth[0]['centroid']['lon']:.5f}")
    expect(first.locator("a.geo-link")).to_have_attribute("href", truth[0]["geo_uri"])
    assert truth[0]["geo_uri"].startswith("geo:")
    # the map draws the areas' outlines and writes their names; the top cell's area is among them
    expect(page.locator("#areas path.area-outline")).to_have_count(len(areas["areas"]))
    labels = page.locator("#area-labels text.area-label")
    assert labels.count() >= 2
    written = labels.evaluate_all("ts => ts.map(t => t.textContent)")  # SVG text has no innerText
    assert set(written) <= {a["name"] for a in areas["areas"]} and len(set(written)) == len(written)
    # hovering a hex shows its area and location
    page.hover("#map polygon.hex[data-rank='1']")
    expect(page.locator("#tooltip")).to_contain_text(expected[0])
    expect(page.locator("#tooltip")).to_contain_text(truth[0]["location"]["text"])

    # the legend says what colours, outlines and numbers mean
    legend = page.locator("#legend")
    expect(legend).to_contain_text("expected incidents in the cell during the shift (darker = more)")
    expect(legend).to_contain_text("area boundary and name")
    expect(legend).to_contain_text("rank (1 = highest expected count)")
    expect(page.locator("#legend-areas-source")).not_to_have_text("–")

    # zoom: the button, the wheel and a drag change the view; the top hex grows and moves; reset restores it
    svg = page.locator("#map")
    view0, box0 = svg.get_attribute("data-view"), page.locator("#map polygon.hex[data-rank='1']").bounding_box()
    page.click("#zoom-in")
    expect(svg).to_have_attribute("data-zoom", "2.000")
    box1 = page.locator("#map polygon.hex[data-rank='1']").bounding_box()
    assert box1["width"] == pytest.approx(2 * box0["width"], rel=0.05)
    frame = svg.bounding_box()
    page.mouse.move(frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2)
    page.mouse.wheel(0, -400)
    page.wait_for_function("Number(document.getElementById('map').dataset.zoom) > 2")
    before = svg.get_attribute("data-view")
    page.mouse.move(frame["x"] + 60, frame["y"] + 60)
    page.mouse.down()
    page.mouse.move(frame["x"] + 160, frame["y"] + 120, steps=5)
    page.mouse.up()
    page.wait_for_function(f"document.getElementById('map').dataset.view !== {json.dumps(before)}")
    scale_before, ox_before, oy_before = map(float, before.split())
    scale_after, ox_after, oy_after = map(float, svg.get_attribute("data-view").split())
    assert scale_after == scale_before and ox_after - ox_before == pytest.approx(100, abs=2)
    assert oy_after - oy_before == pytest.approx(60, abs=2)
    page.click("#zoom-reset")
    expect(svg).to_have_attribute("data-view", view0)
    expect(hexes).to_have_count(20)

    # zoomed on the hotspots, names readable: the picture for the README (docs/map.png)
    page.click("#zoom-in")
    page.screenshot(path=str(tmp_path / "map-areas.png"))
    only_own_requests(page, server)
    assert not page.errors, page.errors


def test_the_transparency_page_renders_without_a_key(page, server):
    """The public page opens in a browser with no key and no sign-in: the model, the backtest against the
    baselines and the realised-accuracy record (its figures are checked against an independent scoring in
    test_realised_accuracy / test_transparency), and never a cell of the current shift."""
    page.goto(f"{server.base}/transparency/{CITY}")
    expect(page.locator("h1")).to_contain_text(CITY)
    headings = page.locator("h2").all_inner_texts()
    assert {"Model", "Backtest against the baselines", "Realised accuracy of the served flags", "Bias audit",
            "Data retention"} <= set(headings), headings
    expect(page.locator("#accuracy-record")).to_be_visible()
    expect(page.locator("#key-overlay")).to_have_count(0)
    text = page.locator("body").inner_text()
    assert not any(h in text for h in server.panel.study_area.h3_ids[:500])
    assert not page.errors
    only_own_requests(page, server)
