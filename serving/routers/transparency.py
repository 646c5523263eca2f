"""The public transparency page of a city (``GET /transparency/{city}``, no key): the model it serves, the data
period, the backtest against the baselines, the realised accuracy of the served flags against the strongest
baseline, the drift alarms, the last bias audit and feedback-loop diagnostics, and the data-retention rule.

It shows figures only: no cell list of any shift (the current one above all), no incident, no key."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse

from forecasting.metrics import HEADLINE_COVERAGES
from forecasting.reporting.templating import render
from serving.card_schemas import ModelCard
from serving.dependencies import Models, city_state
from serving.errors import ApiError
from serving.models_store import RegistryUnreachable
from serving.routers.models import Cards, champion_card

router = APIRouter(tags=["transparency"])
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "Cache-Control": "public, max-age=60"}


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _card(models: Models, cards: Cards, city: str, version: str | None) -> tuple[ModelCard | None, str | None]:
    """The champion's MLflow card, or why there is none (the page still shows the rest)."""
    try:
        return champion_card(models, cards, city, version), None
    except (ApiError, RegistryUnreachable):
        return None, "the model registry cannot be read right now: the backtest and assessments are not shown"


@router.get("/transparency/{city}", response_class=HTMLResponse,
            responses={404: {"description": "Unknown city."}},
            summary="Public accuracy and accountability page of a city (HTML, no key, no cell lists)")
def transparency(request: Request, models: Models, cards: Cards,
                 city: str = Path(..., min_length=1, max_length=100, description="City (source) name.")) -> HTMLResponse:
    state = city_state(models, city)
    version = state.model.version if state.model else None
    card, card_note = _card(models, cards, city, version)
    record = request.app.state.accuracy.try_record(city)
    scores = [s for s in (card.backtest.scores if card and card.backtest else []) if s.coverage in HEADLINE_COVERAGES]
    assessments = {a.name: a for a in (card.assessments if card else [])}
    html = render("transparency_page.html.j2", city=city, state=state, card=card, card_note=card_note, record=record,
                  scores=scores, bias=assessments.get("bias_audit"), diagnostics=assessments.get("diagnostics"),
                  rate=_rate, num=_num)
    return HTMLResponse(html, headers=HEADERS)
