"""The printable briefing map (``/v1/hotspots.png``): one A4-landscape page a planner can pin on a wall.

The selected hexes are coloured by expected count and numbered by rank over the rest of the study area in
light grey, with a colour bar, a scale bar, the shift window in the city's local time, the category, the
model version and the ranked table beside the map. Drawn with matplotlib's object API on the Agg canvas (no
pyplot, so no global state shared between request threads); Web Mercator, like the /map page.
"""

from __future__ import annotations

import io
import re
import threading
from datetime import datetime
from zoneinfo import ZoneInfo

import h3
import numpy as np
import pyarrow as pa
import shapely
from h3ronpy.vector import cells_to_wkb_polygons
from matplotlib import colormaps, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

from serving.schemas import HotspotsResponse

EARTH_RADIUS_M = 6_378_137.0
CMAP = colormaps["YlOrRd"]
AREA_GREY, EDGE_GREY, INK, FLAG_RED = "#e4e6ea", "#ffffff", "#1f2a44", "#a3262a"
PAGE_INCHES = (11.69, 8.27)  # A4 landscape
MAX_TABLE_ROWS = 30
ZOOM_BELOW = 0.5  # zoom to the hotspots when they span less than this share of the study area's width or height
_RENDER_LOCK = threading.Lock()  # figures are independent, but matplotlib does not promise thread safety


def mercator(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Web Mercator metres (EPSG:3857), the projection of slippy-map tiles and of the /map page."""
    lat = np.clip(lat, -85.05112878, 85.05112878)
    return EARTH_RADIUS_M * np.radians(lon), EARTH_RADIUS_M * np.log(np.tan(np.pi / 4 + np.radians(lat) / 2))


def hexagons(cells: np.ndarray) -> list[np.ndarray]:
    """Projected outline of each cell (vectorised through h3ronpy's WKB polygons and shapely)."""
    polygons = shapely.from_wkb(np.asarray(cells_to_wkb_polygons(pa.array(np.asarray(cells, dtype=np.uint64))).to_pylist(),
                                           dtype=object))
    coords, index = shapely.get_coordinates(polygons, return_index=True)
    x, y = mercator(coords[:, 0], coords[:, 1])
    return np.split(np.column_stack([x, y]), np.flatnonzero(np.diff(index)) + 1)


def local_day(moment: datetime) -> str:
    return f"{moment:%a} {moment.day} {moment:%b %Y}"


def shift_window(start: datetime, end: datetime, timezone: str) -> str:
    """'Sat 29 Feb 2020, 22:00 – Sun 1 Mar 06:00 EST' in the city's local time (named even when the times
    were read back from JSON with a bare offset)."""
    zone = ZoneInfo(timezone)
    start, end = start.astimezone(zone), end.astimezone(zone)
    tail = f"{end:%H:%M}" if end.date() == start.date() else f"{end:%a} {end.day} {end:%b} {end:%H:%M}"
    return f"{local_day(start)}, {start:%H:%M} – {tail} {start.tzname() or ''}".rstrip()


def _nice_length(metres: float) -> float:
    """The largest 1-2-5 x 10^n length not above ``metres``."""
    power = 10 ** np.floor(np.log10(metres))
    return float(max(step * power for step in (1, 2, 5) if step * power <= metres))


def _scale_bar(ax, x0: float, x1: float, y0: float, y1: float, lat: float) -> None:
    """A scale bar in true metres (Mercator metres shrink by cos(latitude))."""
    true_per_unit = np.cos(np.radians(lat))
    length = _nice_length((x1 - x0) * 0.22 * true_per_unit)
    bar = length / true_per_unit
    left, base = x0 + 0.03 * (x1 - x0), y0 + 0.035 * (y1 - y0)
    ax.plot([left, left + bar], [base, base], color=INK, lw=2.2, solid_capstyle="butt", zorder=5)
    ax.text(left + bar / 2, base + 0.012 * (y1 - y0), f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m",
            ha="center", va="bottom", fontsize=7.5, color=INK, zorder=5)


FEATURE_LABELS = [  # feature-name pattern -> words a planner reads (the /map page's map.js has the same rules)
    (r"count_prev_shift", "previous shift"),
    (r"count_(\d+)d", r"last \1 days"),
    (r"same_weekday_shift_(\d+)w", r"same weekday+shift \1 wk"),
    (r"same_shift_(\d+)d", r"same shift \1 days"),
    (r"ring1_mean_(\d+)d", r"neighbours \1 days"),
    (r"ring2_mean_(\d+)d", r"2nd ring \1 days"),
    (r"near_repeat_ring1_(\w+)", r"near-repeat nearby \1"),
    (r"near_repeat_(\w+)", r"near-repeat \1"),
    (r"long_run_rate", "long-run rate"),
    (r"cat_(\w+)_(\d+)d", r"\1 \2 days"),
    (r"cell_(lat|lon)", "location"),
]


def feature_label(name: str) -> str:
    for pattern, label in FEATURE_LABELS:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, label, name).replace("_", " ")
    return name.replace("_", " ")


def _extent(polygons: list[np.ndarray]) -> tuple[float, float, float, float]:
    points = np.concatenate(polygons)
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return float(x0), float(x1), float(y0), float(y1)


def _fit(extent: tuple[float, float, float, float], aspect: float, pad: float) -> tuple[float, float, float, float]:
    """The extent padded, then widened in one direction to the axes' width/height ratio (so it fills them)."""
    x0, x1, y0, y1 = extent[0] - pad, extent[1] + pad, extent[2] - pad, extent[3] + pad
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    w, h = max(w, h * aspect), max(h, w / aspect)
    return cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2


def _draw_cells(ax, area_polys, chosen_polys, counts, norm, edge: float) -> PolyCollection:
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.add_collection(PolyCollection(area_polys, facecolors=AREA_GREY, edgecolors=EDGE_GREY, linewidths=0.3 * edge / 0.6))
    selected = PolyCollection(chosen_polys, array=counts, cmap=CMAP, norm=norm, edgecolors=INK, linewidths=edge, zorder=3)
    ax.add_collection(selected)
    return selected


def _overview(ax, area_polys, chosen_polys, counts, norm, whole, window) -> None:
    """The whole study area, small, in a corner of the map, with the zoomed window outlined."""
    inset = ax.inset_axes((0.71, 0.66, 0.29, 0.34))
    _draw_cells(inset, area_polys, chosen_polys, counts, norm, edge=0.15)
    pad = 0.04 * max(whole[1] - whole[0], whole[3] - whole[2])
    inset.set_xlim(whole[0] - pad, whole[1] + pad)
    inset.set_ylim(whole[2] - pad, whole[3] + pad)
    inset.set_axis_on()
    inset.set_xticks([])
    inset.set_yticks([])
    inset.set_facecolor("white")
    for spine in inset.spines.values():
        spine.set_edgecolor("#9aa0aa")
    x0, x1, y0, y1 = window
    inset.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=FLAG_RED, linewidth=1.0, zorder=5))
    inset.set_title("whole study area", fontsize=7, color="#4a5468", pad=2)


