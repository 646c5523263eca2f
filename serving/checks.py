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


# Per-format bounds of a hotspots request (documented in the README and the OpenAPI description). JSON and GeoJSON
# return up to every cell, but only the first EXPLAINED_CELLS carry top features: LightGBM's pred_contrib costs
# about 1 ms a cell, and a city-wide request must not cost seconds of CPU. The PNG numbers every cell on an A4
# map: beyond PNG_MAX_K the ranks are unreadable.
EXPLAINED_CELLS = 100
PNG_MAX_K = 200


def check_k(panel: CountPanel, k: int | None, coverage: float | None, max_k: int | None = None) -> None:
    """``max_k``: the format's own bound (the PNG's), below the study area's cells."""
    if k is not None and coverage is not None:
        raise FieldError("coverage", "k and coverage are mutually exclusive: give one of them")
    if k is not None and not 1 <= k <= panel.n_cells:
        raise FieldError("k", f"must be between 1 and {panel.n_cells} (the study area's cells), got {k}")
    if k is not None and max_k is not None and k > max_k:
        raise FieldError("k", f"the briefing PNG shows at most {max_k} cells, got {k}: ask for fewer, or use "
                              f"/v1/hotspots or /v1/hotspots.geojson (up to all {panel.n_cells} cells)")


def check_selected(n_cells: int, coverage: float | None, max_k: int | None) -> None:
    """A coverage may select more cells than the format shows (known only once the forecast ranks them)."""
    if max_k is not None and n_cells > max_k:
        raise FieldError("coverage", f"coverage {coverage} selects {n_cells} cells; the briefing PNG shows at most "
                                     f"{max_k}: ask for a smaller coverage, or use /v1/hotspots.geojson")
