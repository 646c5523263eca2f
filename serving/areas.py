"""Named areas (neighbourhoods, community areas) of a city's cells: what a planner reads instead of an H3 id, on
the map, in the ranked list, in the API and on the briefing PNG.

Where the names come from (the first that covers the city wins):

1. the boundary file the operator gives (setting ``area_layer``, ``hotspots serve --areas FILE``): any polygon
   layer geopandas reads (GeoJSON, GeoPackage, shapefile), names from ``area_name_column`` or a guessed column;
2. the city's shipped layer under the shared-data setting (``HOTSPOTS_SHARED_DATA``: Toronto neighbourhoods,
   Chicago community areas), the same presets the bias audit joins;
3. for ``toronto-mci``, the ``Neighbourhood`` column of the installed wheel's incidents: each cell takes the
   neighbourhood most of its incidents carry (point majority; a cell without incidents takes its nearest named
   cell's), and an area's outline is the union of its cells;
4. nothing: the map still works and every cell is an "unnamed area".

A cell is *in* the polygon that contains its centre; its *nearest* area is that one or, for a cell outside every
polygon, the closest polygon (with the distance). Computed once per city and panel (about a second).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h3
import numpy as np
import polars as pl

from features.grid import StudyArea, points_to_cells
from features.settings import Settings
from forecasting.area_join import AreaJoinError, read_layer
from forecasting.area_presets import PRESETS, SOURCE_PRESETS
from serving.caches import ComputeOnceCache
from serving.models_store import CityState

log = logging.getLogger("hotspots.serving")

UNNAMED = "unnamed area"
AreaSource = Literal["file", "shared_layer", "toronto_wheel", "none"]
NAME_GUESSES = ("name", "area_name", "neighbourhood", "neighborhood", "hood", "community", "district", "label")
SIMPLIFY_DEGREES = 0.0002  # about 20 m: outlines stay exact at street scale and small in the response


class AreaLayerError(ValueError):
    """A boundary file that cannot name areas; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class AreaOutline:
    name: str
    polygons: list[list[list[tuple[float, float]]]]  # GeoJSON MultiPolygon coordinates, [lon, lat]
    label_lat: float
    label_lon: float
    n_cells: int  # study-area cells whose centre lies in it


@dataclass(frozen=True)
class CellAreas:
    """Per study-area cell (panel row order): the area containing its centre and the nearest area."""

    source: AreaSource
    description: str
    inside: list[str | None]
    nearest: list[str | None]
    distance_km: np.ndarray
    areas: list[AreaOutline] = field(default_factory=list)
    message: str | None = None  # why a configured layer was not used
    locations: list[Any] = field(default_factory=list)  # per cell: serving.schemas.CellLocation (with_locations)
    geo_uris: list[str] = field(default_factory=list)  # per cell

    @classmethod
    def unnamed(cls, n_cells: int, message: str | None = None) -> CellAreas:
        return cls("none", "no area layer: cells are unnamed (set area_layer or HOTSPOTS_SHARED_DATA)",
                   [None] * n_cells, [None] * n_cells, np.zeros(n_cells), [], message)

    def location_text(self, i: int) -> str:
        """'in Moss Park', 'near Moss Park (0.4 km)' or 'unnamed area'."""
        if self.inside[i]:
            return f"in {self.inside[i]}"
        if self.nearest[i]:
            return f"near {self.nearest[i]} ({self.distance_km[i]:.1f} km)"
        return UNNAMED


def geo_uri(lat: float, lon: float) -> str:
    """RFC 5870 geo: URI of a point: phones and desktop map apps open it."""
    return f"geo:{lat:.6f},{lon:.6f}"


def _display(name: object) -> str | None:
    text = str(name).strip() if name is not None else ""
    if not text or text.lower() in ("nan", "none"):
        return None
    return text.title() if text.isupper() else text  # 'NEAR NORTH SIDE' -> 'Near North Side'


# --- polygon layers ---------------------------------------------------------------------------------


def name_column(frame, wanted: str | None, path: Path) -> str:
    columns = [str(c) for c in frame.columns if c != frame.geometry.name]
    if wanted:
        if wanted not in columns:
            raise AreaLayerError(f"{path}: no column {wanted!r} for area names; columns: {', '.join(columns)} "
                                 f"(set area_name_column to one of them)")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for guess in NAME_GUESSES:
        if guess in lowered:
            return lowered[guess]
    text = [c for c in columns if frame[c].dtype == object]
    if not text:
        raise AreaLayerError(f"{path}: no text column to name the areas (columns: {', '.join(columns)}); "
                             f"set area_name_column")
    return text[0]


