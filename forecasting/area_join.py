"""Census-style area layers joined to H3 cells by areal weighting (tobler), for the bias audit.

A layer is polygons (community areas, neighbourhoods, tracts) with population counts by group and, optionally,
a rate (hardship index, low-income rate). Counts are *extensive*: a cell receives each polygon's count in
proportion to the share of the polygon's area it covers, so the cells' totals add up to the layer's total where
the cells cover the layer. Rates are *intensive*: a cell receives the area-weighted mean of the polygons it
overlaps. Both assume people are spread evenly inside a polygon - the usual areal-weighting assumption, and
the main source of error at resolution 9 where a cell is far smaller than a community area.

The overlay runs in a Lambert azimuthal *equal-area* projection centred on the layer, so area shares are
exact shares of ground area (UTM is conformal, not equal-area: its area error is small but not zero).
The geometry is tobler's (``tobler.area_weighted.area_interpolate``); nothing here intersects polygons by hand.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
from pyproj import CRS

from features.grid import StudyArea

TOTAL = "total"
_AREA = "__polygon_area_m2__"


class AreaJoinError(ValueError):
    """Bad layer or column specification; the message names what is wrong."""


# --- reading ---------------------------------------------------------------------------------------
def read_layer(path: str | Path, layer: str | None = None, *, table: str | Path | pd.DataFrame | None = None,
               key: str | None = None, table_key: str | None = None):
    """A polygon layer, optionally with an attribute table joined on an id column.

    The table's columns are added where the layer lacks them (the layer's own columns win on a name clash);
    every layer row must find its table row, so a mistyped key cannot silently drop areas."""
    import geopandas as gpd

    path = Path(path)
    if not path.is_file():
        raise AreaJoinError(f"area layer file not found: {path}")
    try:
        frame = gpd.read_file(path, layer=layer)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types; name the layer in one message
        layers = ", ".join(gpd.list_layers(path)["name"]) if path.suffix.lower() == ".gpkg" else "?"
        raise AreaJoinError(f"cannot read layer {layer!r} of {path} ({exc}); layers: {layers}") from exc
    if table is None:
        return frame
    return join_table(frame, table, key=key, table_key=table_key)


def join_table(frame, table: str | Path | pd.DataFrame, *, key: str | None, table_key: str | None = None):
    """Left-join an attribute table (CSV/Parquet path or DataFrame) onto the layer by ``key``."""
    if key is None:
        raise AreaJoinError("a table needs a key: the id column shared by the layer and the table")
    if not isinstance(table, pd.DataFrame):
        tpath = Path(table)
        if not tpath.is_file():
            raise AreaJoinError(f"attribute table not found: {tpath}")
        table = pd.read_parquet(tpath) if tpath.suffix.lower() == ".parquet" else pd.read_csv(tpath)
    table_key = table_key or key
    if key not in frame.columns:
        raise AreaJoinError(f"key column {key!r} is not in the layer (columns: {sorted(map(str, frame.columns))})")
    if table_key not in table.columns:
        raise AreaJoinError(f"key column {table_key!r} is not in the table (columns: {sorted(map(str, table.columns))})")
    if table[table_key].duplicated().any():
        repeats = table[table_key][table[table_key].duplicated()].tolist()[:5]
        raise AreaJoinError(f"the table's key {table_key!r} repeats: {repeats}")
    extra = [c for c in table.columns if c not in frame.columns and c != table_key]
    right = table[[table_key, *extra]].rename(columns={table_key: key})
    if right[key].dtype != frame[key].dtype:
        right[key] = right[key].astype(frame[key].dtype)
    joined = frame.merge(right, on=key, how="left", validate="many_to_one", indicator=True)
    missing = joined.loc[joined["_merge"] != "both", key].tolist()
    if missing:
        raise AreaJoinError(f"{len(missing)} layer rows have no table row for {key!r}: {missing[:10]}")
    return joined.drop(columns="_merge")


# --- column expressions ----------------------------------------------------------------------------
def _names_in(expression: str) -> list[str]:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise AreaJoinError(f"cannot parse the column expression {expression!r}: {exc.msg}") from exc
    return sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name)})


def evaluate_columns(frame: pd.DataFrame, columns: Mapping[str, str], what: str = "group") -> pd.DataFrame:
    """Each output column from a layer column name or an arithmetic expression of columns
    (``"vismin_denominator - vismin_total"``); all missing columns are named in one error."""
    missing = sorted({
        name for expr in columns.values() if expr not in frame.columns for name in _names_in(expr)
        if name not in frame.columns
    })
    if missing:
        raise AreaJoinError(
            f"{what} column(s) missing from the layer: {missing}; available: {sorted(map(str, frame.columns))}"
        )
    out = {}
    for name, expr in columns.items():
        values = frame[expr] if expr in frame.columns else pd.DataFrame(frame).eval(expr)
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            raise AreaJoinError(f"{what} column {name!r} ({expr!r}) is not numeric (dtype {values.dtype})")
        values = np.asarray(values, dtype=np.float64)
        if np.isnan(values).any():
            raise AreaJoinError(f"{what} column {name!r} ({expr!r}) has {int(np.isnan(values).sum())} missing values")
        out[name] = values
    return pd.DataFrame(out, index=frame.index)


# --- projection ------------------------------------------------------------------------------------
def equal_area_crs(frame) -> CRS:
    """Lambert azimuthal equal-area projection centred on the layer (metres)."""
    centre = frame.to_crs(4326).union_all().centroid
    return CRS.from_proj4(f"+proj=laea +lat_0={centre.y:.6f} +lon_0={centre.x:.6f} +datum=WGS84 +units=m +no_defs")


# --- the join --------------------------------------------------------------------------------------
@dataclass
class AreaJoin:
    """Group populations and rates per study-area cell, row i = ``h3_ids[i]``."""

    h3_ids: list[str]
    counts: pd.DataFrame  # (n_cells, groups + total) residents per cell, areal-weighted
    rates: pd.DataFrame  # (n_cells, intensive variables) area-weighted means; NaN outside the layer
    covered: np.ndarray  # (n_cells,) share of each cell's area inside the layer
    layer_totals: dict[str, float]
    area_coverage: float  # share of the layer's area inside the study area
    crs: str
    meta: dict = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return [c for c in self.counts.columns if c != TOTAL]

    @property
    def cell_totals(self) -> dict[str, float]:
        return {c: float(self.counts[c].sum()) for c in self.counts.columns}

    @property
    def coverage(self) -> dict[str, float]:
        """Share of each layer total that falls in the study area (1.0 when the cells cover the layer)."""
        return {c: (self.cell_totals[c] / t if t > 0 else float("nan")) for c, t in self.layer_totals.items()}

    def frame(self) -> pl.DataFrame:
        """Cells x (groups, total, rates, covered share) as polars, aligned to ``StudyArea.h3_ids``."""
        return pl.DataFrame({"h3": self.h3_ids, **{c: self.counts[c].to_numpy() for c in self.counts.columns},
                             **{c: self.rates[c].to_numpy() for c in self.rates.columns}, "covered": self.covered})

    def quantiles(self, variable: str, n: int = 5) -> np.ndarray:
        """Population-weighted quantile (1..n) of each cell by ``variable``; 0 outside the layer."""
        if variable not in self.rates.columns:
            raise AreaJoinError(f"{variable!r} was not joined as an intensive variable (have {list(self.rates.columns)})")
        return population_quantiles(self.rates[variable].to_numpy(), self.counts[TOTAL].to_numpy(), n)

    def majority(self, groups: Sequence[str] | None = None) -> np.ndarray:
        """Each cell's largest group among ``groups`` (mutually exclusive ones), '' where nobody lives."""
        groups = list(groups or self.groups)
        values = self.counts[groups].to_numpy()
        labels = np.asarray(groups, dtype=object)[values.argmax(axis=1)]
        return np.where(values.sum(axis=1) > 0, labels, "")

    def summary(self) -> dict:
        return {"crs": self.crs, "n_cells": len(self.h3_ids), "layer_totals": self.layer_totals,
                "cell_totals": self.cell_totals, "coverage": self.coverage, "area_coverage": self.area_coverage,
                "cells_outside_layer": int((self.covered == 0).sum()), **self.meta}


