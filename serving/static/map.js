/* The planner's map page. Plain JS, no build step, no libraries: the hexes come from
 * /v1/hotspots.geojson and are drawn as SVG polygons in Web Mercator, fitted to the study area's
 * bounding box (/v1/cities/{city}/area), over the named areas' outlines (/v1/cities/{city}/areas).
 * Zoom (wheel, double-click, +/- buttons) and pan (drag) redraw everything at the new scale, so strokes
 * and names stay crisp and the optional tiles follow. Requests go to this service only, with the planner's API key
 * in the X-API-Key header; base-map tiles are fetched only when the operator configured a tile URL. */
(() => {
  "use strict";

  const CONFIG = JSON.parse(document.getElementById("map-config").textContent);
  const KEY_STORE = "hotspots.apiKey";
  const K_CHOICES = [5, 10, 20, 30, 50, 100];
  // matplotlib's YlOrRd, as in the briefing PNG
  const RAMP = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"];
  const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const STATUS_TITLES = {
    0: "Service unreachable", 401: "Not signed in", 403: "Not allowed", 404: "Not found",
    422: "Check the selection", 503: "Forecast not available",
  };
  // feature name -> words a planner reads (serving/briefing.py has the same rules)
  const FEATURE_LABELS = [
    [/^count_prev_shift$/, "previous shift"],
    [/^count_(\d+)d$/, "last $1 days"],
    [/^same_weekday_shift_(\d+)w$/, "same weekday+shift $1 wk"],
    [/^same_shift_(\d+)d$/, "same shift $1 days"],
    [/^ring1_mean_(\d+)d$/, "neighbours $1 days"],
    [/^ring2_mean_(\d+)d$/, "2nd ring $1 days"],
    [/^near_repeat_ring1_(\w+)$/, "near-repeat nearby $1"],
    [/^near_repeat_(\w+)$/, "near-repeat $1"],
    [/^long_run_rate$/, "long-run rate"],
    [/^cat_(\w+)_(\d+)d$/, "$1 $2 days"],
    [/^cell_(lat|lon)$/, "location"],
  ];

  const $ = (id) => document.getElementById(id);
  const ui = {
    city: $("city"), shift: $("shift"), category: $("category"), k: $("k"),
    svg: $("map"), wrap: $("map-wrap"), tiles: $("tiles"), area: $("area"), hexes: $("hexes"),
    areas: $("areas"), areaLabels: $("area-labels"), areaSource: $("legend-areas-source"),
    highlight: $("highlight"), labels: $("labels"), scale: $("scale"), tooltip: $("tooltip"),
    loading: $("loading"), attribution: $("attribution"), message: $("message"), flag: $("after-data"),
    tbody: document.querySelector("#ranked tbody"), listCount: $("list-count"),
    cityLabel: $("city-label"), shiftLabel: $("shift-label"), categoryLabel: $("category-label"),
    selectionLabel: $("selection-label"), modelLabel: $("model-label"),
    legendBar: $("legend-bar"), legendMin: $("legend-min"), legendMid: $("legend-mid"), legendMax: $("legend-max"),
    keyOverlay: $("key-overlay"), keyForm: $("key-form"), keyInput: $("key-input"), keyMessage: $("key-message"),
  };
  const SVG_NS = ui.svg.namespaceURI; // the inline <svg> knows its namespace: no URL needed here

  const state = {
    cities: new Map(), area: null, areas: null, data: null, byH3: new Map(), view: null, seq: 0, active: null,
    zoom: { k: 1, dx: 0, dy: 0 },
  };
  const MAX_ZOOM = 64;
  let wanted = Object.fromEntries(new URLSearchParams(window.location.search)); // a shared link's selection

  // --- API -------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function describe(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((p) => (p && p.msg) || JSON.stringify(p)).join("; ");
    return "";
  }

  async function api(path, params, as = "json") {
    const key = sessionStorage.getItem(KEY_STORE);
    if (!key) throw new ApiError(401, "Enter an API key to load forecasts.");
    const query = params ? "?" + new URLSearchParams(params).toString() : "";
    let response;
    try {
      response = await fetch(CONFIG.api + path + query, {
        headers: { [CONFIG.key_header]: key, Accept: as === "blob" ? "image/png" : "application/json" },
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, `the hotspot service cannot be reached (${err.message}).`);
    }
    if (response.ok) return as === "blob" ? response.blob() : response.json();
    let detail = "";
    try {
      detail = describe((await response.json()).detail);
    } catch (_) {
      /* not a JSON error body */
    }
    throw new ApiError(response.status, detail || `${response.status} ${response.statusText}`);
  }

  // --- messages and the key --------------------------------------------------------------------------

  function showMessage(status, text) {
    ui.message.replaceChildren();
    const title = document.createElement("strong");
    title.textContent = `${STATUS_TITLES[status] || "Error"}${status ? ` (${status})` : ""}`;
    const body = document.createElement("span");
    body.textContent = text;
    ui.message.append(title, body);
    ui.message.hidden = false;
  }

  function hideMessage() {
    ui.message.hidden = true;
  }

  function askKey(message) {
    ui.keyMessage.textContent = message || "";
    ui.keyOverlay.hidden = false;
    ui.keyInput.value = "";
    ui.keyInput.focus();
  }

  function fail(err) {
    if (!(err instanceof ApiError)) {
      console.error(err); // eslint-disable-line no-console
      showMessage(null, String(err && err.message ? err.message : err));
      return;
    }
    showMessage(err.status, err.message);
    if (err.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      askKey(err.message);
    }
  }

  function setLoading(on) {
    ui.loading.hidden = !on;
    ui.wrap.classList.toggle("busy", on);
  }

  // --- formatting ------------------------------------------------------------------------------------

  /** The local wall-clock parts of an ISO 8601 string as the service sends it (city time + offset). */
  function parts(iso) {
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(iso);
    const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
    return { y, mo, d, time: `${m[4]}:${m[5]}`, weekday: new Date(Date.UTC(y, mo - 1, d)).getUTCDay() };
  }

  function zoneName(iso, timezone) {
    try {
      const fmt = new Intl.DateTimeFormat("en-US", { timeZone: timezone, timeZoneName: "short" });
      return fmt.formatToParts(new Date(iso)).find((p) => p.type === "timeZoneName").value;
    } catch (_) {
      return iso.slice(19);
    }
  }

  const dayText = (p, year = true) => `${DAYS[p.weekday]} ${p.d} ${MONTHS[p.mo - 1]}${year ? ` ${p.y}` : ""}`;

  function windowText(start, end, timezone, year = true) {
    const s = parts(start), e = parts(end);
    const sameDay = s.y === e.y && s.mo === e.mo && s.d === e.d;
    const tail = sameDay ? e.time : `${dayText(e, false)} ${e.time}`;
    return `${dayText(s, year)} · ${s.time}–${tail}${timezone ? ` ${zoneName(start, timezone)}` : ""}`;
  }

  function featureLabel(name) {
    for (const [pattern, label] of FEATURE_LABELS) {
      if (pattern.test(name)) return name.replace(pattern, label).replace(/_/g, " ");
    }
    return name.replace(/_/g, " ");
  }

  const categoryText = (name) => (name === "all" ? "All categories" : name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()));
  const pct = (share, digits = 1) => `${(100 * share).toFixed(digits)}%`;

  function colour(t) {
    const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
    const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
    const rgb = (hex) => [1, 3, 5].map((j) => parseInt(hex.slice(j, j + 2), 16));
    const a = rgb(RAMP[i]), b = rgb(RAMP[i + 1]);
    return `rgb(${a.map((v, j) => Math.round(v + f * (b[j] - v))).join(",")})`;
  }

  // --- selectors -------------------------------------------------------------------------------------

  function option(value, label, selected) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    o.selected = Boolean(selected);
    return o;
  }

  function fillKs(nCells) {
    const current = Number(wanted.k || ui.k.value || CONFIG.default_k);
    const ks = [...new Set([...K_CHOICES, CONFIG.default_k, current, nCells])].filter((k) => k >= 1 && k <= nCells).sort((a, b) => a - b);
    const pick = ks.includes(current) ? current : ks.includes(CONFIG.default_k) ? CONFIG.default_k : ks[ks.length - 1];
    ui.k.replaceChildren(...ks.map((k) => option(k, `top ${k}`, k === pick)));
  }

  function fillShifts(list) {
    const groups = [["Earlier shifts", (s) => s.offset < 0], ["Next shift", (s) => s.offset === 0], ["Later shifts", (s) => s.offset > 0]];
    const pick = list.shifts.some((s) => s.shift === wanted.shift) ? wanted.shift : "next";
    ui.shift.replaceChildren(...groups.map(([label, keep]) => {
      const group = document.createElement("optgroup");
      group.label = label;
      for (const s of list.shifts.filter(keep)) {
        let text = windowText(s.start, s.end, null, false);
        if (s.offset === 0) text = `Next · ${text}${list.after_data ? " (after data)" : ""}`;
        group.append(option(s.shift, text, s.shift === pick));
      }
      return group;
    }).filter((g) => g.children.length));
  }

  function fillCategories(city) {
    const names = ["all", ...city.categories.filter((c) => c !== "all")];
    const pick = names.includes(wanted.category) ? wanted.category : city.model_target || "all";
    ui.category.replaceChildren(...names.map((c) => option(c, categoryText(c) + (c === city.model_target || !city.model_target ? "" : " (no model)"), c === pick)));
  }

  // --- loading ---------------------------------------------------------------------------------------

  async function start() {
    hideMessage();
    try {
      const body = await api("/cities");
      state.cities = new Map(body.cities.map((c) => [c.city, c]));
      if (!body.cities.length) {
        showMessage(503, "the service has no city yet: run `hotspots run <source>` first.");
        return;
      }
      const pick = state.cities.has(wanted.city) ? wanted.city : (body.cities.find((c) => c.ready) || body.cities[0]).city;
      ui.city.replaceChildren(...body.cities.map((c) => option(c.city, c.ready ? c.city : `${c.city} (not ready)`, c.city === pick)));
      await selectCity(pick);
    } catch (err) {
      fail(err);
    }
  }

  async function selectCity(name) {
    const seq = ++state.seq;
    const city = state.cities.get(name);
    const path = `/cities/${encodeURIComponent(name)}`;
    setLoading(true);
    hideMessage();
    try {
      const named = api(`${path}/areas`).catch(() => null); // names are a help: the map works without them
      const [area, shifts, areas] = await Promise.all([api(`${path}/area`), api(`${path}/shifts`, { around: "next", n: CONFIG.shift_window }), named]);
      if (seq !== state.seq) return;
      state.area = area;
      state.areas = areas;
      state.zoom = { k: 1, dx: 0, dy: 0 };
      renderAreaSource();
      fillShifts(shifts);
      fillCategories(city);
      fillKs(area.n_cells);
      wanted = {};
      await loadHotspots();
    } catch (err) {
      if (seq === state.seq) {
        clearForecast();
        fail(err);
        setLoading(false);
      }
    }
  }

  function selection() {
    return { city: ui.city.value, shift: ui.shift.value, category: ui.category.value, k: ui.k.value };
  }

  async function loadHotspots() {
    const seq = ++state.seq;
    const params = selection();
    setLoading(true);
    hideMessage();
    try {
      const body = await api("/hotspots.geojson", params);
      if (seq !== state.seq) return;
      state.data = body;
      state.byH3 = new Map(body.features.map((f) => [f.id, f]));
      render();
      window.history.replaceState(null, "", `?${new URLSearchParams(params)}`);
    } catch (err) {
      if (seq === state.seq) {
        clearForecast();
        fail(err);
      }
    } finally {
      if (seq === state.seq) setLoading(false);
    }
  }

  function clearForecast() {
    state.data = null;
    state.byH3 = new Map();
    setActive(null);
    for (const g of [ui.hexes, ui.labels, ui.highlight]) g.replaceChildren();
    ui.tbody.replaceChildren();
    ui.listCount.textContent = "";
    for (const el of [ui.shiftLabel, ui.categoryLabel, ui.selectionLabel, ui.modelLabel, ui.legendMid, ui.legendMax]) el.textContent = "–";
    ui.cityLabel.textContent = ui.city.value || "–";
    ui.flag.hidden = true;
    if (state.area) drawMap();
  }

  // --- rendering -------------------------------------------------------------------------------------

  function render() {
    const meta = state.data.hotspots;
    const sel = meta.selection;
    ui.cityLabel.textContent = meta.city;
    ui.shiftLabel.textContent = windowText(meta.shift.start, meta.shift.end, meta.shift.timezone);
    ui.categoryLabel.textContent = categoryText(meta.category);
    ui.selectionLabel.textContent = `${sel.n_cells} cells · ${sel.area_km2.toFixed(2)} km² (${pct(sel.area_share)} of the area) · ${pct(sel.expected_share)} of expected incidents`;
    ui.modelLabel.textContent = `${meta.model.name} v${meta.model.version}${meta.model.source === "local_fallback" ? " (local copy: registry unreachable)" : ""}`;
    ui.flag.hidden = !meta.shift.after_data;
    if (meta.shift.after_data) {
      const end = parts(meta.data_end);
      ui.flag.replaceChildren();
      const strong = document.createElement("strong");
      strong.textContent = "Forecast for the first shift after the data ends.";
      ui.flag.append(strong, ` The data stop at ${dayText(end)} ${end.time}, before now, so "next" is that shift. Update the panel (hotspots run) to forecast the real next shift.`);
    }
    drawMap();
    renderList();
    renderLegend();
  }

  function project(lon, lat) {
    const phi = (Math.max(Math.min(lat, 85.05112878), -85.05112878) * Math.PI) / 180;
    return [(lon + 180) / 360, (1 - Math.log(Math.tan(phi) + 1 / Math.cos(phi)) / Math.PI) / 2];
  }

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
    if (parent) parent.append(el);
    return el;
  }

  function drawMap() {
    const rect = ui.wrap.getBoundingClientRect();
    const width = Math.max(320, Math.round(rect.width)), height = Math.max(260, Math.round(rect.height));
    const [west, south, east, north] = state.area.bbox;
    const [x0, y1] = project(west, south), [x1, y0] = project(east, north);
    const pad = 28;
    const fit = Math.min((width - 2 * pad) / (x1 - x0), (height - 2 * pad) / (y1 - y0));
    const { k, dx, dy } = state.zoom; // screen = fitted position * k + (dx, dy)
    const scale = fit * k;
    const ox = ((width - fit * (x1 - x0)) / 2 - fit * x0) * k + dx, oy = ((height - fit * (y1 - y0)) / 2 - fit * y0) * k + dy;
    const toScreen = (lon, lat) => {
      const [x, y] = project(lon, lat);
      return [ox + scale * x, oy + scale * y];
    };
    state.view = { width, height, scale, ox, oy, toScreen };
    ui.svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    ui.svg.dataset.zoom = k.toFixed(3);
    ui.svg.dataset.view = `${scale.toFixed(1)} ${ox.toFixed(1)} ${oy.toFixed(1)}`;
    drawTiles();
    drawArea();
    drawAreas();
    drawHexes();
    drawAreaLabels();
    drawScale();
  }

  // --- zoom and pan ------------------------------------------------------------------------------------

  let frame = null;
  function redraw() {
    if (frame || !state.area) return;
    frame = requestAnimationFrame(() => {
      frame = null;
      drawMap();
    });
  }

  /** Zoom by ``factor`` keeping the screen point (px, py) where it is. */
  function zoomAt(factor, px, py) {
    const z = state.zoom;
    const k = Math.min(MAX_ZOOM, Math.max(1, z.k * factor));
    if (k === z.k) return;
    const bx = (px - z.dx) / z.k, by = (py - z.dy) / z.k;
    state.zoom = k === 1 ? { k: 1, dx: 0, dy: 0 } : { k, dx: px - bx * k, dy: py - by * k };
    redraw();
  }

  function zoomCentre(factor) {
    const rect = ui.svg.getBoundingClientRect();
    zoomAt(factor, rect.width / 2, rect.height / 2);
  }

  function resetZoom() {
    state.zoom = { k: 1, dx: 0, dy: 0 };
    redraw();
  }

  function pointer(event) {
    const rect = ui.svg.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  ui.svg.addEventListener("wheel", (event) => {
    if (!state.area) return;
    event.preventDefault();
    zoomAt(Math.exp(-event.deltaY * 0.0015), ...pointer(event));
  }, { passive: false });
  ui.svg.addEventListener("dblclick", (event) => {
    event.preventDefault();
    zoomAt(2, ...pointer(event));
  });
  let drag = null;
  ui.svg.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    drag = { x: event.clientX, y: event.clientY, moved: false, id: event.pointerId };
  });
  ui.svg.addEventListener("pointermove", (event) => {
    if (!drag || event.pointerId !== drag.id) return;
    const mx = event.clientX - drag.x, my = event.clientY - drag.y;
    if (!drag.moved && Math.hypot(mx, my) < 4) return; // a click or a hover, not a drag
    if (!drag.moved) {
      drag.moved = true;
      ui.svg.setPointerCapture(event.pointerId);
      ui.svg.classList.add("panning");
      setActive(null);
    }
    state.zoom = { ...state.zoom, dx: state.zoom.dx + mx, dy: state.zoom.dy + my };
    drag.x = event.clientX;
    drag.y = event.clientY;
    redraw();
  });
  const endDrag = () => {
    drag = null;
    ui.svg.classList.remove("panning");
  };
  ui.svg.addEventListener("pointerup", endDrag);
  ui.svg.addEventListener("pointercancel", endDrag);
  $("zoom-in").addEventListener("click", () => zoomCentre(2));
  $("zoom-out").addEventListener("click", () => zoomCentre(0.5));
  $("zoom-reset").addEventListener("click", resetZoom);

  function drawTiles() {
    ui.tiles.replaceChildren();
    ui.attribution.hidden = !CONFIG.tile_url;
    ui.svg.classList.toggle("tiles-on", Boolean(CONFIG.tile_url));
    if (!CONFIG.tile_url) return;
    ui.attribution.textContent = CONFIG.tile_attribution || "";
    const { width, height, scale, ox, oy } = state.view;
    let z = Math.min(19, Math.max(0, Math.round(Math.log2(scale / 256))));
    for (; z >= 0; z--) {
      const n = 2 ** z;
      const tx0 = Math.max(0, Math.floor((-ox / scale) * n)), tx1 = Math.min(n - 1, Math.floor(((width - ox) / scale) * n));
      const ty0 = Math.max(0, Math.floor((-oy / scale) * n)), ty1 = Math.min(n - 1, Math.floor(((height - oy) / scale) * n));
      if ((tx1 - tx0 + 1) * (ty1 - ty0 + 1) > 64) continue; // a coarser zoom rather than a flood of requests
      const size = scale / n;
      for (let tx = tx0; tx <= tx1; tx++) {
        for (let ty = ty0; ty <= ty1; ty++) {
          const href = CONFIG.tile_url.replace("{z}", z).replace("{x}", tx).replace("{y}", ty).replace("{s}", "a").replace("{r}", "");
          svg("image", { href, x: ox + tx * size, y: oy + ty * size, width: size + 0.5, height: size + 0.5, preserveAspectRatio: "none", class: "tile" }, ui.tiles);
        }
      }
      return;
    }
  }

  function ringPath(ring) {
    return ring.map(([lon, lat], i) => `${i ? "L" : "M"}${state.view.toScreen(lon, lat).map((v) => v.toFixed(1)).join(",")}`).join("") + "Z";
  }

  function drawArea() {
    const d = state.area.outline.coordinates.map((polygon) => polygon.map(ringPath).join("")).join("");
    ui.area.replaceChildren();
    svg("path", { d, class: "study-area", "fill-rule": "evenodd" }, ui.area);
  }

  function drawAreas() {
    ui.areas.replaceChildren();
    if (!state.areas) return;
    for (const a of state.areas.areas) {
      const d = a.outline.coordinates.map((polygon) => polygon.map(ringPath).join("")).join("");
      const path = svg("path", { d, class: "area-outline", "fill-rule": "evenodd", "data-area": a.name }, ui.areas);
      const title = svg("title", {}, path);
      title.textContent = a.name;
    }
  }

  /** Area names at their label points, largest areas first, skipping any that would overlap a placed one. */
  function drawAreaLabels() {
    ui.areaLabels.replaceChildren();
    if (!state.areas) return;
    const { width, height, toScreen } = state.view;
    const placed = [];
    const order = [...state.areas.areas].filter((a) => a.n_cells > 0).sort((a, b) => b.n_cells - a.n_cells);
    for (const a of order) {
      const [x, y] = toScreen(a.label_at.lon, a.label_at.lat);
      const w = a.name.length * 6.4 + 6, h = 14;
      const box = [x - w / 2, y - h / 2, x + w / 2, y + h / 2];
      if (box[0] < 0 || box[1] < 0 || box[2] > width || box[3] > height) continue;
      if (placed.some((p) => box[0] < p[2] && p[0] < box[2] && box[1] < p[3] && p[1] < box[3])) continue;
      placed.push(box);
      const text = svg("text", { x: x.toFixed(1), y: y.toFixed(1), class: "area-label" }, ui.areaLabels);
      text.textContent = a.name;
    }
  }

  function renderAreaSource() {
    const a = state.areas;
    ui.areaSource.textContent = !a || a.source === "none" ? "no area layer: cells are unnamed"
      : a.source === "toronto_wheel" ? "Toronto neighbourhoods (from the incidents' neighbourhood field)"
      : a.description;
  }

  function hexPoints(feature) {
    const ring = feature.geometry.coordinates[0].slice(0, -1);
    return ring.map(([lon, lat]) => state.view.toScreen(lon, lat).map((v) => v.toFixed(1)).join(",")).join(" ");
  }

  function drawHexes() {
    for (const g of [ui.hexes, ui.labels, ui.highlight]) g.replaceChildren();
    if (!state.data) return;
    const features = state.data.features;
    const max = Math.max(...features.map((f) => f.properties.expected_count), 1e-12);
    for (const f of features) {
      const p = f.properties;
      const hex = svg("polygon", {
        points: hexPoints(f), class: "hex", fill: colour(p.expected_count / max), tabindex: "0",
        "data-h3": f.id, "data-rank": p.rank,
        "aria-label": `Rank ${p.rank}, cell ${f.id}, ${p.expected_count.toFixed(3)} expected incidents`,
      }, ui.hexes);
      hex.addEventListener("focus", () => setActive(f.id, "map"));
      hex.addEventListener("blur", () => setActive(null));
    }
    // rank numbers where the hexes are big enough to hold them
    const [ax, ay] = state.view.toScreen(...features[0].geometry.coordinates[0][0]);
    const [bx, by] = state.view.toScreen(...features[0].geometry.coordinates[0][3]);
    const across = Math.hypot(bx - ax, by - ay);
    if (across < 15) return;
    for (const f of features) {
      const [x, y] = state.view.toScreen(f.properties.centroid.lon, f.properties.centroid.lat);
      const text = svg("text", { x: x.toFixed(1), y: y.toFixed(1), class: "rank-label", "font-size": Math.min(13, across * 0.38).toFixed(1) }, ui.labels);
      text.textContent = f.properties.rank;
    }
    if (state.active) {
      const again = state.active;
      state.active = null;
      setActive(again);
    }
  }

  function drawScale() {
    ui.scale.replaceChildren();
    const { height, scale, oy } = state.view;
    const lat = (Math.atan(Math.sinh(Math.PI * (1 - (2 * (height / 2 - oy)) / scale))) * 180) / Math.PI;
    const metresPerPx = (2 * Math.PI * 6378137 * Math.cos((lat * Math.PI) / 180)) / scale;
    const target = metresPerPx * 120;
    const power = 10 ** Math.floor(Math.log10(target));
    const length = [5, 2, 1].map((s) => s * power).find((v) => v <= target);
    const px = length / metresPerPx, x = 16, y = height - 18;
    svg("rect", { x: x - 6, y: y - 20, width: px + 12, height: 28, rx: 4, class: "scale-bg" }, ui.scale);
    svg("path", { d: `M${x},${y - 4}V${y}H${x + px}V${y - 4}`, class: "scale-bar" }, ui.scale);
    const label = svg("text", { x: x + px / 2, y: y - 7, class: "scale-label" }, ui.scale);
    label.textContent = length >= 1000 ? `${length / 1000} km` : `${length} m`;
  }

  function chips(p, parent) {
    for (const c of p.top_features) {
      const chip = document.createElement("span");
      const factor = Math.exp(c.contribution);
      chip.className = `chip ${c.contribution >= 0 ? "up" : "down"}`;
      chip.textContent = `${featureLabel(c.feature)} ×${factor.toFixed(2)}`;
      chip.title = `${c.feature}: ${c.contribution >= 0 ? "+" : ""}${c.contribution.toFixed(3)} on the log expected count`;
      parent.append(chip);
    }
  }

  function renderList() {
    const features = state.data.features;
    const max = Math.max(...features.map((f) => f.properties.expected_count), 1e-12);
    ui.listCount.textContent = `${features.length} of ${state.data.hotspots.selection.study_area_cells}`;
    ui.tbody.replaceChildren(...features.map((f) => {
      const p = f.properties;
      const tr = document.createElement("tr");
      tr.dataset.h3 = f.id;
      const cells = ["rank", "where", "num", "drivers"].map((cls) => {
        const td = document.createElement("td");
        td.className = cls;
        tr.append(td);
        return td;
      });
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = p.rank;
      badge.style.background = colour(p.expected_count / max);
      badge.classList.toggle("dark", p.expected_count / max > 0.6);
      cells[0].append(badge);
      whereCell(p, f.id, cells[1]);
      cells[2].textContent = p.expected_count.toFixed(3);
      const why = document.createElement("div"); // a flex box inside the cell: the cell stays a table cell
      why.className = "why";
      cells[3].append(why);
      chips(p, why);
      tr.addEventListener("pointerenter", () => setActive(f.id, "list"));
      tr.addEventListener("pointerleave", () => setActive(null));
      return tr;
    }));
  }

  function areaText(p) {
    if (p.area_name) return p.area_name;
    const loc = p.location;
    return loc && loc.nearest_area ? `near ${loc.nearest_area}` : "unnamed area";
  }

  function whereCell(p, h3, td) {
    const name = document.createElement("strong");
    name.className = "area-name";
    name.textContent = areaText(p);
    const sub = document.createElement("span");
    sub.className = "where-sub";
    const coords = document.createElement("span");
    coords.className = "coords";
    coords.textContent = `${p.centroid.lat.toFixed(5)}, ${p.centroid.lon.toFixed(5)}`;
    const id = document.createElement("span");
    id.className = "mono";
    id.textContent = h3;
    sub.append(coords, " · ", id);
    td.append(name, sub);
    if (p.geo_uri) {
      const link = document.createElement("a");
      link.className = "geo-link";
      link.href = p.geo_uri;
      link.textContent = "Open in map app";
      link.title = `Open ${p.location ? p.location.text : h3} in this device's map app`;
      td.append(link);
    }
  }

  function renderLegend() {
    const max = Math.max(...state.data.features.map((f) => f.properties.expected_count), 0);
    ui.legendBar.style.background = `linear-gradient(to right, ${RAMP.join(", ")})`;
    ui.legendMin.textContent = "0";
    ui.legendMid.textContent = (max / 2).toFixed(3);
    ui.legendMax.textContent = max.toFixed(3);
  }

  // --- hover: the hex, its row and the details ------------------------------------------------------

  function setActive(h3, from) {
    if (state.active === h3) return;
    state.active = h3;
    ui.highlight.replaceChildren();
    for (const row of ui.tbody.querySelectorAll("tr.active")) row.classList.remove("active");
    for (const hex of ui.hexes.querySelectorAll(".hex.active")) hex.classList.remove("active");
    ui.tooltip.hidden = true;
    const feature = h3 && state.byH3.get(h3);
    if (!feature) return;
    const hex = ui.hexes.querySelector(`[data-h3="${CSS.escape(h3)}"]`);
    const row = ui.tbody.querySelector(`tr[data-h3="${CSS.escape(h3)}"]`);
    hex.classList.add("active");
    svg("polygon", { points: hex.getAttribute("points"), class: "hex-outline" }, ui.highlight);
    row.classList.add("active");
    if (from === "map") row.scrollIntoView({ block: "nearest" });
    showTooltip(feature, hex);
  }

  function showTooltip(feature, hex) {
    const p = feature.properties;
    const tip = ui.tooltip;
    tip.replaceChildren();
    const head = document.createElement("div");
    head.className = "tt-head";
    head.textContent = `Rank ${p.rank}`;
    const id = document.createElement("span");
    id.className = "mono";
    id.textContent = feature.id;
    head.append(" · ", id);
    const list = document.createElement("dl");
    const rows = [
      ["Area", areaText(p)],
      ["Location", p.location ? p.location.text : `${p.centroid.lat.toFixed(5)}, ${p.centroid.lon.toFixed(5)}`],
      ["Expected", `${p.expected_count.toFixed(3)} incidents`],
      ["Risk percentile", p.risk_percentile.toFixed(1)],
      ["Cell area", `${p.area_km2.toFixed(3)} km²`],
      ["Ranks 1–" + p.rank + " cover", `${pct(p.cumulative_area_share)} of the area`],
    ];
    for (const [name, value] of rows) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      list.append(dt, dd);
    }
    const why = document.createElement("div");
    why.className = "tt-why";
    why.append("Why: ");
    chips(p, why);
    tip.append(head, list, why);
    tip.hidden = false;
    const box = hex.getBoundingClientRect(), frame = ui.wrap.getBoundingClientRect();
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let left = box.right - frame.left + 12;
    if (left + w > frame.width - 8) left = box.left - frame.left - w - 12;
    const top = Math.min(Math.max(8, box.top - frame.top + box.height / 2 - h / 2), frame.height - h - 8);
    tip.style.left = `${Math.max(8, left)}px`;
    tip.style.top = `${top}px`;
  }

  ui.hexes.addEventListener("pointerover", (event) => {
    const hex = event.target.closest(".hex");
    if (hex) setActive(hex.dataset.h3, "map");
  });
  ui.hexes.addEventListener("pointerleave", () => setActive(null));

  // --- wiring ----------------------------------------------------------------------------------------

  ui.city.addEventListener("change", () => selectCity(ui.city.value));
  for (const el of [ui.shift, ui.category, ui.k]) el.addEventListener("change", loadHotspots);
  $("print").addEventListener("click", () => window.print());
  $("change-key").addEventListener("click", () => askKey(""));
  $("download").addEventListener("click", async () => {
    try {
      const params = selection();  // the briefing PNG numbers at most png_max_k cells
      params.k = String(Math.min(Number(params.k), CONFIG.png_max_k));
      const blob = await api("/hotspots.png", params, "blob");
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      const meta = state.data && state.data.hotspots;
      link.download = `hotspots_${ui.city.value}_${meta ? meta.shift.start.slice(0, 16).replace(/[^0-9T]/g, "") : "next"}.png`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (err) {
      fail(err);
    }
  });
  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    ui.keyOverlay.hidden = true;
    start();
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => state.area && drawMap(), 150);
  });

  if (sessionStorage.getItem(KEY_STORE)) start();
  else askKey("");
})();
