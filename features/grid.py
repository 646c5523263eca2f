"""H3 grid: bulk point binning and the study area (the set of cells forecasts cover, empty ones included).

Default resolution 9 (mean cell area ~0.105 km^2, edge ~174 m): about a city block group, the scale of
PredPol's 150 m boxes and of a patrol car's beat within a shift. Resolution 8 (~0.74 km^2) suits sparse data.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h3
import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
import shapely
from h3ronpy.vector import cells_to_coordinates, cells_to_wkb_polygons, coordinates_to_cells


def points_to_cells(lat: np.ndarray, lon: np.ndarray, resolution: int) -> np.ndarray:
    """H3 cell (uint64) of every point, in bulk (Rust, no Python loop)."""
    cells = coordinates_to_cells(np.ascontiguousarray(lat, dtype=np.float64), np.ascontiguousarray(lon, dtype=np.float64),
                                 resolution)
    return np.asarray(pa.array(cells).to_numpy(zero_copy_only=False), dtype=np.uint64)


def read_boundary(path: str | Path, layer: str | None = None):
    """The union of a GeoJSON/GeoPackage layer's polygons, in WGS84."""
    import geopandas as gpd

    frame = gpd.read_file(path, layer=layer)
    if frame.crs is not None and frame.crs.to_epsg() != 4326:
        frame = frame.to_crs(4326)
    return frame.union_all()


def _polyfill(geometry, resolution: int) -> np.ndarray:
    """Every cell that overlaps the (multi)polygon, so no edge incident falls outside the grid."""
    shape = h3.geo_to_h3shape(shapely.geometry.mapping(geometry))
    cells = h3.h3shape_to_cells_experimental(shape, resolution, contain="overlap")
    return np.array([h3.str_to_int(c) for c in cells], dtype=np.uint64)


@dataclass
class StudyArea:
    """A sorted array of H3 cells at one resolution. Row i of every panel and matrix is ``cells[i]``."""

    cells: np.ndarray
    resolution: int
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cells = np.unique(np.asarray(self.cells, dtype=np.uint64))
        if self.cells.size == 0:
            raise ValueError("a study area needs at least one cell")

    def __len__(self) -> int:
        return int(self.cells.size)

    # --- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_boundary(cls, geometry, resolution: int, name: str = "") -> StudyArea:
        """From a user-supplied WGS84 (multi)polygon, e.g. a city boundary read with geopandas."""
        return cls(_polyfill(geometry, resolution), resolution, name, {"method": "boundary"})

    @classmethod
    def from_file(cls, path: str | Path, resolution: int, layer: str | None = None, name: str = "") -> StudyArea:
        return cls.from_boundary(read_boundary(path, layer), resolution, name or Path(path).stem)

    @classmethod
    def from_points(
        cls, lat: np.ndarray, lon: np.ndarray, resolution: int, *, buffer_m: float | None = None,
        concave_ratio: float = 0.2, name: str = "",
    ) -> StudyArea:
        """Derived from the data: a concave hull of the occupied cells, buffered by one cell edge and filled,
        so cells with no recorded crime inside the city are part of the area."""
        return cls.from_cells(points_to_cells(lat, lon, resolution), resolution, buffer_m=buffer_m,
                              concave_ratio=concave_ratio, name=name)

    @classmethod
    def from_cells(
        cls, cells: np.ndarray, resolution: int, *, buffer_m: float | None = None, concave_ratio: float = 0.2,
        name: str = "",
    ) -> StudyArea:
        """As :meth:`from_points`, from the incidents' cells (when they are already binned)."""
        import geopandas as gpd

        occupied = pl.Series(np.asarray(cells, dtype=np.uint64)).unique().to_numpy()
        coords = cells_to_coordinates(pa.array(occupied))
        pts = gpd.GeoSeries(gpd.points_from_xy(np.asarray(coords["lng"]), np.asarray(coords["lat"])), crs=4326)
        local = pts.to_crs(pts.estimate_utm_crs())
        hull = shapely.concave_hull(shapely.MultiPoint(list(local.geometry)), ratio=concave_ratio)
        buffer_m = h3.average_hexagon_edge_length(resolution, "m") if buffer_m is None else buffer_m
        area = gpd.GeoSeries([hull.buffer(buffer_m)], crs=local.crs).to_crs(4326).iloc[0]
        cells = np.union1d(_polyfill(area, resolution), occupied)
        return cls(cells, resolution, name, {"method": "concave_hull", "ratio": concave_ratio, "buffer_m": buffer_m})

    # --- lookups ---------------------------------------------------------------------------------
    def index_of(self, cells: np.ndarray) -> np.ndarray:
        """Row index of each cell, -1 where the cell is outside the study area."""
        cells = np.asarray(cells, dtype=np.uint64)
        pos = np.searchsorted(self.cells, cells)
        pos_clipped = np.minimum(pos, self.cells.size - 1)
        return np.where(self.cells[pos_clipped] == cells, pos_clipped, -1).astype(np.int64)

    @cached_property
    def h3_ids(self) -> list[str]:
        return [h3.int_to_str(int(c)) for c in self.cells]

    @cached_property
    def areas_km2(self) -> np.ndarray:
        return np.array([h3.cell_area(c, "km^2") for c in self.h3_ids])

    @cached_property
    def centroids(self) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of each cell's centre."""
        coords = cells_to_coordinates(pa.array(self.cells))
        return np.asarray(coords["lat"]), np.asarray(coords["lng"])

    def ring_adjacency(self, k: int) -> sp.csr_matrix:
        """Sparse 0/1 matrix A with A[i, j] = 1 when cell j is exactly k steps from cell i (within the area)."""
        rows, cols = [], []
        for i, cell in enumerate(self.h3_ids):
            ring = self.index_of(np.array([h3.str_to_int(c) for c in h3.grid_ring(cell, k)], dtype=np.uint64))
            ring = ring[ring >= 0]
            rows.append(np.full(ring.size, i))
            cols.append(ring)
        r, c = np.concatenate(rows), np.concatenate(cols)
        return sp.csr_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(len(self), len(self)))

    @cached_property
    def ring1(self) -> sp.csr_matrix:
        return self.ring_adjacency(1)

    @cached_property
    def ring2(self) -> sp.csr_matrix:
        return self.ring_adjacency(2)

    def to_geodataframe(self, **columns):
        import geopandas as gpd

        polygons = shapely.from_wkb(np.asarray(cells_to_wkb_polygons(pa.array(self.cells)).to_pylist(), dtype=object))
        return gpd.GeoDataFrame({"h3": self.h3_ids, **columns}, geometry=polygons, crs=4326)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from features.storelock import atomic_write_bytes

        path = Path(path)
        cells = io.BytesIO()
        np.save(cells, self.cells)
        atomic_write_bytes(cells.getvalue(), path.with_suffix(".npy"))
        meta = json.dumps({"resolution": self.resolution, "name": self.name, "meta": self.meta})
        atomic_write_bytes(meta.encode(), path.with_suffix(".json"))

    @classmethod
    def load(cls, path: str | Path) -> StudyArea:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(np.load(path.with_suffix(".npy")), meta["resolution"], meta["name"], meta["meta"])
