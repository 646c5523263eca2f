"""The next (or a given) shift's hotspots: ranked cells with explanations, as JSON, GeoJSON or a printable PNG.

The three routes share one prepared request (a dependency: key, parameters, the cached forecast and the cells
selected) and differ only in their renderer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from serving.briefing import render_briefing
from serving.audit import AuditLog
from serving.dependencies import Audit, Forecasts, Models, Now, Planner, Settings_
from serving.forecasts import ForecastService
from serving.keys import Principal
from serving.errors import ApiError
from serving.forecasts import select_cells
from serving.geometry import hexagon_ring
from serving.routers.common import Prepared, audit_params, context, prepare_off_loop, respond
from serving.schemas import (
    Contribution, ErrorMessage, Hotspot, HotspotCollection, HotspotFeature, HotspotProperties, HotspotsMeta,
    HotspotsQuery, HotspotsResponse, LatLon, Polygon, Selection, ValidationErrorMessage,
)

router = APIRouter(tags=["hotspots"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing, invalid or revoked API key."},
    403: {"model": ErrorMessage, "description": "The key's role may not read forecasts."},
    404: {"model": ErrorMessage, "description": "Unknown city."},
    422: {"model": ValidationErrorMessage, "description": "Bad shift, category, k or coverage (message names it)."},
    503: {"model": ErrorMessage, "description": "No champion model for the city (run `hotspots backtest <city>`)."},
}
GEOJSON = "application/geo+json"
PNG = "image/png"


def _hotspots(p: Prepared, query: HotspotsQuery, default_k: int) -> tuple[list[Hotspot], Selection]:
    panel, f = p.panel, p.forecast
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


@dataclass(frozen=True)
class HotspotsRequest:
    """A checked hotspots request with its (cached) forecast and the number of cells it selects."""

    request: Request
    principal: Principal
    query: HotspotsQuery
    forecasts: ForecastService
    audit: AuditLog
    default_k: int
    p: Prepared
    n: int  # cells returned

    @property
    def k(self) -> int | None:
        """k as reported (None when the selection is by coverage)."""
        return None if self.query.coverage is not None else self.n

    def hotspots(self) -> tuple[list[Hotspot], Selection]:
        return _hotspots(self.p, self.query, self.default_k)

    async def respond(self, kind: str, render: Callable[["HotspotsRequest"], bytes], media_type: str,
                      **params: Any) -> Response:
        """The body ``kind`` of this selection, rendered once per forecast and selection, audited, sent."""
        q, p = self.query, self.p
        variant = (kind, p.shift.requested, p.shift.after_data, self.n, q.coverage)
        return await respond(self.request, self.forecasts, self.audit, self.principal, p, variant,
                             lambda: render(self), audit_params(p, q, k=self.k, coverage=q.coverage, **params),
                             media_type=media_type)


async def prepared_hotspots(request: Request, principal: Planner, query: Annotated[HotspotsQuery, Query()],
                            models: Models, forecasts: Forecasts, audit: Audit, service: Settings_,
                            now: Now) -> HotspotsRequest:
    p = await prepare_off_loop(models, forecasts, query, now, query.k, query.coverage)
    n = select_cells(p.panel, p.forecast, query.k, query.coverage, service.default_k)
    return HotspotsRequest(request, principal, query, forecasts, audit, service.default_k, p, n)


PreparedHotspots = Annotated[HotspotsRequest, Depends(prepared_hotspots)]


def render_json(r: HotspotsRequest) -> bytes:
    cells, selection = r.hotspots()
    return HotspotsResponse(**context(r.p), selection=selection, hotspots=cells).model_dump_json().encode()


def render_geojson(r: HotspotsRequest) -> bytes:
    cells, selection = r.hotspots()
    ctx = context(r.p)
    features = [
        HotspotFeature(id=cell.h3, geometry=Polygon(coordinates=[hexagon_ring(cell.h3)]),
                       properties=HotspotProperties(**cell.model_dump(), model_version=ctx["model"]["version"],
                                                    shift_start=ctx["shift"]["start"], shift_end=ctx["shift"]["end"]))
        for cell in cells
    ]
    return HotspotCollection(features=features, hotspots=HotspotsMeta(**ctx, selection=selection)).model_dump_json().encode()


def render_png(r: HotspotsRequest) -> bytes:
    """About half a second of matplotlib: drawn once per forecast and selection."""
    cells, selection = r.hotspots()
    return render_briefing(r.p.panel.study_area.cells,
                           HotspotsResponse(**context(r.p), selection=selection, hotspots=cells))


@router.get("/hotspots", response_model=HotspotsResponse, responses=ERRORS,
            summary="Ranked hotspot cells of a shift, with the top contributing features of each")
async def hotspots(r: PreparedHotspots) -> Response:
    return await r.respond("hotspots", render_json, "application/json")


@router.get("/hotspots.geojson", response_model=HotspotCollection, response_class=Response,
            responses={**ERRORS, 200: {"content": {GEOJSON: {}}, "description": "RFC 7946 FeatureCollection."}},
            summary="The same hotspots as a GeoJSON FeatureCollection of hexagons")
async def hotspots_geojson(r: PreparedHotspots) -> Response:
    return await r.respond("geojson", render_geojson, GEOJSON, format="geojson")


@router.get("/hotspots.png", response_class=Response,
            responses={**ERRORS, 200: {"content": {PNG: {"schema": {"type": "string", "format": "binary"}}},
                                       "description": "A4-landscape briefing map (PNG, 150 dpi): the ranked cells "
                                                      "coloured by expected count and numbered by rank over the "
                                                      "study area, with the shift window, category, model version "
                                                      "and the ranked table."}},
            summary="The same hotspots as a printable briefing map (PNG)")
async def hotspots_png(r: PreparedHotspots) -> Response:
    return await r.respond("png", render_png, PNG, format="png")
