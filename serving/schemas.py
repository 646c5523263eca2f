"""Pydantic models of every request (query parameters) and response of the API.

Responses carry places and numbers only: cells, expected counts, percentiles, feature contributions, model
versions. No model here has room for an incident, a person, an address or a time of an event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.accuracy_schemas import AccuracyRecord
from serving.card_schemas import ModelCard

# --- errors -------------------------------------------------------------------------------------------


class ErrorMessage(BaseModel):
    detail: str = Field(..., description="What went wrong and, where there is one, what to do about it.")


class FieldProblem(BaseModel):
    loc: list[str | int] = Field(..., description="Where the bad value is, e.g. ['query', 'k'].")
    field: str = Field(..., description="The parameter at fault.")
    msg: str = Field(..., description="Message, starting with the parameter's name.")
    type: str


class ValidationErrorMessage(BaseModel):
    detail: list[FieldProblem]


# --- query parameters ---------------------------------------------------------------------------------

ShiftParam = Field(
    "next",
    description="'next' (the next shift after now; the first shift after the data when the panel ends before "
                "that) or the ISO 8601 start of a shift, e.g. 2020-02-10T14:00:00-05:00 (without an offset: city "
                "local time).",
    max_length=64,
)


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(..., min_length=1, max_length=100, description="City (source) name, see /v1/cities.")
    shift: str = ShiftParam
    category: str | None = Field(
        None, max_length=100,
        description="What is forecast: the champion model's target ('all' categories unless it was trained on one).",
    )


class ForecastQuery(_Query):
    pass


class HotspotsQuery(_Query):
    k: int | None = Field(None, ge=1, description="Number of top cells; default 20. JSON and GeoJSON: up to every "
                                                  "study-area cell, the first 100 with top features (the rest carry "
                                                  "an empty list); PNG: up to 200 (a printable map).")
    coverage: float | None = Field(
        None, gt=0, le=1,
        description="Share of the study area's area to flag (0 < coverage <= 1): the top cells whose cumulative "
                    "area first reaches it. Exclusive with k.",
    )


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1, le=1000, description="Entries to return, newest first.")
    before_id: int | None = Field(None, ge=1, le=2**63 - 1, description="Only entries older than this id (paging).")


# --- probes -------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class CityReadiness(BaseModel):
    city: str
    ready: bool
    status: str = Field(..., description="ready, no_champion, registry_unreachable, load_failed or panel_error.")
    model_name: str
    model_version: str | None
    model_source: Literal["registry", "local_fallback"] | None = Field(
        None, description="local_fallback: loaded from the last-good copy on disk because the registry was unreachable."
    )
    message: str | None = None
    degraded: bool = Field(False, description="A drift alarm fired (README: Accuracy record and drift): still "
                                              "served, but the realised accuracy or the data moved.")
    degraded_reasons: list[str] = Field(default_factory=list, description="Each fired alarm's reason.")


class Readiness(BaseModel):
    ready: bool = Field(..., description="At least one city can be served.")
    registry_reachable: bool | None
    registry_error: str | None = None
    cities: list[CityReadiness]
    status: Literal["ready", "degraded", "not_ready"] = Field(
        "ready", description="degraded: a ready city has a drift alarm (see its degraded_reasons).")


# --- cities -------------------------------------------------------------------------------------------


class City(BaseModel):
    city: str
    ready: bool
    model_version: str | None
    model_target: str | None = Field(None, description="The category the champion forecasts ('all' for every one).")
    timezone: str
    shift_starts: list[str] = Field(..., description="Local start times of the shifts (HH:MM).")
    categories: list[str]
    h3_resolution: int
    n_cells: int
    area_km2: float
    data_start: datetime | None = Field(None, description="Start of the first shift of the panel (local time).")
    data_end: datetime | None = Field(None, description="End of the panel's data = start of the first shift after it.")


class CityList(BaseModel):
    cities: list[City]


# --- forecasts ----------------------------------------------------------------------------------------


class ShiftWindow(BaseModel):
    shift_id: int
    requested: str = Field(..., description="The shift parameter as given.")
    start: datetime = Field(..., description="Shift start, local time with its UTC offset.")
    end: datetime = Field(..., description="Shift end, local time with its UTC offset.")
    hours: float
    timezone: str
    after_data: bool = Field(
        False,
        description="True when 'next' was asked but the panel ends before now: the forecast is for the first "
                    "shift after the data (update the panel to forecast the real next shift).",
    )


class ModelRef(BaseModel):
    name: str
    version: str
    source: Literal["registry", "local_fallback"]
    target: str = Field(..., description="The category the model forecasts ('all' for every one).")


class LatLon(BaseModel):
    lat: float
    lon: float


class Contribution(BaseModel):
    feature: str
    contribution: float = Field(..., description="LightGBM pred_contrib on the log scale of the expected count.")


class CellLocation(BaseModel):
    lat: float = Field(..., description="Latitude of the cell's centre (WGS84).")
    lon: float = Field(..., description="Longitude of the cell's centre (WGS84).")
    nearest_area: str | None = Field(None, description="The area containing the centre or, outside every area, the "
                                                       "closest one (None without an area layer).")
    distance_km: float = Field(0.0, description="Distance from the centre to nearest_area (0 inside it).")
    text: str = Field(..., description="Human-readable: '43.65612, -79.38037 · in Moss Park' or '... · near X "
                                       "(0.4 km)' or '... · unnamed area'.")


class Hotspot(BaseModel):
    rank: int = Field(..., ge=1)
    h3: str
    expected_count: float
    risk_percentile: float = Field(
        ..., description="Share (%) of study-area cells whose expected count is at most this cell's.")
    centroid: LatLon
    area_km2: float
    cumulative_area_share: float = Field(..., description="Area of the cells ranked 1..rank over the study area.")
    top_features: list[Contribution] = Field(..., description="The 3 largest feature contributions (by size); "
                                                              "empty after the first 100 ranks.")
    area_name: str | None = Field(None, description="Neighbourhood / community area containing the cell's centre "
                                                    "(None outside every area or without an area layer).")
    location: CellLocation | None = Field(None, description="Where the cell is, for a person: centre and nearest area.")
    geo_uri: str | None = Field(None, description="RFC 5870 geo: URI of the centre ('open in a map app').")


class Selection(BaseModel):
    k: int | None = Field(None, description="k as asked (or the default).")
    coverage: float | None = Field(None, description="coverage as asked.")
    n_cells: int = Field(..., description="Cells returned.")
    explained_cells: int = Field(..., description="The first cells that carry top features (at most 100); later "
                                                  "cells have an empty top_features list.")
    area_km2: float
    area_share: float = Field(..., description="Their area over the study area's (>= coverage when coverage is asked).")
    expected_share: float = Field(..., description="Their expected count over the study area's.")
    study_area_cells: int
    study_area_km2: float


class ForecastContext(BaseModel):
    city: str
    category: str
    shift: ShiftWindow
    model: ModelRef
    data_end: datetime = Field(..., description="The forecast uses data up to here (local time).")


class HotspotsResponse(ForecastContext):
    selection: Selection
    explanation_scale: str = "log expected count (LightGBM pred_contrib; plus a bias term, omitted)"
    hotspots: list[Hotspot]


class CellForecast(BaseModel):
    h3: str
    expected_count: float


class ForecastResponse(ForecastContext):
    n_cells: int
    expected_total: float
    cells: list[CellForecast]


# --- GeoJSON (RFC 7946) -------------------------------------------------------------------------------


class Polygon(BaseModel):
    type: Literal["Polygon"] = "Polygon"
    coordinates: list[list[tuple[float, float]]] = Field(
        ..., description="One closed, counter-clockwise exterior ring of [longitude, latitude] positions.")


class HotspotProperties(Hotspot):
    model_version: str
    shift_start: datetime
    shift_end: datetime


class HotspotFeature(BaseModel):
    type: Literal["Feature"] = "Feature"
    id: str
    geometry: Polygon
    properties: HotspotProperties


class HotspotCollection(BaseModel):
    type: Literal["FeatureCollection"] = "FeatureCollection"
    features: list[HotspotFeature]
    # a foreign member (RFC 7946 section 6.1): the context of the whole collection
    hotspots: HotspotsMeta


class HotspotsMeta(ForecastContext):
    selection: Selection


# --- models -------------------------------------------------------------------------------------------


class Promotion(BaseModel):
    decision: str | None = Field(None, description="promoted or rejected (tag promotion_decision).")
    reason: str | None = Field(None, description="Tag promotion_reason.")
    detail: Any | None = Field(None, description="Tag promotion_detail, parsed from JSON.")


class ModelVersionInfo(BaseModel):
    version: str
    status: str | None
    created_at: datetime | None
    run_id: str | None
    aliases: list[str]
    is_champion: bool
    promotion: Promotion
    tags: dict[str, str]


class ModelsResponse(BaseModel):
    city: str
    registered_name: str
    registered: bool
    champion_version: str | None
    loaded_version: str | None = Field(None, description="The version the service is serving now.")
    loaded_source: Literal["registry", "local_fallback"] | None = None
    versions: list[ModelVersionInfo]
    hint: str | None = None
    card: ModelCard | None = Field(None, description="The champion's record: backtest against every baseline, "
                                                     "claim verdicts, diagnostics and bias audit.")
    accuracy: AccuracyRecord | None = Field(None, description="Realised accuracy of the served flags against the "
                                                              "backtest and the strongest baseline, with drift alarms.")


# --- audit --------------------------------------------------------------------------------------------


class AuditEntry(BaseModel):
    id: int
    at: datetime
    key_id: str
    role: str
    endpoint: str
    params: dict[str, Any]
    city: str | None
    model_version: str | None
    response_bytes: int


class AuditList(BaseModel):
    entries: list[AuditEntry]
    limit: int
    next_before_id: int | None = Field(None, description="Pass as before_id for the next (older) page.")


HotspotCollection.model_rebuild()


# --- map page: forecastable shifts and the study area's outline ----------------------------------------


class ShiftsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    around: str = Field(
        "next", max_length=64,
        description="The shift to centre the list on: 'next' (as in /v1/hotspots) or the ISO 8601 start of a shift.",
    )
    n: int = Field(6, ge=0, le=42, description="Shifts to list before and after it (as far as the panel allows).")


class ShiftOption(BaseModel):
    shift_id: int
    shift: str = Field(..., description="The value to pass as `shift` to the forecast endpoints: 'next' for the "
                                        "centre shift when around='next', else its ISO 8601 local start.")
    start: datetime = Field(..., description="Shift start, local time with its UTC offset.")
    end: datetime = Field(..., description="Shift end, local time with its UTC offset.")
    hours: float
    label: str = Field(..., description="The shift of day by its local start (HH:MM).")
    offset: int = Field(..., description="Shifts from the centre shift (negative: before it).")


class ShiftList(BaseModel):
    city: str
    timezone: str
    around: str = Field(..., description="The around parameter as given.")
    centre_shift_id: int
    after_data: bool = Field(False, description="As in /v1/hotspots: 'next' is the first shift after the data.")
    first_start: datetime = Field(..., description="Earliest shift start the service can forecast (local time).")
    last_start: datetime = Field(..., description="Latest one: the first shift after the data (local time).")
    shifts: list[ShiftOption] = Field(..., description="Chronological.")


class MultiPolygon(BaseModel):
    type: Literal["MultiPolygon"] = "MultiPolygon"
    coordinates: list[list[list[tuple[float, float]]]] = Field(
        ..., description="Polygons, each a list of closed rings of [longitude, latitude] positions (RFC 7946).")


class NamedArea(BaseModel):
    name: str
    outline: MultiPolygon = Field(..., description="The area's outline, clipped to the study area's surroundings "
                                                   "and simplified to about 20 m.")
    label_at: LatLon = Field(..., description="Where to write the name (inside the area).")
    n_cells: int = Field(..., description="Study-area cells whose centre lies in the area.")


class AreaLayer(BaseModel):
    city: str
    source: Literal["file", "shared_layer", "toronto_wheel", "none"] = Field(
        ..., description="file: the operator's boundary file (setting area_layer); shared_layer: the city's layer "
                         "in the shared data folder; toronto_wheel: neighbourhoods named by the Toronto wheel's "
                         "incidents (point majority per cell); none: unnamed areas.")
    description: str
    message: str | None = Field(None, description="Why a configured boundary file was not used.")
    areas: list[NamedArea]


class StudyAreaOutline(BaseModel):
    city: str
    h3_resolution: int
    n_cells: int
    area_km2: float
    bbox: tuple[float, float, float, float] = Field(..., description="[west, south, east, north] in degrees.")
    outline: MultiPolygon = Field(..., description="The union of the study area's cells.")


# --- patrol log ---------------------------------------------------------------------------------------
# Only cells, minutes and the shift: no unit names, officers or notes (no free text, no personal data).

MAX_PATROLS_PER_REQUEST = 20_000


class PatrolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    h3: str = Field(..., min_length=1, max_length=32, examples=["892b9bc2a6bffff"],
                    description="H3 id of a cell of the city's study area (at the service's resolution).")
    dose_minutes: float = Field(..., gt=0, allow_inf_nan=False, strict=True, examples=[45.0],
                                description="Minutes of patrol presence in the cell during the shift "
                                            "(0 < dose <= the shift's length in minutes).")


class PatrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(..., min_length=1, max_length=100, description="City (source) name, see /v1/cities.")
    shift: datetime = Field(
        ..., examples=["2020-02-10T14:00:00-05:00"],
        description="ISO 8601 start of the patrolled shift (without an offset: city local time): any shift from "
                    "the panel's first one up to the next shift after now.",
    )
    patrols: list[PatrolEntry] = Field(..., min_length=1, max_length=MAX_PATROLS_PER_REQUEST,
                                       description="One entry per cell (no duplicates).")


class PatrolShift(BaseModel):
    shift_id: int
    start: datetime = Field(..., description="Shift start, local time with its UTC offset.")
    end: datetime = Field(..., description="Shift end, local time with its UTC offset.")
    hours: float
    timezone: str


class PatrolReceipt(BaseModel):
    city: str
    shift: PatrolShift
    count: int = Field(..., description="Rows stored (one per cell).")
    total_minutes: float
    recorded_at: datetime = Field(..., description="When they were stored (UTC).")


class PatrolQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(..., min_length=1, max_length=100, description="City (source) name, see /v1/cities.")
    start: datetime | None = Field(None, description="Only shifts starting at or after this (ISO 8601; without an "
                                                     "offset: city local time).")
    end: datetime | None = Field(None, description="Only shifts starting before this.")
    limit: int = Field(10_000, ge=1, le=100_000, description="Rows (shift x cell) to return, oldest shift first.")


class PatrolTotal(BaseModel):
    shift_id: int
    shift_start: datetime = Field(..., description="Local time with its UTC offset.")
    h3: str
    dose_minutes: float = Field(..., description="Sum of every report for this shift and cell.")


class PatrolTotals(BaseModel):
    city: str
    start: datetime | None
    end: datetime | None
    count: int = Field(..., description="Rows returned (shift x cell).")
    total_minutes: float = Field(..., description="Sum of dose_minutes over the rows returned.")
    truncated: bool = Field(..., description="True when more rows match: narrow start/end or raise limit.")
    patrols: list[PatrolTotal]


# --- human oversight: flagged cells not patrolled ------------------------------------------------------
# A reason from a fixed list, and for 'other' a short code from the agency's own list: never free text.

OverrideReason = Literal["other_priorities", "no_access", "no_resources", "safety", "other"]


class OverrideEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    h3: str = Field(..., min_length=1, max_length=32, examples=["892b9bc2a6bffff"],
                    description="H3 id of the flagged cell that was not patrolled.")
    reason: OverrideReason = Field(..., description="other_priorities (calls or incidents elsewhere), no_access "
                                                    "(road works, closures), no_resources (no unit free), safety, "
                                                    "or other (with a code).")
    code: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,23}$", examples=["flooding"],
                             description="With reason 'other' only, and then required: a short code from the "
                                         "agency's own list (lower-case letters, digits, _; at most 24), not a "
                                         "sentence.")

    @model_validator(mode="after")
    def _code_with_other(self) -> OverrideEntry:
        if self.reason == "other" and self.code is None:
            raise ValueError("code: reason 'other' needs a short code (e.g. 'flooding'); no free text is stored")
        if self.reason != "other" and self.code is not None:
            raise ValueError(f"code: only reason 'other' takes a code; drop it or use reason 'other' "
                             f"(got reason {self.reason!r})")
        return self


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(..., min_length=1, max_length=100, description="City (source) name, see /v1/cities.")
    shift: datetime = Field(..., examples=["2020-02-10T14:00:00-05:00"],
                            description="ISO 8601 start of the shift (as for POST /v1/patrols).")
    overrides: list[OverrideEntry] = Field(..., min_length=1, max_length=MAX_PATROLS_PER_REQUEST,
                                           description="One entry per cell (no duplicates).")


class OverrideReceipt(BaseModel):
    city: str
    shift: PatrolShift
    count: int = Field(..., description="Rows stored (one per cell).")
    by_reason: dict[str, int]
    recorded_at: datetime = Field(..., description="When they were stored (UTC).")


class OverrideReasonCount(BaseModel):
    reason: str
    code: str | None
    count: int
    share_of_flags: float


class OverrideSummaryResponse(BaseModel):
    city: str
    start: datetime | None
    end: datetime | None
    flags: int = Field(..., description="Flagged cell-shifts accounted for: a patrol dose or an override recorded.")
    not_patrolled: int = Field(..., description="Of them, recorded as not patrolled (first override per cell-shift).")
    share_not_patrolled: float | None
    by_reason: list[OverrideReasonCount]
    contradicted: int = Field(..., description="Overridden cell-shifts that also have patrol minutes recorded.")
    flags_source: str
