"""The planner's map page (``GET /map``): hexes coloured by expected count, the ranked list beside them, city,
shift, category and cell-count selectors, hover details and a print view.

The page needs no key to load; its script asks the planner for an API key once (kept in the tab's
sessionStorage) and calls the JSON/GeoJSON endpoints with it, so every forecast it shows is authorised and
audited like any other. It works offline: plain JS and CSS from ``/static`` (no CDN), hexes drawn as SVG in
Web Mercator by the script. A base map is drawn only when ``HOTSPOTS_MAP_TILE_URL`` is set; otherwise the page
makes no request outside the service, and its Content-Security-Policy makes the browser enforce that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from features.settings import Settings
from serving.checks import PNG_MAX_K
from serving.dependencies import API_KEY_HEADER, Settings_

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
SHIFT_WINDOW = 9  # shifts offered before and after 'next' in the selector (three days of three shifts)

router = APIRouter(tags=["map"])


def _asset(name: str) -> str:
    """URL of a static file with a content hash, so a new release is never served from a stale browser cache."""
    digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    return f"/static/{name}?v={digest}"


def tile_source(tile_url: str | None) -> str | None:
    """The CSP source of the tile server (a '{s}' subdomain placeholder becomes a wildcard)."""
    if not tile_url:
        return None
    parts = urlsplit(tile_url)
    return f"{parts.scheme}://{parts.netloc.replace('{s}', '*')}"


def page_config(service: Settings) -> dict:
    tiles = service.map_tile_url
    host = urlsplit(tiles).netloc.replace("{s}.", "") if tiles else None
    attribution = None
    if host:
        attribution = "Base map © OpenStreetMap contributors" if "openstreetmap" in host else f"Base map: {host}"
    return {"api": "/v1", "key_header": API_KEY_HEADER, "default_k": service.default_k, "png_max_k": PNG_MAX_K,
            "shift_window": SHIFT_WINDOW,
            "tile_url": tiles, "tile_attribution": attribution}


def content_security_policy(service: Settings) -> str:
    images = " ".join(filter(None, ["'self'", "data:", "blob:", tile_source(service.map_tile_url)]))
    return (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src {images}; connect-src 'self'; "
            "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hotspot forecast · patrol map</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{css}">
<script id="map-config" type="application/json">{config}</script>
<script src="{js}" defer></script>
</head>
<body>
<header class="topbar">
  <div class="brand">
    <span class="logo" aria-hidden="true"></span>
    <div>
      <h1>Hotspot forecast</h1>
      <p class="tagline">Place-based patrol planning · expected incidents per H3 cell and shift</p>
    </div>
  </div>
  <form class="controls" id="controls" autocomplete="off">
    <label>City <select id="city" name="city"></select></label>
    <label>Shift <select id="shift" name="shift"></select></label>
    <label>Category <select id="category" name="category"></select></label>
    <label>Cells <select id="k" name="k"></select></label>
  </form>
  <div class="actions">
    <button type="button" id="print" title="Print the map and the ranked list on one page">Print</button>
    <button type="button" id="download" title="Download the printable briefing map (PNG)">Briefing PNG</button>
    <button type="button" id="change-key" class="ghost" title="Enter another API key">API key</button>
  </div>
</header>
<div id="message" class="message" role="alert" hidden></div>
<div id="after-data" class="flag" role="status" hidden></div>
<section class="summary" aria-label="Forecast">
  <div><span class="label">City</span><strong id="city-label">–</strong></div>
  <div><span class="label">Shift (local time)</span><strong id="shift-label">–</strong></div>
  <div><span class="label">Category</span><strong id="category-label">–</strong></div>
  <div><span class="label">Flagged</span><strong id="selection-label">–</strong></div>
  <div><span class="label">Model</span><strong id="model-label">–</strong></div>
</section>
<main class="layout">
  <section class="map-panel" aria-label="Map">
    <div class="map-wrap" id="map-wrap">
      <svg id="map" role="img" aria-label="Map of the hotspot cells" preserveAspectRatio="xMidYMid meet">
        <g id="tiles"></g><g id="area"></g><g id="areas"></g><g id="hexes"></g><g id="highlight"></g><g id="labels"></g>
        <g id="area-labels"></g><g id="scale"></g>
      </svg>
      <div class="zoom" role="group" aria-label="Zoom">
        <button type="button" id="zoom-in" title="Zoom in (or scroll / double-click on the map)"
                aria-label="Zoom in">+</button>
        <button type="button" id="zoom-out" title="Zoom out" aria-label="Zoom out">−</button>
        <button type="button" id="zoom-reset" title="Whole study area (drag the map to pan)"
                aria-label="Whole study area">⤢</button>
      </div>
      <div id="tooltip" class="tooltip" hidden></div>
      <div id="loading" class="loading" hidden><span class="spinner" aria-hidden="true"></span>Loading forecast…</div>
      <div id="attribution" class="attribution" hidden></div>
    </div>
    <div class="legend" id="legend" aria-label="Legend">
      <span class="legend-title">Colour: expected incidents in the cell during the shift (darker = more)</span>
      <div class="legend-scale">
        <div class="legend-bar" id="legend-bar"></div>
        <div class="legend-ticks"><span id="legend-min">0</span><span id="legend-mid"></span><span id="legend-max"></span></div>
      </div>
      <span class="legend-area"><i class="swatch-area" aria-hidden="true"></i>rest of the study area</span>
      <span class="legend-area"><i class="swatch-outline" aria-hidden="true"></i>area boundary and name:
        <span id="legend-areas-source">–</span></span>
      <span class="legend-area"><i class="swatch-rank" aria-hidden="true">1</i>rank (1 = highest expected count)</span>
    </div>
  </section>
  <section class="list-panel" aria-label="Ranked cells">
    <h2>Ranked cells <span id="list-count" class="count"></span></h2>
    <table id="ranked">
      <thead><tr><th>#</th><th>Where (area · centre · H3 cell)</th><th class="num">Expected</th>
        <th>Why (top features)</th></tr></thead>
      <tbody></tbody>
    </table>
    <p class="note">Expected: forecast number of incidents in the cell during the shift. Why: the model's largest
    feature contributions, as factors on the expected count (×1.40 raises it by 40%). Hover a cell or a row for its
    risk percentile and area.</p>
  </section>
</main>
<footer>Place-based forecast: cells and shifts only, never people or incident records. Every forecast shown here is
recorded in the service's audit log under your key.</footer>
<div class="overlay" id="key-overlay" hidden>
  <form class="key-card" id="key-form" autocomplete="off">
    <h2>Sign in with an API key</h2>
    <p>Enter your planner key (hsk_…). It stays in this browser tab only and is sent to the service with each request.</p>
    <label for="key-input" class="visually-hidden">API key</label>
    <input id="key-input" name="key" type="password" autocomplete="off" spellcheck="false" placeholder="hsk_…" required>
    <p id="key-message" class="key-message" role="alert"></p>
    <button type="submit" id="key-submit">Open the map</button>
  </form>
</div>
</body>
</html>
"""


def render_page(service: Settings) -> str:
    config = json.dumps(page_config(service)).replace("<", "\\u003c")  # never closes the script element
    return PAGE.format(css=_asset("map.css"), js=_asset("map.js"), config=config)


@router.get("/map", response_class=HTMLResponse, summary="The planner's map page (HTML; it asks for an API key)")
def map_page(service: Settings_) -> HTMLResponse:
    headers = {"Content-Security-Policy": content_security_policy(service), "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
    return HTMLResponse(render_page(service), headers=headers)
