"""The other forecast parameters checked against the city's panel and champion, each failure a 422 naming the
parameter (before any model runs where the panel alone can tell)."""

from __future__ import annotations

from features.panel import CountPanel
from serving.errors import FieldError
from serving.models_store import LoadedModel


def check_category(panel: CountPanel, requested: str | None, city: str) -> None:
    """Reject names the panel does not know (before any model is needed)."""
    if requested is not None and requested != "all" and requested not in panel.categories:
        raise FieldError("category", f"unknown category {requested!r}; {city} has {', '.join(panel.categories)} "
                                     f"(or 'all')")


def resolve_category(model: LoadedModel, requested: str | None, city: str) -> str:
    target = model.target
    if requested is None or requested == target:
        return target
    raise FieldError("category", f"the champion model for {city} (version {model.version}) forecasts {target!r}; "
                                 f"there is no model for {requested!r}")


def check_k(panel: CountPanel, k: int | None, coverage: float | None) -> None:
    if k is not None and coverage is not None:
        raise FieldError("coverage", "k and coverage are mutually exclusive: give one of them")
    if k is not None and not 1 <= k <= panel.n_cells:
        raise FieldError("k", f"must be between 1 and {panel.n_cells} (the study area's cells), got {k}")
