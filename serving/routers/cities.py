"""The cities the service knows (one per saved panel) and whether each can be forecast."""

from __future__ import annotations

from fastapi import APIRouter

from serving.dependencies import Models, Planner
from serving.forecasts import shift_start_local
from serving.routers.hotspots import ERRORS
from serving.schemas import City, CityList

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
            city=city, ready=state.ready, model_version=model and model.version, model_target=model and model.target,
            timezone=panel.calendar.timezone, shift_starts=panel.calendar.labels, categories=list(panel.categories),
            h3_resolution=panel.study_area.resolution, n_cells=panel.n_cells,
            area_km2=float(panel.study_area.areas_km2.sum()),
            data_start=shift_start_local(panel, panel.first_shift), data_end=shift_start_local(panel, panel.end_shift),
        ))
    return CityList(cities=out)
