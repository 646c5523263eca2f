"""The next (or a given) shift's hotspots: ranked cells with explanations, as JSON, GeoJSON or a printable PNG."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serving.briefing import render_briefing
from serving.dependencies import Audit, Forecasts, Models, Now, Planner, Settings_
from serving.errors import ApiError
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
PNG = "image/png"


def _hotspots(p: Prepared, query: HotspotsQuery, default_k: int) -> tuple[list[Hotspot], Selection]:
    panel, f = p.state.panel, p.forecast
    n = select_cells(panel, f, query.k, query.coverage, default_k)
    top = f.order[:n]
    try:
        explained = f.top_features(top)
    except Exception as exc:  # noqa: BLE001 - as a failing forecast (prepare): say so, never a bare 500
        raise ApiError(503, f"the champion model of {p.state.city} (version {f.model.version}) could not explain "
                            f"shift {f.shift_id}: {type(exc).__name__}: {exc}") from exc
    areas = panel.study_area.areas_km2
    total_area, total_expected = float(areas.sum()), float(f.expected.sum())
    lat, lon = panel.study_area.centroids
    h3_ids = panel.study_area.h3_ids
    cum_area = np.cumsum(areas[top]) / total_area
    hotspots = [
        Hotspot(rank=rank, h3=h3_ids[i], expected_count=float(f.expected[i]),
                risk_percentile=round(float(f.percentile[i]), 3), centroid=LatLon(lat=float(lat[i]), lon=float(lon[i])),
                area_km2=float(areas[i]), cumulative_area_share=float(cum_area[rank - 1]),
                top_features=[Contribution(feature=name, contribution=value) for name, value in why])
        for rank, (i, why) in enumerate(zip(top.tolist(), explained), start=1)
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
             forecasts: Forecasts, audit: Audit, service: Settings_, now: Now) -> Response:
    p = prepare(models, forecasts, query, now, query.k, query.coverage)
    n, k = _selected(p, query, service.default_k)

    def make() -> bytes:
        cells, selection = _hotspots(p, query, service.default_k)
        return HotspotsResponse(**context(p), selection=selection, hotspots=cells).model_dump_json().encode()

    body = forecasts.body(p.forecast, ("hotspots", p.shift.requested, p.shift.after_data, n, query.coverage), make)
    return audited(request, audit, principal, body, p, audit_params(p, query, k=k, coverage=query.coverage))


def _selected(p: Prepared, query: HotspotsQuery, default_k: int) -> tuple[int, int | None]:
    """(cells returned, k as reported): what a cached body is keyed on, without building it."""
    n = select_cells(p.state.panel, p.forecast, query.k, query.coverage, default_k)
    return n, None if query.coverage is not None else n


@router.get("/hotspots.geojson", response_model=HotspotCollection, response_class=Response,
            responses={**ERRORS, 200: {"content": {GEOJSON: {}}, "description": "RFC 7946 FeatureCollection."}},
            summary="The same hotspots as a GeoJSON FeatureCollection of hexagons")
def hotspots_geojson(request: Request, principal: Planner, query: Annotated[HotspotsQuery, Query()], models: Models,
                     forecasts: Forecasts, audit: Audit, service: Settings_, now: Now) -> Response:
    p = prepare(models, forecasts, query, now, query.k, query.coverage)
    n, k = _selected(p, query, service.default_k)

    def make() -> bytes:
        cells, selection = _hotspots(p, query, service.default_k)
        ctx = context(p)
        features = [
            HotspotFeature(id=cell.h3, geometry=Polygon(coordinates=[hexagon_ring(cell.h3)]),
                           properties=HotspotProperties(**cell.model_dump(), model_version=ctx["model"]["version"],
                                                        shift_start=ctx["shift"]["start"], shift_end=ctx["shift"]["end"]))
            for cell in cells
        ]
        return HotspotCollection(features=features, hotspots=HotspotsMeta(**ctx, selection=selection)).model_dump_json().encode()

    body = forecasts.body(p.forecast, ("geojson", p.shift.requested, p.shift.after_data, n, query.coverage), make)
    return audited(request, audit, principal, body, p,
                   audit_params(p, query, k=k, coverage=query.coverage, format="geojson"), media_type=GEOJSON)


@router.get("/hotspots.png", response_class=Response,
            responses={**ERRORS, 200: {"content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
                                       "description": "A4-landscape briefing map (PNG, 150 dpi): the ranked cells "
                                                      "coloured by expected count and numbered by rank over the "
                                                      "study area, with the shift window, category, model version "
                                                      "and the ranked table."}},
            summary="The same hotspots as a printable briefing map (PNG)")
def hotspots_png(request: Request, principal: Planner, query: Annotated[HotspotsQuery, Query()], models: Models,
                 forecasts: Forecasts, audit: Audit, service: Settings_, now: Now) -> Response:
    p = prepare(models, forecasts, query, now, query.k, query.coverage)
    n, k = _selected(p, query, service.default_k)

    def make() -> bytes:  # about half a second of matplotlib: drawn once per forecast and selection
        cells, selection = _hotspots(p, query, service.default_k)
        return render_briefing(p.state.panel.study_area.cells,
                               HotspotsResponse(**context(p), selection=selection, hotspots=cells))

    body = forecasts.body(p.forecast, ("png", p.shift.requested, p.shift.after_data, n, query.coverage), make)
    return audited(request, audit, principal, body, p,
                   audit_params(p, query, k=k, coverage=query.coverage, format="png"), media_type=PNG)
