"""The registry as the service sees it: a city's model versions, their promotion tags, the champion."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, overload

from fastapi import APIRouter, Depends, Path, Request

from forecasting.metrics import HEADLINE_COVERAGES
from serving.card_schemas import BacktestRecord, CityModelSummary, ForecasterScore, ModelCard, ModelsOverview
from serving.dependencies import Analyst, Models, city_state
from serving.errors import ApiError
from serving.model_cards import ModelCards
from serving.models_store import ModelStore, RegistryUnreachable
from serving.routers.hotspots import ERRORS
from serving.schemas import ModelsResponse, ModelVersionInfo, Promotion

router = APIRouter(tags=["models"])


async def get_cards(request: Request) -> ModelCards:
    return request.app.state.model_cards


Cards = Annotated[ModelCards, Depends(get_cards)]


@overload
def champion_card(models: ModelStore, cards: ModelCards, city: str, version: str) -> ModelCard: ...
@overload
def champion_card(models: ModelStore, cards: ModelCards, city: str, version: str | None) -> ModelCard | None: ...
def champion_card(models: ModelStore, cards: ModelCards, city: str, version: str | None) -> ModelCard | None:
    """The card of ``version`` (None when there is none); 503 when the registry cannot be read."""
    if version is None:
        return None
    try:
        return cards.card(city, version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for an unreachable or broken store
        raise ApiError(503, f"model registry unreachable ({RegistryUnreachable(str(exc))}); "
                            "check HOTSPOTS_MLFLOW_TRACKING_URI") from exc


def _parse(value: str | None):
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _headline(backtest: BacktestRecord) -> list[ForecasterScore]:
    """The champion's scores, then the strongest baseline's, at the headline coverages: the pair the backtest
    itself chose (the card lists every forecaster)."""
    lead = list(dict.fromkeys(n for n in (backtest.champion_forecaster, backtest.strongest_baseline) if n))
    return sorted((s for s in backtest.scores if s.forecaster in lead and s.coverage in HEADLINE_COVERAGES),
                  key=lambda s: (lead.index(s.forecaster), s.coverage))


@router.get("/models", response_model=ModelsOverview, responses={k: ERRORS[k] for k in (401, 403)},
            summary="Every city's champion with its backtest hit rates beside the strongest baseline's")
def models_overview(principal: Analyst, models: Models, cards: Cards) -> ModelsOverview:
    cities = []
    for city, state in sorted(models.snapshot().items()):
        try:
            _, aliases, _ = models.versions(city)
        except RegistryUnreachable:
            aliases = {}
        champion = aliases.get("champion")
        card = champion_card(models, cards, city, champion)
        headline = _headline(card.backtest) if card and card.backtest else []
        cities.append(CityModelSummary(city=city, registered_name=state.registered_name, champion_version=champion,
                                       loaded_version=state.model.version if state.model else None,
                                       headline=headline))
    return ModelsOverview(cities=cities, generated_at=datetime.now(UTC))


@router.get("/models/{city}", response_model=ModelsResponse,
            responses={**{k: ERRORS[k] for k in (401, 403, 404)}, 503: {"description": "Registry unreachable."}},
            summary="Registered model versions of a city with their promotion decisions, and the champion")
def models(request: Request, principal: Analyst, models: Models, cards: Cards,
           city: str = Path(..., min_length=1, max_length=100, description="City (source) name.")) -> ModelsResponse:
    state = city_state(models, city)
    try:
        registered, aliases, versions = models.versions(city)
    except RegistryUnreachable as exc:
        raise ApiError(503, f"model registry unreachable ({exc}); check HOTSPOTS_MLFLOW_TRACKING_URI") from exc
    champion = aliases.get("champion")
    infos = []
    for v in versions:
        tags = dict(v.tags or {})
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=UTC) if v.creation_timestamp else None
        infos.append(ModelVersionInfo(
            version=str(v.version), status=v.status, created_at=created, run_id=v.run_id,
            aliases=sorted(a for a, ver in aliases.items() if ver == str(v.version)),
            is_champion=str(v.version) == champion,
            promotion=Promotion(decision=tags.get("promotion_decision"), reason=tags.get("promotion_reason"),
                                detail=_parse(tags.get("promotion_detail"))),
            tags=tags,
        ))
    hint = None
    if champion is None:
        hint = f"no champion: run `hotspots backtest {city}`, which promotes its winner against the strongest baseline"
    return ModelsResponse(city=city, registered_name=state.registered_name, registered=registered,
                          champion_version=champion, loaded_version=state.model.version if state.model else None,
                          loaded_source=state.model.source if state.model else None, versions=infos, hint=hint,
                          card=champion_card(models, cards, city, champion),
                          accuracy=request.app.state.accuracy.try_record(city))