def read_areas(path: Path, layer: str | None, column: str | None):
    """The layer's polygons in WGS84 with one ``name`` column; AreaLayerError (one line) when it cannot be."""
    try:
        frame = read_layer(path, layer)
    except AreaJoinError as exc:
        raise AreaLayerError(f"{exc} (setting area_layer / --areas)") from None
    if frame.empty:
        raise AreaLayerError(f"{path}: the layer has no features")
    if frame.crs is None:
        frame = frame.set_crs(4326)
    elif frame.crs.to_epsg() != 4326:
        frame = frame.to_crs(4326)
    frame = frame[frame.geometry.notna() & frame.geom_type.isin(["Polygon", "MultiPolygon"])]
    if frame.empty:
        raise AreaLayerError(f"{path}: no polygons in the layer (areas need polygon outlines)")
    chosen = name_column(frame, column, path)
    names = frame[chosen].map(_display)
    return frame.assign(name=names)[names.notna()][["name", "geometry"]].reset_index(drop=True)


def _coordinates(geometry) -> list[list[list[tuple[float, float]]]]:
    parts = list(geometry.geoms) if geometry.geom_type == "MultiPolygon" else [geometry]
    return [[[(round(x, 6), round(y, 6)) for x, y in ring.coords] for ring in (p.exterior, *p.interiors)]
            for p in parts if not p.is_empty]


def polygon_areas(frame, study_area: StudyArea, source: AreaSource, description: str) -> CellAreas | None:
    """Cells named by the polygons containing their centres; None when no centre lies in any polygon (the
    layer is another city's)."""
    import geopandas as gpd
    import shapely

    lat, lon = study_area.centroids
    points = gpd.GeoDataFrame({"cell": np.arange(lat.size)}, geometry=gpd.points_from_xy(lon, lat), crs=4326)
    inside_join = gpd.sjoin(points, frame, predicate="within", how="inner").drop_duplicates("cell")
    if inside_join.empty:
        return None
    inside: list[str | None] = [None] * lat.size
    for cell, name in zip(inside_join["cell"].tolist(), inside_join["name"].tolist()):
        inside[cell] = name
    nearest, distance = list(inside), np.zeros(lat.size)
    outside = np.flatnonzero([name is None for name in inside])
    if outside.size:
        metric = frame.estimate_utm_crs()
        near = gpd.sjoin_nearest(points.iloc[outside].to_crs(metric), frame.to_crs(metric), how="inner",
                                 distance_col="metres").drop_duplicates("cell")
        for cell, name, metres in zip(near["cell"].tolist(), near["name"].tolist(), near["metres"].tolist()):
            nearest[cell], distance[cell] = name, metres / 1000.0
    west, south, east, north = float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())
    pad = 0.01
    frame_box = shapely.box(west - pad, south - pad, east + pad, north + pad)
    counts = pl.Series([n for n in inside if n]).value_counts().rows() if any(inside) else []
    n_cells = dict(counts)
    outlines = []
    for name, geometry in zip(frame["name"].tolist(), frame.geometry):
        clipped = geometry.intersection(frame_box).simplify(SIMPLIFY_DEGREES, preserve_topology=True)
        if clipped.is_empty or clipped.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        point = clipped.representative_point()
        outlines.append(AreaOutline(name, _coordinates(clipped), round(point.y, 6), round(point.x, 6),
                                    int(n_cells.get(name, 0))))
    return CellAreas(source, description, inside, nearest, distance, outlines)


# --- Toronto: neighbourhoods carried by the wheel's incidents ---------------------------------------


def wheel_areas(study_area: StudyArea) -> CellAreas | None:
    """Point-majority neighbourhood per cell from the installed Toronto wheel; None when it is not installed."""
    from features.sources.toronto import wheel_files

    try:
        files = wheel_files()
    except FileNotFoundError:
        return None
    points = pl.concat([pl.read_csv(f, columns=["Lat", "Long", "Neighbourhood"], schema_overrides={
        "Lat": pl.Float64, "Long": pl.Float64, "Neighbourhood": pl.String}) for f in files])
    points = points.drop_nulls().filter(pl.col("Lat").is_between(-90, 90) & pl.col("Long").is_between(-180, 180)
                                        & (pl.col("Lat") != 0))
    index = study_area.index_of(points_to_cells(points["Lat"].to_numpy(), points["Long"].to_numpy(),
                                                study_area.resolution))
    votes = (points.with_columns(cell=pl.Series(index), name=pl.col("Neighbourhood").str.strip_chars())
             .filter(pl.col("cell") >= 0).group_by("cell", "name").len()
             .sort(["cell", "len", "name"], descending=[False, True, False]).unique("cell", keep="first"))
    if votes.is_empty():
        return None
    n = len(study_area)
    named = np.full(n, -1, dtype=np.int64)
    names = sorted(set(votes["name"].to_list()))
    code = {name: i for i, name in enumerate(names)}
    named[votes["cell"].to_numpy()] = [code[x] for x in votes["name"].to_list()]
    lat, lon = study_area.centroids
    inside = [names[c] if c >= 0 else None for c in named.tolist()]
    nearest, distance = list(inside), np.zeros(n)
    known = np.flatnonzero(named >= 0)
    scale = np.cos(np.radians(float(lat.mean())))
    for i in np.flatnonzero(named < 0).tolist():  # few cells: the study area comes from the same incidents
        d = np.hypot(lat[known] - lat[i], (lon[known] - lon[i]) * scale) * 111.2
        j = known[int(np.argmin(d))]
        nearest[i], distance[i] = names[named[j]], float(d.min())
    outlines = []
    for c, name in enumerate(names):
        members = np.flatnonzero(named == c)
        geo = h3.cells_to_geo([study_area.h3_ids[i] for i in members.tolist()])
        polygons = geo["coordinates"] if geo["type"] == "MultiPolygon" else [geo["coordinates"]]
        mid_lat, mid_lon = lat[members].mean(), lon[members].mean()
        at = members[int(np.argmin(np.hypot(lat[members] - mid_lat, lon[members] - mid_lon)))]
        outlines.append(AreaOutline(name, [[[(round(x, 6), round(y, 6)) for x, y in ring] for ring in polygon]
                                           for polygon in polygons],
                                    round(float(lat[at]), 6), round(float(lon[at]), 6), int(members.size)))
    return CellAreas("toronto_wheel", "Toronto neighbourhoods named by the installed MCI wheel's incidents: each "
                     "cell takes the neighbourhood most of its incidents carry; outlines are unions of cells",
                     inside, nearest, distance, outlines)


