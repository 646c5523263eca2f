"""The full forecast of a shift: every study-area cell with its expected count."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from serving.dependencies import Now, Planner, Services
from serving.routers.common import audit_params, context, prepare_off_loop, respond
from serving.routers.hotspots import ERRORS
from serving.schemas import CellForecast, ForecastQuery, ForecastResponse

router = APIRouter(tags=["forecast"])


@router.get("/forecast", response_model=ForecastResponse, responses=ERRORS,
            summary="Expected count of every study-area cell for a shift")
async def forecast(request: Request, principal: Planner, query: Annotated[ForecastQuery, Query()],
                   services: Services, now: Now) -> Response:
    with services.forecasts.cold.request() as cold:
        p = await prepare_off_loop(services.models, services.forecasts, query, now, cold)

        def make() -> bytes:
            h3_ids = p.panel.study_area.h3_ids
            expected = p.forecast.expected
            return ForecastResponse(
                **context(p), n_cells=len(h3_ids), expected_total=float(expected.sum()),
                cells=[CellForecast(h3=h, expected_count=float(e)) for h, e in zip(h3_ids, expected.tolist())],
            ).model_dump_json().encode()

        variant = ("forecast", p.shift.requested, p.shift.after_data)
        return await respond(request, services.forecasts, services.audit, principal, p, variant,
                             make, audit_params(p, query), bulk_share=cold)  # every cell: waits for cold forecasts
