"""The registry as the service sees it: a city's model versions, their promotion tags, the champion."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fastapi import APIRouter, Path

from serving.dependencies import Analyst, Models, city_state
from serving.errors import ApiError
from serving.models_store import RegistryUnreachable
from serving.routers.hotspots import ERRORS
from serving.schemas import ModelsResponse, ModelVersionInfo, Promotion

router = APIRouter(tags=["models"])


def _parse(value: str | None):
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


@router.get("/models/{city}", response_model=ModelsResponse,
            responses={k: ERRORS[k] for k in (401, 403, 404)} | {503: {"description": "Registry unreachable."}},
            summary="Registered model versions of a city with their promotion decisions, and the champion")
def models(principal: Analyst, models: Models,
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
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=timezone.utc) if v.creation_timestamp else None
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
        hint = f"no champion: run `hotspots backtest {city}`, which promotes a model that beats the naive baseline"
    return ModelsResponse(city=city, registered_name=state.registered_name, registered=registered,
                          champion_version=champion, loaded_version=state.model and state.model.version,
                          loaded_source=state.model and state.model.source, versions=infos, hint=hint)
