"""The cities the service knows (one per saved panel) and whether each can be forecast; per city, the shifts
it can forecast around one (the map page's shift selector) and the study area's outline (the map's frame)."""

from __future__ import annotations

from typing import Annotated

import h3
import numpy as np
from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from serving.caches import ComputeOnceCache
from serving.dependencies import Areas, Models, Now, Planner, city_state, ready_panel, ready_state
from serving.errors import FieldError
from serving.models_store import CityState
from serving.routers.hotspots import ERRORS
from serving.schemas import (
    AreaLayer,
    City,
    CityList,
    LatLon,
    MultiPolygon,
    NamedArea,
    ShiftList,
    ShiftOption,
    ShiftsQuery,
    StudyAreaOutline,
)
from serving.shifts import resolve_shift, shift_start_local

router = APIRouter(tags=["cities"])


@router.get("/cities", response_model=CityList, responses={k: ERRORS[k] for k in (401, 403)},
            summary="Cities with a panel, their study area, shifts and champion model")
def cities(principal: Planner, models: Models) -> CityList:
    out = []
    for city, state in sorted(models.snapshot().items()):
        panel, model = state.panel, state.model
        if panel is None:
            continue
        out.append(City(
            city=city, ready=state.ready, model_version=model.version if model else None,
            model_target=model.target if model else None,
            timezone=panel.calendar.timezone, shift_starts=panel.calendar.labels, categories=list(panel.categories),
            h3_resolution=panel.study_area.resolution, n_cells=panel.n_cells,
            area_km2=float(panel.study_area.areas_km2.sum()),
            data_start=shift_start_local(panel, panel.first_shift), data_end=shift_start_local(panel, panel.end_shift),
        ))
    return CityList(cities=out)


CityPath = Annotated[str, Path(min_length=1, max_length=100, description="City (source) name, see /v1/cities.")]
# (city, panel files) -> outline: a new panel gives a new key
_OUTLINES: ComputeOnceCache[StudyAreaOutline] = ComputeOnceCache(32)


def _panel_state(models: Models, city: str) -> CityState:
    """404 for an unknown city, 503 when its panel cannot be read (no model needed here)."""
    state = city_state(models, city)
    return state if state.panel is not None else ready_state(state)


@router.get("/cities/{city}/shifts", response_model=ShiftList, responses={k: ERRORS[k] for k in (401, 403, 404, 422, 503)},
            summary="Shifts the service can forecast before and after 'next' (or a given shift)")
def city_shifts(principal: Planner, models: Models, city: CityPath, query: Annotated[ShiftsQuery, Query()],
                now: Now) -> ShiftList:
    state = _panel_state(models, city)
    panel = ready_panel(state)
    try:
        centre = resolve_shift(panel, query.around, now)
    except FieldError as exc:
        raise FieldError("around", str(exc)) from None
    c = centre.shift_id
    ids = np.arange(max(panel.first_shift + 1, c - query.n), min(panel.end_shift, c + query.n) + 1)
    bounds = panel.calendar.bounds(ids)
    labels, per_day = panel.calendar.labels, panel.calendar.per_day
    is_next = query.around.strip().lower() == "next"
    shifts = [
        ShiftOption(shift_id=row["shift_id"],
                    shift="next" if is_next and row["shift_id"] == c else row["start_local"].isoformat(),
                    start=row["start_local"], end=row["end_local"], hours=row["hours"],
                    label=labels[row["shift_id"] % per_day], offset=row["shift_id"] - c)
        for row in bounds.iter_rows(named=True)
    ]
    return ShiftList(city=state.city, timezone=panel.calendar.timezone, around=query.around, centre_shift_id=c,
                     after_data=centre.after_data, first_start=shift_start_local(panel, panel.first_shift + 1),
                     last_start=shift_start_local(panel, panel.end_shift), shifts=shifts)


def _outline(state: CityState) -> StudyAreaOutline:
    area = ready_panel(state).study_area
    geo = h3.cells_to_geo(area.h3_ids)  # the union of the cells, computed by H3 itself
    polygons = geo["coordinates"] if geo["type"] == "MultiPolygon" else [geo["coordinates"]]
    polygons = [[[(round(lon, 6), round(lat, 6)) for lon, lat in ring] for ring in polygon] for polygon in polygons]
    points = np.array([p for polygon in polygons for p in polygon[0]])
    (west, south), (east, north) = points.min(axis=0), points.max(axis=0)
    return StudyAreaOutline(city=state.city, h3_resolution=area.resolution, n_cells=len(area),
                            area_km2=float(area.areas_km2.sum()), bbox=(west, south, east, north),
                            outline=MultiPolygon(coordinates=polygons))


@router.get("/cities/{city}/area", response_model=StudyAreaOutline, responses={k: ERRORS[k] for k in (401, 403, 404, 503)},
            summary="The study area's outline and bounding box (GeoJSON MultiPolygon), to frame a map")
def city_area(principal: Planner, models: Models, city: CityPath) -> StudyAreaOutline:
    state = _panel_state(models, city)
    return _OUTLINES.get_or_compute((state.city, state.panel_token), lambda: _outline(state))[0]


@router.get("/cities/{city}/areas", response_model=AreaLayer, responses={k: ERRORS[k] for k in (401, 403, 404, 503)},
            summary="Named areas (neighbourhoods, community areas) around the study area: outlines and names for the map")
async def city_areas(principal: Planner, models: Models, names: Areas, city: CityPath) -> AreaLayer:
    state = _panel_state(models, city)
    areas = await run_in_threadpool(names.get, state.city, state.panel_token, ready_panel(state).study_area)
    return AreaLayer(city=state.city, source=areas.source, description=areas.description, message=areas.message,
                     areas=[NamedArea(name=a.name, outline=MultiPolygon(coordinates=a.polygons),
                                      label_at=LatLon(lat=a.label_lat, lon=a.label_lon), n_cells=a.n_cells)
                            for a in areas.areas])
