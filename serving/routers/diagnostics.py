"""The champion's latest feedback-loop diagnostics, bias audit and patrol analysis, as logged in MLflow by
the backtest, ``hotspots diagnose`` and ``hotspots audit``."""

from __future__ import annotations

from fastapi import APIRouter, Path

from serving.card_schemas import DiagnosticsResponse
from serving.dependencies import Analyst, Models, city_state
from serving.errors import ApiError
from serving.models_store import RegistryUnreachable
from serving.routers.hotspots import ERRORS
from serving.routers.models import Cards, champion_card

router = APIRouter(tags=["diagnostics"])


@router.get("/diagnostics/{city}", response_model=DiagnosticsResponse,
            responses={k: ERRORS[k] for k in (401, 403, 404, 503)},
            summary="The champion's concentration, churn, bias audit and patrol-dose figures, with intervals")
def diagnostics(principal: Analyst, models: Models, cards: Cards,
                city: str = Path(..., min_length=1, max_length=100, description="City (source) name.")) -> DiagnosticsResponse:
    city_state(models, city)
    try:
        _, aliases, _ = models.versions(city)
    except RegistryUnreachable as exc:
        raise ApiError(503, f"model registry unreachable ({exc}); check HOTSPOTS_MLFLOW_TRACKING_URI") from exc
    champion = aliases.get("champion")
    if champion is None:
        raise ApiError(503, f"{city} has no champion model: run `hotspots backtest {city}`")
    card = champion_card(models, cards, city, champion)
    found = {a.name: a for a in card.assessments}
    return DiagnosticsResponse(city=city, model_version=champion, run_id=card.run_id, hint=card.hint, **found)