def significant(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """Round to ``digits`` significant digits. tobler's area tables are float32, so a cell inside one area gets
    its value times 0.99999994; rounding restores the exact value and keeps that area's cells tied."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(values)))
    inverse = np.where(np.isfinite(exponent), 10.0 ** (digits - 1 - exponent), 1.0)  # exact power of ten
    return np.round(values * inverse) / inverse


def population_quantiles(values: np.ndarray, weights: np.ndarray, n: int = 5) -> np.ndarray:
    """Quantile labels 1..n such that each holds about 1/n of the total weight (population); cells with equal
    values stay together (a community area's cells are never split), NaN values get 0."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(values)
    labels = np.zeros(values.size, dtype=np.int64)
    if not ok.any():
        return labels
    uniq, inverse = np.unique(values[ok], return_inverse=True)
    w = np.bincount(inverse, weights=weights[ok], minlength=uniq.size)
    total = w.sum()
    if total <= 0:
        raise AreaJoinError("no population in the cells: cannot form population-weighted quantiles")
    midpoint = (np.cumsum(w) - w / 2) / total
    labels[ok] = (np.minimum(np.floor(midpoint * n), n - 1) + 1).astype(np.int64)[inverse]
    return labels


def join_to_cells(
    layer,
    study_area: StudyArea,
    groups: Mapping[str, str] | Sequence[str],
    *,
    total: str | None = None,
    intensive: Mapping[str, str] | Sequence[str] = (),
    crs: CRS | str | None = None,
    conservation_tolerance: float = 1e-3,
) -> AreaJoin:
    """Areal-weighted group counts (extensive) and rates (intensive) for every cell of ``study_area``.

    ``groups`` / ``intensive``: output name -> layer column or expression (a list means the names are the
    columns). ``total`` defaults to the sum of the groups. Where the cells cover the whole layer the cell
    totals must equal the layer totals within ``conservation_tolerance``; otherwise ``coverage`` says how
    much of each total lies in the study area."""
    import geopandas as gpd
    from tobler.area_weighted import area_interpolate

    if not isinstance(layer, gpd.GeoDataFrame):
        raise AreaJoinError("the layer must be a GeoDataFrame (use read_layer for a file)")
    if layer.crs is None:
        raise AreaJoinError("the area layer has no CRS: set it first (e.g. frame.set_crs('EPSG:4326'))")
    if len(layer) == 0:
        raise AreaJoinError("the area layer is empty")
    kinds = set(layer.geom_type.dropna())
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise AreaJoinError(f"the area layer must hold polygons, found {sorted(kinds)}")
    group_map = dict(groups) if isinstance(groups, Mapping) else {g: g for g in groups}
    if not group_map:
        raise AreaJoinError("give at least one group column")
    if TOTAL in group_map:
        raise AreaJoinError(f"{TOTAL!r} is reserved for the total population; rename that group")
    rate_map = dict(intensive) if isinstance(intensive, Mapping) else {v: v for v in intensive}
    counts = evaluate_columns(layer, group_map, "group")
    counts[TOTAL] = evaluate_columns(layer, {TOTAL: total}, "total")[TOTAL] if total else counts.sum(axis=1)
    if (counts < 0).any().any():
        bad = counts.columns[(counts < 0).any()].tolist()
        raise AreaJoinError(f"negative population counts in {bad}")
    rates = evaluate_columns(layer, rate_map, "intensive") if rate_map else pd.DataFrame(index=layer.index)

    layer = layer.loc[:, [layer.geometry.name]].copy()
    if not layer.is_valid.all():
        layer[layer.geometry.name] = layer.geometry.make_valid()
    target_crs = CRS.from_user_input(crs) if crs is not None else equal_area_crs(layer)
    source = layer.to_crs(target_crs)
    if target_crs.is_geographic:
        raise AreaJoinError(f"areal weighting needs a projected equal-area CRS, not {target_crs.name}")
    source = gpd.GeoDataFrame(pd.concat([counts, rates], axis=1).assign(**{_AREA: source.area.to_numpy()}),
                              geometry=source.geometry.to_numpy(), crs=target_crs)
    cells = study_area.to_geodataframe().to_crs(target_crs)
    # the layer's spatial index, not the union of a city's polygons tested against every cell (a fifth of a join)
    if source.sindex.query(cells.geometry, predicate="intersects").shape[1] == 0:
        raise AreaJoinError("no study-area cell intersects the area layer (wrong city or wrong CRS?)")
    extensive = list(counts.columns) + [_AREA]
    # allocate_total=False: a polygon half outside the study area gives the cells half its people (it does not
    # touch the intensive means). One call: the polygon-cell overlay, most of the join's time, is computed once.
    est = area_interpolate(source, cells, extensive_variables=extensive, intensive_variables=list(rates.columns) or None,
                           allocate_total=False, n_jobs=1)
    covered_m2 = est[_AREA].to_numpy()
    covered = np.clip(covered_m2 / cells.area.to_numpy(), 0.0, 1.0)
    if rate_map:
        cell_rates = pd.DataFrame({c: np.where(covered > 0, significant(est[c].to_numpy()), np.nan)
                                   for c in rates.columns})
    else:
        cell_rates = pd.DataFrame(index=range(len(cells)))
    area_coverage = float(covered_m2.sum() / source[_AREA].sum())
    result = AreaJoin(
        h3_ids=list(study_area.h3_ids),
        counts=est[list(counts.columns)].reset_index(drop=True).astype(np.float64),
        rates=cell_rates.reset_index(drop=True),
        covered=covered,
        layer_totals={c: float(counts[c].sum()) for c in counts.columns},
        area_coverage=area_coverage,
        crs=target_crs.srs,
        meta={"groups": group_map, "total": total or "sum of groups", "intensive": rate_map},
    )
    if area_coverage >= 1 - 1e-4:
        off = {c: v for c, v in result.coverage.items() if abs(v - 1) > conservation_tolerance}
        if off:
            raise AreaJoinError(f"the cells cover the layer but totals are not conserved: {off}")
    return result


def join_file(
    path: str | Path, study_area: StudyArea, groups: Mapping[str, str] | Sequence[str], *, layer: str | None = None,
    total: str | None = None, intensive: Mapping[str, str] | Sequence[str] = (), table=None, key: str | None = None,
    table_key: str | None = None,
) -> AreaJoin:
    """:func:`read_layer` then :func:`join_to_cells`: any city's file, layer, group columns and optional table."""
    frame = read_layer(path, layer, table=table, key=key, table_key=table_key)
    result = join_to_cells(frame, study_area, groups, total=total, intensive=intensive)
    result.meta.update({"file": str(path), "layer": layer, "table": None if table is None else str(table), "key": key})
    return result
