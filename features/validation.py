"""Validate raw rows into canonical incidents; every row is either kept or quarantined with one reason.

The checks run as vectorised polars expressions. A row failing several checks gets the first reason in
``REASONS`` order, so each row is counted exactly once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from features.calendar import localize
from features.profile import SourceProfile

if TYPE_CHECKING:
    from polars.expr.whenthen import ChainedThen, Then

CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "incident_id": pl.String(),
    "occurred_at": pl.Datetime("us", "UTC"),
    "timezone": pl.String(),
    "category": pl.String(),
    "latitude": pl.Float64(),
    "longitude": pl.Float64(),
    "source": pl.String(),
}

VALIDATION_REASONS: tuple[str, ...] = (
    "missing_id",
    "missing_time",
    "unparseable_time",
    "future_time",
    "before_coverage",
    "missing_coordinates",
    "invalid_coordinates",
    "sentinel_point",
    "out_of_area",
    "excluded_category",
    "unknown_category",
    "duplicate_id",
)
# rows refused while the file is read, before validation (features/csvfile.py): they have no reliable values
READ_REASONS: tuple[str, ...] = (
    "truncated_row",  # the file's last line ends mid-row (no line end, too few fields or an open quote)
    "malformed_row",  # a line with an unmatched quote: its fields cannot be told apart
)
REASONS: tuple[str, ...] = VALIDATION_REASONS + READ_REASONS

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "source_row": pl.UInt32(),
    "reason": pl.String(),
    "raw_id": pl.String(),
    "raw_time": pl.String(),
    "raw_category": pl.String(),
    "raw_x": pl.String(),
    "raw_y": pl.String(),
}


@dataclass(frozen=True)
class ValidationResult:
    incidents: pl.DataFrame  # CANONICAL_SCHEMA
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA

    def reason_counts(self) -> dict[str, int]:
        return reason_counts(self.quarantine)


def reason_counts(quarantine: pl.DataFrame) -> dict[str, int]:
    """Rows per reason, in REASONS order (the order the summary prints)."""
    counts = dict(quarantine.group_by("reason").len().iter_rows()) if quarantine.height else {}
    return {r: int(counts[r]) for r in REASONS if r in counts}


def _blank_to_null(expr: pl.Expr | pl.Series) -> pl.Expr:
    text = expr.cast(pl.String).str.strip_chars()
    return pl.when(text == "").then(None).otherwise(text)


def _parse_time(frame: pl.DataFrame, profile: SourceProfile) -> pl.Series:
    spec = profile.time
    column = frame.get_column(spec.column)
    tz = profile.timezone
    if isinstance(column.dtype, pl.Datetime):
        if column.dtype.time_zone:
            return column.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        return frame.select(localize(pl.col(spec.column).dt.cast_time_unit("us"), tz)).to_series()
    text = _blank_to_null(pl.col(spec.column))
    if spec.kind == "datetime":
        parsed = pl.coalesce([text.str.strptime(pl.Datetime("us"), fmt, strict=False) for fmt in spec.formats])
        return frame.select(localize(parsed, tz)).to_series()
    # date_hour: a date (possibly local midnight written in UTC) plus a local hour column
    if spec.hour_column is None:  # the profile refuses date_hour without one
        raise ValueError("time.kind = 'date_hour' needs time.hour_column")
    dtype = pl.Datetime("us", "UTC") if spec.date_is_utc else pl.Datetime("us")
    day = pl.coalesce([text.str.strptime(dtype, fmt, strict=False) for fmt in spec.formats])
    if spec.date_is_utc:
        day = day.dt.convert_time_zone(tz).dt.replace_time_zone(None)
    hour = _blank_to_null(pl.col(spec.hour_column)).cast(pl.Float64, strict=False)
    hour_ok = hour.is_between(0, 23) & (hour == hour.floor())
    naive = pl.when(hour_ok).then(day.dt.truncate("1d") + pl.duration(hours=hour.cast(pl.Int64)))
    return frame.select(localize(naive, tz)).to_series()


def _coordinates(frame: pl.DataFrame, profile: SourceProfile) -> tuple[pl.Series, pl.Series]:
    spec = profile.coordinates
    xy = frame.select(
        _blank_to_null(pl.col(spec.x)).cast(pl.Float64, strict=False).alias("x")
        if frame.schema[spec.x] == pl.String
        else pl.col(spec.x).cast(pl.Float64).alias("x"),
        _blank_to_null(pl.col(spec.y)).cast(pl.Float64, strict=False).alias("y")
        if frame.schema[spec.y] == pl.String
        else pl.col(spec.y).cast(pl.Float64).alias("y"),
    )
    if spec.is_geographic:
        return xy["x"].alias("longitude"), xy["y"].alias("latitude")
    from pyproj import Transformer

    transformer = Transformer.from_crs(spec.crs, "EPSG:4326", always_xy=True)
    x = xy["x"].to_numpy(allow_copy=True).astype(float)
    y = xy["y"].to_numpy(allow_copy=True).astype(float)
    lon, lat = transformer.transform(x, y)
    nulls = xy["x"].is_null() | xy["y"].is_null()
    lon = pl.Series("longitude", lon).set(nulls, None) if nulls.any() else pl.Series("longitude", lon)
    lat = pl.Series("latitude", lat).set(nulls, None) if nulls.any() else pl.Series("latitude", lat)
    return lon, lat


def _stable_ids(frame: pl.DataFrame, profile: SourceProfile) -> pl.Series:
    """Ids for sources that publish none: a digest of the row's content plus its ordinal among identical rows,
    so re-ingesting the same file yields the same ids and genuine repeats stay distinct."""
    cols = [c for c in profile.required_columns()]
    content = frame.select(pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in cols], separator="|")).to_series()
    uniques = content.unique()
    digests = pl.DataFrame(
        {"content": uniques, "digest": [hashlib.blake2b(s.encode(), digest_size=8).hexdigest() for s in uniques]}
    )
    keyed = pl.DataFrame({"content": content}).join(digests, on="content", how="left", maintain_order="left")
    return keyed.select(
        (pl.col("digest") + "-" + pl.int_range(pl.len()).over("content").cast(pl.String)).alias("incident_id")
    ).to_series()


def _normalise_category(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.String).str.strip_chars().str.to_uppercase()


def validate(
    frame: pl.DataFrame,
    profile: SourceProfile,
    *,
    now: datetime | None = None,
    future_tolerance: timedelta = timedelta(hours=1),
    boundary=None,
) -> ValidationResult:
    """Split raw rows (from :func:`features.ingest.read_raw`) into canonical incidents and quarantine.

    ``boundary`` is an optional shapely (multi)polygon in WGS84: points outside it are out_of_area.
    """
    now = now or datetime.now(timezone.utc)
    spec = profile.columns
    raw_id = (
        _blank_to_null(pl.col(spec.id)).alias("incident_id")
        if spec.id
        else pl.lit(None, pl.String).alias("incident_id")
    )
    work = frame.select(
        "source_row",
        raw_id,
        _blank_to_null(pl.col(profile.time.column)).alias("raw_time"),
        _blank_to_null(pl.col(spec.category)).alias("raw_category"),
        _blank_to_null(pl.col(profile.coordinates.x)).alias("raw_x"),
        _blank_to_null(pl.col(profile.coordinates.y)).alias("raw_y"),
    )
    if profile.time.hour_column:
        work = work.with_columns(
            pl.concat_str(
                [pl.col("raw_time"), _blank_to_null(frame.get_column(profile.time.hour_column)).alias("h")],
                separator=" h",
                ignore_nulls=True,
            ).alias("raw_time")
        )
    if not spec.id:
        work = work.with_columns(_stable_ids(frame, profile))
    lon, lat = _coordinates(frame, profile)
    work = work.with_columns(_parse_time(frame, profile).alias("occurred_at"), lon, lat)

    cats = profile.categories
    mapping = {k.strip().upper(): v for k, v in cats.map.items()}
    excluded = [c.strip().upper() for c in cats.exclude]
    category = _normalise_category(pl.col("raw_category"))
    work = work.with_columns(category.replace_strict(mapping, default=None, return_dtype=pl.String).alias("category"))

    earliest = profile.time.earliest
    local_date = pl.col("occurred_at").dt.convert_time_zone(profile.timezone).dt.date()
    lat_c, lon_c = pl.col("latitude"), pl.col("longitude")
    coords_finite = lat_c.is_finite() & lon_c.is_finite()
    checks: list[tuple[str, pl.Expr]] = [
        ("missing_id", pl.col("incident_id").is_null()),
        ("missing_time", pl.col("raw_time").is_null()),
        ("unparseable_time", pl.col("occurred_at").is_null()),
        ("future_time", pl.col("occurred_at") > pl.lit(now + future_tolerance).dt.convert_time_zone("UTC")),
        ("before_coverage", local_date < earliest if earliest else pl.lit(False)),
        ("missing_coordinates", pl.col("raw_x").is_null() | pl.col("raw_y").is_null()),
        (
            "invalid_coordinates",
            lat_c.is_null() | lon_c.is_null() | ~coords_finite | ~lat_c.is_between(-90, 90) | ~lon_c.is_between(-180, 180) | ((lat_c == 0) & (lon_c == 0)),
        ),
    ]
    tol = profile.area.sentinel_tolerance_deg
    sentinel = pl.lit(False)
    for s_lat, s_lon in profile.area.sentinels:
        sentinel = sentinel | (((lat_c - s_lat).abs() < tol) & ((lon_c - s_lon).abs() < tol))
    checks.append(("sentinel_point", sentinel))
    outside = pl.lit(False)
    if profile.area.bbox:
        x0, y0, x1, y1 = profile.area.bbox
        outside = ~(lon_c.is_between(x0, x1) & lat_c.is_between(y0, y1))
    if boundary is not None:
        outside = outside | ~pl.lit(_inside_boundary(work, boundary))
    checks.append(("out_of_area", outside))
    checks.append(("excluded_category", category.is_in(excluded) if excluded else pl.lit(False)))
    checks.append(("unknown_category", pl.col("category").is_null()))

    reason: Then | ChainedThen = pl.when(checks[0][1]).then(pl.lit(checks[0][0]))
    for name, failed in checks[1:]:
        reason = reason.when(failed).then(pl.lit(name))
    work = work.with_columns(reason.otherwise(None).alias("reason"))

    # duplicate ids among otherwise-valid rows: the first in file order is kept
    work = work.with_columns(
        pl.when(pl.col("reason").is_null() & ~pl.col("incident_id").is_first_distinct().over(pl.col("reason").is_null()))
        .then(pl.lit("duplicate_id"))
        .otherwise(pl.col("reason"))
        .alias("reason")
    )
    incidents = work.filter(pl.col("reason").is_null()).select(
        "incident_id",
        "occurred_at",
        pl.lit(profile.timezone).alias("timezone"),
        "category",
        "latitude",
        "longitude",
        pl.lit(profile.name).alias("source"),
    )
    quarantine = work.filter(pl.col("reason").is_not_null()).select(
        pl.col("source_row").cast(pl.UInt32), "reason", pl.col("incident_id").alias("raw_id"),
        "raw_time", "raw_category", "raw_x", "raw_y",
    )
    return ValidationResult(incidents=incidents.cast(CANONICAL_SCHEMA),  # type: ignore[arg-type]  # polars#14468: dict keys
                            quarantine=quarantine.cast(QUARANTINE_SCHEMA))  # type: ignore[arg-type]  # polars#14468


def _inside_boundary(work: pl.DataFrame, boundary) -> pl.Series:
    """Point-in-polygon for every row with usable coordinates (others are caught by earlier checks)."""
    import shapely

    lon = work["longitude"].fill_null(np.nan).to_numpy()
    lat = work["latitude"].fill_null(np.nan).to_numpy()
    usable = np.isfinite(lon) & np.isfinite(lat)
    inside = np.ones(work.height, dtype=bool)
    shapely.prepare(boundary)
    inside[usable] = shapely.contains_xy(boundary, lon[usable], lat[usable])
    return pl.Series("inside", inside)
