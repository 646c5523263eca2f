"""The next (or a given) shift's hotspots: ranked cells with explanations, as JSON or GeoJSON."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serving.dependencies import Audit, Forecasts, Models, Now, Planner, ServiceSettings_
from serving.forecasts import hexagon_ring, select_cells
from serving.routers.common import Prepared, audit_params, audited, context, prepare
from serving.schemas import (
    Contribution, ErrorMessage, Hotspot, HotspotCollection, HotspotFeature, HotspotProperties, HotspotsMeta,
    HotspotsQuery, HotspotsResponse, LatLon, Polygon, Selection, ValidationErrorMessage,
)

router = APIRouter(tags=["hotspots"])

ERRORS = {
    401: {"model": ErrorMessage, "description": "Missing, invalid or revoked API key."},
    403: {"model": ErrorMessage, "description": "The key's role may not read forecasts."},
    404: {"model": ErrorMessage, "description": "Unknown city."},
    422: {"model": ValidationErrorMessage, "description": "Bad shift, category, k or coverage (message names it)."},
    503: {"model": ErrorMessage, "description": "No champion model for the city (run `hotspots backtest <city>`)."},
}
GEOJSON = "application/geo+json"


def _hotspots(p: Prepared, query: HotspotsQuery, default_k: int) -> tuple[list[Hotspot], Selection]:
    panel, f = p.state.panel, p.forecast
    n = select_cells(panel, f, query.k, query.coverage, default_k)
    top = f.order[:n]
    areas = panel.study_area.areas_km2
    total_area, total_expected = float(areas.sum()), float(f.expected.sum())
    lat, lon = panel.study_area.centroids
    h3_ids = panel.study_area.h3_ids
    cum_area = np.cumsum(areas[top]) / total_area
    hotspots = [
        Hotspot(rank=rank, h3=h3_ids[i], expected_count=float(f.expected[i]),
                risk_percentile=round(float(f.percentile[i]), 3), centroid=LatLon(lat=float(lat[i]), lon=float(lon[i])),
                area_km2=float(areas[i]), cumulative_area_share=float(cum_area[rank - 1]),
                top_features=[Contribution(feature=name, contribution=value) for name, value in f.top_features[i]])
        for rank, i in enumerate(top.tolist(), start=1)
    ]
    selection = Selection(
        k=None if query.coverage is not None else (query.k if query.k is not None else n), coverage=query.coverage,
        n_cells=n, area_km2=float(areas[top].sum()), area_share=float(cum_area[-1]),
        expected_share=float(f.expected[top].sum() / total_expected) if total_expected > 0 else 0.0,
        study_area_cells=panel.n_cells, study_area_km2=total_area,
    )
    return hotspots, selection


@router.get("/hotspots", response_model=HotspotsResponse, responses=ERRORS,
            summary="Ranked hotspot cells of a shift, with the top contributing features of each")
def hotspots(request: Request, principal: Planner, query: Annotated[HotspotsQuery, Query()], models: Models,
             forecasts: Forecasts, audit: Audit, service: ServiceSettings_, now: Now) -> Response:
    p = prepare(models, forecasts, query, now, query.k, query.coverage)
    cells, selection = _hotspots(p, query, service.default_k)
    body = HotspotsResponse(**context(p), selection=selection, hotspots=cells)
    return audited(request, audit, principal, body, p, audit_params(p, query, k=selection.k, coverage=query.coverage))


@router.get("/hotspots.geojson", response_model=HotspotCollection, response_class=Response,
            responses={**ERRORS, 200: {"content": {GEOJSON: {}}, "description": "RFC 7946 FeatureCollection."}},
            summary="The same hotspots as a GeoJSON FeatureCollection of hexagons")
def hotspots_geojson(request: Request, principal: Planner, query: Annotated[HotspotsQuery, Query()], models: Models,
                     forecasts: Forecasts, audit: Audit, service: ServiceSettings_, now: Now) -> Response:
    p = prepare(models, forecasts, query, now, query.k, query.coverage)
    cells, selection = _hotspots(p, query, service.default_k)
    ctx = context(p)
    features = [
        HotspotFeature(id=cell.h3, geometry=Polygon(coordinates=[hexagon_ring(cell.h3)]),
                       properties=HotspotProperties(**cell.model_dump(), model_version=ctx["model"]["version"],
                                                    shift_start=ctx["shift"]["start"], shift_end=ctx["shift"]["end"]))
        for cell in cells
    ]
    body = HotspotCollection(features=features, hotspots=HotspotsMeta(**ctx, selection=selection))
    return audited(request, audit, principal, body, p,
                   audit_params(p, query, k=selection.k, coverage=query.coverage, format="geojson"), media_type=GEOJSON)
