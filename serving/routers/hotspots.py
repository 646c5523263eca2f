"""The next (or a given) shift's hotspots: ranked cells with explanations, as JSON, GeoJSON or a printable PNG.

The three routes share one prepared request (a dependency: key, parameters, the cached forecast and the cells
selected) and differ only in their renderer."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from serving.areas import CellAreas
from serving.audit import AuditLog
from serving.checks import EXPLAINED_CELLS, PNG_MAX_K, check_selected
from serving.dependencies import Now, Planner, Services
from serving.errors import ApiError
from serving.forecasts import ForecastService, select_cells
from serving.geometry import hexagon_ring
from serving.keys import Principal
from serving.priority import ColdShare
from serving.routers.common import Prepared, audit_params, context, prepare_off_loop, respond
from serving.schemas import (
    Contribution,
    ErrorMessage,
    Hotspot,
    HotspotCollection,
    HotspotFeature,
    HotspotProperties,
    HotspotsMeta,
    HotspotsQuery,
    HotspotsResponse,
    LatLon,
    Polygon,
    Selection,
    ValidationErrorMessage,
)

router = APIRouter(tags=["hotspots"])
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing, invalid or revoked API key."},
    403: {"model": ErrorMessage, "description": "The key's role may not read forecasts."},
    404: {"model": ErrorMessage, "description": "Unknown city."},
    422: {"model": ValidationErrorMessage, "description": "Bad shift, category, k or coverage (message names it)."},
    503: {"model": ErrorMessage, "description": "No champion model for the city (run `hotspots backtest <city>`)."},
}
GEOJSON = "application/geo+json"
PNG = "image/png"


def yielding(items: Iterable[T], every: int = 200) -> Iterator[T]:
    """``items``, with the GIL released after every ``every``: another thread's cold forecast (many short
    numpy/polars calls, each giving the GIL up) would otherwise wait a switch interval for it each time."""
    for i, item in enumerate(items, start=1):
        yield item
        if i % every == 0:
            time.sleep(0)


def _cells(p: Prepared, n: int, areas: CellAreas) -> list[Hotspot]:
    """The first ``n`` ranked cells, the first EXPLAINED_CELLS with their top features. Built without validation
    (the values are typed floats already) and yielding the GIL now and then: a city-wide selection is thousands
    of rows, and must not hold up a cold forecast running beside it."""
    panel, f = p.panel, p.forecast
    top = f.order[:n]
    try:
        explained = f.top_features(top[:EXPLAINED_CELLS]) + [[]] * max(0, n - EXPLAINED_CELLS)
    except Exception as exc:  # noqa: BLE001 - as a failing forecast (prepare): say so, never a bare 500
        raise ApiError(503, f"the champion model of {p.state.city} (version {f.model.version}) could not explain "
                            f"shift {f.shift_id}: {type(exc).__name__}: {exc}") from exc
    km2 = panel.study_area.areas_km2
    lat, lon = panel.study_area.centroids
    h3_ids = panel.study_area.h3_ids
    names, locations, uris = areas.inside, areas.locations, areas.geo_uris  # made once per city and panel
    cum_area = np.cumsum(km2[top]) / float(km2.sum())
    columns = zip(top.tolist(), f.expected[top].tolist(), np.round(f.percentile[top], 3).tolist(), lat[top].tolist(),
                  lon[top].tolist(), km2[top].tolist(), cum_area.tolist(), explained)
    return [
        Hotspot.model_construct(
            rank=rank, h3=h3_ids[i], expected_count=expected, risk_percentile=percentile,
            centroid=LatLon.model_construct(lat=y, lon=x), area_km2=area, cumulative_area_share=share,
            top_features=[Contribution.model_construct(feature=name, contribution=value) for name, value in why],
            area_name=names[i], location=locations[i], geo_uri=uris[i])
        for rank, (i, expected, percentile, y, x, area, share, why) in enumerate(yielding(columns), start=1)
    ]


def _selection(p: Prepared, query: HotspotsQuery, n: int) -> Selection:
    panel, f = p.panel, p.forecast
    areas, top = panel.study_area.areas_km2, f.order[:n]
    total_area, total_expected = float(areas.sum()), float(f.expected.sum())
    return Selection(
        k=None if query.coverage is not None else (query.k if query.k is not None else n), coverage=query.coverage,
        n_cells=n, explained_cells=min(n, EXPLAINED_CELLS), area_km2=float(areas[top].sum()),
        area_share=float(np.cumsum(areas[top])[-1] / total_area),  # as the ranked cells' cumulative share
        expected_share=float(f.expected[top].sum() / total_expected) if total_expected > 0 else 0.0,
        study_area_cells=panel.n_cells, study_area_km2=total_area,
    )


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
    areas: CellAreas  # the city's area names (per cell)
    flagged: str  # the H3 ids handed out, in rank order, as a JSON array (recorded in the audit row)
    cold: ColdShare  # the request's share of the cold forecasts under way (serving.priority)

    @property
    def k(self) -> int | None:
        """k as reported (None when the selection is by coverage)."""
        return None if self.query.coverage is not None else self.n

    def hotspots(self) -> tuple[list[Hotspot], Selection]:
        return _cells(self.p, self.n, self.areas), self.selection()

    def selection(self) -> Selection:
        return _selection(self.p, self.query, self.n)

    async def respond(self, kind: str, render: Callable[[HotspotsRequest], bytes], media_type: str,
                      **params: Any) -> Response:
        """The body ``kind`` of this selection, rendered once per forecast and selection, audited, sent."""
        q, p = self.query, self.p
        variant = (kind, p.shift.requested, p.shift.after_data, self.n, q.coverage)
        self.forecasts.explaining(p.forecast, min(self.n, EXPLAINED_CELLS))
        return await respond(self.request, self.forecasts, self.audit, self.principal, p, variant,
                             lambda: render(self), audit_params(p, q, k=self.k, coverage=q.coverage, **params),
                             media_type=media_type, flagged=self.flagged,
                             bulk_share=self.cold if kind == "png" or self.n > EXPLAINED_CELLS else None)



async def prepared_hotspots(request: Request, principal: Planner, query: Annotated[HotspotsQuery, Query()],
                            services: Services, now: Now) -> AsyncIterator[HotspotsRequest]:
    max_k = PNG_MAX_K if request.url.path.endswith(".png") else None
    forecasts, default_k = services.forecasts, services.settings.default_k
    with forecasts.cold.request() as cold:  # a cold forecast is under way until the response is made
        p = await prepare_off_loop(services.models, forecasts, query, now, cold, query.k, query.coverage, max_k)
        n = select_cells(p.panel, p.forecast, query.k, query.coverage, default_k)
        check_selected(n, query.coverage, max_k)
        areas = services.areas.peek(p.state.city, p.state.panel_token)
        if areas is None:  # the city's area names, made once per city and panel
            areas = await run_in_threadpool(services.areas.get, p.state.city, p.state.panel_token, p.panel.study_area)
        yield HotspotsRequest(request, principal, query, forecasts, services.audit, default_k, p, n, areas,
                              await _flagged(forecasts, p, n), cold)


async def _flagged(forecasts: ForecastService, p: Prepared, n: int) -> str:
    """The first ``n`` ranked H3 ids as the JSON array json.dumps writes: a few are encoded here; more are a slice
    of the forecast's ranked ids, encoded once per forecast (in the thread pool), so a city-wide request does no
    per-cell work."""
    h3_ids, top = p.panel.study_area.h3_ids, p.forecast.order
    if n <= EXPLAINED_CELLS:
        return json.dumps([h3_ids[i] for i in top[:n].tolist()])
    ranked = forecasts.ranked.peek((p.forecast.key, "flagged"))
    if ranked is None:
        def make() -> tuple[bytes, np.ndarray]:
            return _joined([f'"{h3_ids[i]}"'.encode() for i in top.tolist()], b", ")

        ranked = (await run_in_threadpool(forecasts.ranked.get_or_compute, (p.forecast.key, "flagged"), make))[0]
    return _first(ranked, n)


def _first(ranked: tuple[bytes, np.ndarray], n: int) -> str:
    joined, ends = ranked
    return "[" + joined[: int(ends[n - 1])].decode() + "]" if n > 0 else "[]"


def _joined(parts: list[bytes], sep: bytes) -> tuple[bytes, np.ndarray]:
    """``parts`` joined by ``sep``, and where each part ends: the first n parts are ``joined[:ends[n - 1]]``."""
    return sep.join(parts), np.cumsum([len(part) + len(sep) for part in parts]) - len(sep)


PreparedHotspots = Annotated[HotspotsRequest, Depends(prepared_hotspots, scope="function")]  # ends before the send


def _features(cells: list[Hotspot], ctx: dict[str, Any]) -> list[HotspotFeature]:
    version, start, end = ctx["model"]["version"], ctx["shift"]["start"], ctx["shift"]["end"]
    return [
        HotspotFeature.model_construct(
            id=cell.h3, geometry=Polygon.model_construct(coordinates=[hexagon_ring(cell.h3)]),
            properties=HotspotProperties.model_construct(**vars(cell), model_version=version, shift_start=start,
                                                         shift_end=end))
        for cell in yielding(cells)
    ]


_ITEM = {"hotspots": Hotspot.__pydantic_serializer__, "geojson": HotspotFeature.__pydantic_serializer__}


def _items(r: HotspotsRequest, kind: str, n: int) -> list:
    cells = _cells(r.p, n, r.areas)
    return cells if kind == "hotspots" else _features(cells, context(r.p))


def _ranked(r: HotspotsRequest, kind: str) -> tuple[bytes, np.ndarray]:
    """The whole ranking of the request's forecast as JSON items (``kind``), joined, and where each item ends:
    made once per forecast and format, by its first selection above EXPLAINED_CELLS; any such k is then a slice."""
    f = r.p.forecast

    def make() -> tuple[bytes, np.ndarray]:
        return _joined([_ITEM[kind].to_json(item) for item in yielding(_items(r, kind, f.order.size))], b",")

    return r.forecasts.ranked.get_or_compute((f.key, kind), make)[0]


def _body(r: HotspotsRequest, kind: str, envelope: BaseModel, field: str) -> bytes:
    """``envelope``'s JSON with its (empty) list ``field`` holding the first r.n items: the same bytes as one
    model_dump_json of the whole response."""
    head = envelope.model_dump_json().encode()
    marker = f'"{field}":[]'.encode()
    at = head.index(marker) + len(marker) - 1  # the list's closing bracket
    if r.n <= EXPLAINED_CELLS:
        items: bytes | memoryview = b",".join(_ITEM[kind].to_json(item) for item in _items(r, kind, r.n))
    else:
        joined, ends = _ranked(r, kind)
        items = memoryview(joined)[: int(ends[r.n - 1])]
    # one join, one copy: `head + slice + tail` of a city-wide body is three megabyte allocations and copies
    return b"".join((head[:at], items, head[at:]))


def render_json(r: HotspotsRequest) -> bytes:
    return _body(r, "hotspots", HotspotsResponse(**context(r.p), selection=r.selection(), hotspots=[]), "hotspots")


def render_geojson(r: HotspotsRequest) -> bytes:
    meta = HotspotsMeta(**context(r.p), selection=r.selection())
    return _body(r, "geojson", HotspotCollection(features=[], hotspots=meta), "features")


def render_png(r: HotspotsRequest) -> bytes:
    """About half a second of matplotlib: drawn once per forecast and selection. The briefing module (matplotlib,
    ~1 s to import) is loaded by the first PNG asked for, not by every service start and CLI command."""
    from serving.briefing import render_briefing

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