def _where(hotspot) -> str:
    """The cell's neighbourhood, 'near X' outside every area, or 'unnamed area' (cut to fit the column)."""
    loc = hotspot.location
    if hotspot.area_name:
        text = hotspot.area_name
    elif loc is not None and loc.nearest_area:
        text = f"near {loc.nearest_area}"
    else:
        text = "unnamed area"
    return text if len(text) <= 25 else text[:24] + "…"


def _drivers(hotspot) -> str:
    """The two largest contributions, with the direction they push the forecast."""
    text = ", ".join(f"{'↑' if c.contribution >= 0 else '↓'}{feature_label(c.feature)}" for c in hotspot.top_features[:2])
    return text if len(text) <= 25 else text[:24] + "…"


def render_briefing(area_cells: np.ndarray, body: HotspotsResponse, dpi: int = 150) -> bytes:
    """PNG bytes of the briefing for the ranked cells in ``body`` over the study area ``area_cells``."""
    with _RENDER_LOCK:
        return _render(area_cells, body, dpi)


def _render(area_cells: np.ndarray, body: HotspotsResponse, dpi: int) -> bytes:
    hotspots, shift, model, sel = body.hotspots, body.shift, body.model, body.selection
    chosen = np.array([h3.str_to_int(h.h3) for h in hotspots], dtype=np.uint64)
    counts = np.array([h.expected_count for h in hotspots], dtype=np.float64)
    fig = Figure(figsize=PAGE_INCHES, facecolor="white")
    FigureCanvasAgg(fig)

    # --- map: the whole study area, or the hotspots' part of it with the whole area in an inset ---------
    box = (0.025, 0.13, 0.46, 0.72)
    ax = fig.add_axes(box)
    area_polys, chosen_polys = hexagons(area_cells), hexagons(chosen)
    norm = Normalize(vmin=0.0, vmax=float(counts.max()) if counts.size and counts.max() > 0 else 1.0)
    selected = _draw_cells(ax, area_polys, chosen_polys, counts, norm, edge=0.6)
    whole, focus = _extent(area_polys), _extent(chosen_polys)
    zoomed = max(focus[1] - focus[0], focus[3] - focus[2]) < ZOOM_BELOW * max(whole[1] - whole[0], whole[3] - whole[2])
    hex_width = 2 * h3.average_hexagon_edge_length(h3.get_resolution(hotspots[0].h3), "m")
    x0, x1, y0, y1 = _fit(focus if zoomed else whole, box[2] * PAGE_INCHES[0] / (box[3] * PAGE_INCHES[1]),
                          pad=max(2.5 * hex_width, 0.04 * (focus[1] - focus[0])) if zoomed else 0.03 * (whole[1] - whole[0]))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    lat = float(np.degrees(2 * np.arctan(np.exp((y0 + y1) / 2 / EARTH_RADIUS_M)) - np.pi / 2))  # of the map's centre
    # rank numbers sized to the hexes as drawn: the axes' width in points over the cells across it
    fontsize = float(np.clip(0.5 * hex_width / np.cos(np.radians(lat)) / (x1 - x0) * box[2] * PAGE_INCHES[0] * 72, 4.0, 9.0))
    cx, cy = mercator(np.array([h.centroid.lon for h in hotspots]), np.array([h.centroid.lat for h in hotspots]))
    halo = [patheffects.withStroke(linewidth=1.6, foreground="white")]
    for rank, x, y in zip(range(1, len(hotspots) + 1), cx, cy):
        ax.text(x, y, str(rank), ha="center", va="center", fontsize=fontsize, fontweight="bold", color=INK, zorder=4,
                path_effects=halo, clip_on=True)
    _scale_bar(ax, x0, x1, y0, y1, lat)
    if zoomed:
        _overview(ax, area_polys, chosen_polys, counts, norm, whole, (x0, x1, y0, y1))

    cax = fig.add_axes((0.1, 0.085, 0.35, 0.018))
    bar = fig.colorbar(selected, cax=cax, orientation="horizontal")
    bar.set_label("expected incidents in the cell during the shift", fontsize=8, color=INK)
    bar.ax.tick_params(labelsize=7.5, colors=INK)
    bar.outline.set_edgecolor("#9aa0aa")

    # --- titles ----------------------------------------------------------------------------------
    category = "all categories" if body.category == "all" else body.category.replace("_", " ")
    fig.text(0.025, 0.955, f"{body.city} · top {sel.n_cells} hotspot cells · {category}", fontsize=16,
             fontweight="bold", color=INK)
    fig.text(0.025, 0.918, f"Shift {shift_window(shift.start, shift.end, shift.timezone)} ({shift.timezone})",
             fontsize=11, color=INK)
    fig.text(0.025, 0.888,
             f"Model {model.name} version {model.version} ({model.source.replace('_', ' ')}) · flagged "
             f"{sel.area_km2:.2f} km² = {sel.area_share:.1%} of the {sel.study_area_km2:.1f} km² study area, "
             f"{sel.expected_share:.1%} of its expected incidents", fontsize=8.5, color="#4a5468")
    if shift.after_data:
        fig.text(0.025, 0.862, "Forecast for the first shift after the data ends (data up to "
                               f"{local_day(body.data_end)}, {body.data_end:%H:%M}); "
                               "update the panel to forecast the real next shift.",
                 fontsize=8.5, color=FLAG_RED, fontweight="bold")

    # --- ranked table ----------------------------------------------------------------------------
    tax = fig.add_axes((0.505, 0.06, 0.485, 0.74))
    tax.set_axis_off()
    shown = hotspots[:MAX_TABLE_ROWS]
    rows = [[str(h.rank), _where(h), f"{h.centroid.lat:.4f}, {h.centroid.lon:.4f}", h.h3, f"{h.expected_count:.3f}",
             f"{h.risk_percentile:.1f}", _drivers(h)] for h in shown]
    if len(hotspots) > len(shown):
        more = len(hotspots) - len(shown)
        rows.append(["…", f"+{more} more cell{'s' if more > 1 else ''}", "", "", "", "", "see /v1/hotspots"])
    header = ["#", "area", "lat, lon (centre)", "H3 cell", "exp.", "pctl", "main drivers"]
    height = min(1.0, 0.032 * (len(rows) + 1))
    table = tax.table(cellText=rows, colLabels=header, colWidths=[0.035, 0.225, 0.185, 0.17, 0.07, 0.055, 0.26],
                      cellLoc="left",
                      loc="upper left", bbox=Bbox.from_bounds(0.0, 1.0 - height, 1.0, height))
    table.auto_set_font_size(False)
    table.set_fontsize(6.5 if len(rows) <= 20 else 5.8)
    for (row, col), cell in table.get_celld().items():
        cell.set_edgecolor("#d5d9e0")
        cell.set_linewidth(0.4)
        if row == 0:
            cell.set_facecolor(INK)
            cell.get_text().set_color("white")
            cell.get_text().set_fontweight("bold")
        elif col == 0 and row <= len(shown):
            shade = float(norm(counts[row - 1]))
            cell.set_facecolor(CMAP(shade))
            cell.get_text().set_fontweight("bold")
            cell.get_text().set_color("white" if shade > 0.6 else INK)
        elif row % 2 == 0:
            cell.set_facecolor("#f5f6f8")
    tax.text(0.0, 1.035, "Ranked cells", fontsize=10, fontweight="bold", color=INK, transform=tax.transAxes)
    tax.text(0.0, 1.01, "exp.: expected incidents · pctl: risk percentile · drivers: largest LightGBM "
                        "contributions (↑ raises, ↓ lowers)",
             fontsize=7, color="#4a5468", transform=tax.transAxes)

    fig.text(0.025, 0.022, f"Place-based forecast per H3 cell (resolution {h3.get_resolution(hotspots[0].h3)}); "
                           "no incident records. Grey: the rest of the study area. "
                           f"Data up to {body.data_end:%Y-%m-%d %H:%M} local time.",
             fontsize=7, color="#6b7385")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()