# --- choosing the source ----------------------------------------------------------------------------


def configured_layer(settings: Settings):
    """The operator's boundary file as a named-polygon frame, None when none is set (AreaLayerError if bad)."""
    if settings.area_layer is None:
        return None
    path = Path(settings.area_layer)
    return read_areas(path, settings.area_layer_name, settings.area_name_column)


def _shared_layer(city: str, settings: Settings):
    preset = PRESETS.get(SOURCE_PRESETS.get(city, ""))
    if preset is None or preset.label is None:
        return None, None
    base = Path(settings.shared_data_dir) if settings.shared_data_dir else None
    path = preset.resolve(preset.path, base)
    if not path.is_file():
        return None, None
    return read_areas(path, preset.layer, preset.label), f"{preset.description.split(':')[0]} ({path.name})"


def city_areas(settings: Settings, city: str, study_area: StudyArea) -> CellAreas:
    """The first source that names the city's cells (module docstring); never raises: a source that fails is
    logged in one line and the next one is used."""
    from shapely.errors import ShapelyError

    failures = (AreaLayerError, OSError, ValueError, ShapelyError, pl.exceptions.PolarsError)
    message = None
    try:
        frame = configured_layer(settings)
        if frame is not None:
            found = polygon_areas(frame, study_area, "file", f"areas of {Path(str(settings.area_layer)).name}")
            if found is not None:
                return found
            message = f"{settings.area_layer} has no polygon over {city}'s cells"
    except failures as exc:
        message = str(exc)
        log.warning("area names of %s: %s", city, message)
    try:
        frame, description = _shared_layer(city, settings)
        if frame is not None:
            found = polygon_areas(frame, study_area, "shared_layer", description or "")
            if found is not None:
                return CellAreas(**{**found.__dict__, "message": message})
    except failures as exc:
        log.warning("area names of %s from the shared layer: %s", city, exc)
    if city == "toronto-mci":
        try:
            found = wheel_areas(study_area)
        except failures as exc:
            log.warning("area names of %s from the Toronto wheel: %s", city, exc)
            found = None
        if found is not None:
            return CellAreas(**{**found.__dict__, "message": message})
    return CellAreas.unnamed(len(study_area), message)


def with_locations(areas: CellAreas, study_area: StudyArea) -> CellAreas:
    """``areas`` with every cell's location and geo: URI made once: a city-wide ranking then only indexes them."""
    from serving.schemas import CellLocation

    lat, lon = study_area.centroids
    locations, uris = [], []
    for i, (y, x) in enumerate(zip(lat.tolist(), lon.tolist())):
        locations.append(CellLocation.model_construct(
            lat=y, lon=x, nearest_area=areas.nearest[i], distance_km=round(float(areas.distance_km[i]), 3),
            text=f"{y:.5f}, {x:.5f} · {areas.location_text(i)}"))
        uris.append(geo_uri(y, x))
    return CellAreas(**{**areas.__dict__, "locations": locations, "geo_uris": uris})


class AreaNames:
    """Each city's CellAreas, computed once per panel (a new panel gives a new key) and kept per process."""

    def __init__(self, settings: Settings, size: int = 16):
        self.settings = settings
        self._cache: ComputeOnceCache[CellAreas] = ComputeOnceCache(size)

    def peek(self, city: str, panel_token: str) -> CellAreas | None:
        """The city's area names when already computed (a lookup: safe on the event loop), else None."""
        return self._cache.peek((city, panel_token))

    def get(self, city: str, panel_token: str, study_area: StudyArea) -> CellAreas:
        return self._cache.get_or_compute((city, panel_token),
                                          lambda: with_locations(city_areas(self.settings, city, study_area),
                                                                 study_area))[0]

    def warm(self, states: Mapping[str, CityState]) -> None:
        """Name every city's cells now (a background thread at start-up), so no first request waits seconds."""
        for city, state in sorted(states.items()):
            if state.panel is not None:
                self.get(city, state.panel_token, state.panel.study_area)
