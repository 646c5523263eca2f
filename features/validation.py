"""Validate raw rows into canonical incidents; every row is either kept or quarantined with one reason.

The checks run as vectorised polars expressions. A row failing several checks gets the first reason in
``REASONS`` order, so each row is counted exactly once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from features.area_rule import FixedBulk, far_from_bulk, span_note
from features.calendar import localize
from features.profile import RowRule, SourceProfile, expand_formats, is_aware_format

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
# rows left out by a profile's row rule: ``excluded_row:<rule name>`` (checked before every other reason)
ROW_RULE_PREFIX = "excluded_row:"
UNMAPPED_SHOWN = 20


def is_known_reason(reason: str) -> bool:
    return reason in REASONS or (reason.startswith(ROW_RULE_PREFIX) and len(reason) > len(ROW_RULE_PREFIX))

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
class ChunkContext:
    """What a chunk's validation needs to know about the rest of its file, so that every verdict is the one a
    whole-file validation gives: the far-from-bulk rule measured on the whole file's usable points, the ids
    kept by earlier chunks (later copies are duplicate_id), and for derived ids the count of identical rows
    before the chunk. With ``usable_only`` validation stops early and
    returns the usable points (latitude, longitude) as ``incidents``: the first pass that measures the rule.
    Chunk results carry every unmapped value (the caller keeps the top ones) and no span note (the caller
    writes it from the whole file's extent)."""

    area: FixedBulk = field(default_factory=lambda: FixedBulk(None, None))
    seen: pl.Series | None = None
    usable_only: bool = False
    before: pl.DataFrame | None = None  # derived ids: (digest, n) identical rows in earlier chunks


@dataclass(frozen=True)
class ValidationResult:
    incidents: pl.DataFrame  # CANONICAL_SCHEMA
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA
    notes: list[str] = field(default_factory=list)  # warnings in plain words (points far from the bulk, ...)
    unmapped: dict[str, int] = field(default_factory=dict)  # category values no map entry or rule matched

    def reason_counts(self) -> dict[str, int]:
        return reason_counts(self.quarantine)


def reason_counts(quarantine: pl.DataFrame) -> dict[str, int]:
    """Rows per reason: row rules first (as they are checked first), then REASONS order (the order the summary
    prints)."""
    counts = dict(quarantine.group_by("reason").len().iter_rows()) if quarantine.height else {}
    rules = sorted(r for r in counts if r.startswith(ROW_RULE_PREFIX))
    return {r: int(counts[r]) for r in (*rules, *REASONS) if r in counts}


def _blank_to_null(expr: pl.Expr | pl.Series) -> pl.Expr:
    text = expr.cast(pl.String).str.strip_chars()
    return pl.when(text == "").then(None).otherwise(text)


def _strptime_any(text: pl.Expr, formats: list[str], tz: str) -> pl.Expr:
    """Instants (UTC) from text tried against every format: formats with an offset (``%z``, ``%#z`` ...) give
    instants; the others give local wall-clock times in ``tz``."""
    formats = expand_formats(formats)
    aware = [text.str.strptime(pl.Datetime("us", "UTC"), f, strict=False) for f in formats if is_aware_format(f)]
    naive = [text.str.strptime(pl.Datetime("us"), f, strict=False) for f in formats if not is_aware_format(f)]
    parsed = aware + ([localize(pl.coalesce(naive), tz)] if naive else [])
    return pl.coalesce(parsed)


def _local_day(text: pl.Expr, formats: list[str]) -> pl.Expr:
    """A local calendar day (naive midnight) from a date column, whatever time or offset the text carries."""
    formats = expand_formats(formats)
    tries = [text.str.strptime(pl.Datetime("us", "UTC"), f, strict=False).dt.replace_time_zone(None)
             if is_aware_format(f) else text.str.strptime(pl.Datetime("us"), f, strict=False) for f in formats]
    return pl.coalesce(tries).dt.truncate("1d")


def _whole_number(expr: pl.Expr, low: int, high: int) -> pl.Expr:
    """An integer column (text such as '7' or '7.0') within [low, high], else null."""
    value = _blank_to_null(expr).cast(pl.Float64, strict=False)
    return pl.when(value.is_between(low, high) & (value == value.floor())).then(value.cast(pl.Int64))


def _parse_time(frame: pl.DataFrame, profile: SourceProfile) -> pl.Series:
    spec = profile.time
    tz = profile.timezone
    if spec.column is not None and spec.kind in ("datetime", "epoch"):
        column = frame.get_column(spec.column)
        if isinstance(column.dtype, pl.Datetime):
            if column.dtype.time_zone:
                return column.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
            return frame.select(localize(pl.col(spec.column).dt.cast_time_unit("us"), tz)).to_series()
    if spec.kind == "parts":
        parts = spec.parts
        assert parts is not None
        year = _whole_number(pl.col(parts.year), 1000, 9999)
        month = _whole_number(pl.col(parts.month), 1, 12)
        day = _whole_number(pl.col(parts.day), 1, 31)
        hour = _whole_number(pl.col(parts.hour), 0, 23) if parts.hour else pl.lit(0, pl.Int64)
        minute = _whole_number(pl.col(parts.minute), 0, 59) if parts.minute else pl.lit(0, pl.Int64)
        second = _whole_number(pl.col(parts.second), 0, 59) if parts.second else pl.lit(0, pl.Int64)
        pad = [e.cast(pl.String).str.zfill(2) for e in (month, day, hour, minute, second)]
        text = pl.format("{}-{}-{} {}:{}:{}", year.cast(pl.String), *pad)
        naive = text.str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S", strict=False)  # 30 Feb -> null
        return frame.select(localize(naive, tz)).to_series()
    if spec.column is None:  # the profile refuses every other kind without one
        raise ValueError(f"time.kind = {spec.kind!r} needs time.column")
    if spec.kind == "epoch":
        number = pl.col(spec.column).cast(pl.Float64, strict=False) if frame.schema[spec.column] != pl.String \
            else _blank_to_null(pl.col(spec.column)).cast(pl.Float64, strict=False)
        micros = (number * (1_000_000 if spec.epoch_unit == "s" else 1_000)).round(0).cast(pl.Int64, strict=False)
        return frame.select(pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC")).to_series()
    text = _blank_to_null(pl.col(spec.column))
    if spec.kind == "datetime":
        return frame.select(_strptime_any(text, spec.formats, tz)).to_series()
    if spec.kind == "date_time":
        if spec.time_column is None:  # the profile refuses date_time without one
            raise ValueError("time.kind = 'date_time' needs time.time_column")
        day = _local_day(text, spec.formats)
        clock = _blank_to_null(pl.col(spec.time_column))
        time_of_day = pl.coalesce([clock.str.strptime(pl.Time, f, strict=False) for f in spec.time_formats])
        return frame.select(localize(day.dt.combine(time_of_day), tz)).to_series()
    # date_hour: a date (possibly local midnight written in UTC) plus a local hour column
    if spec.hour_column is None:  # the profile refuses date_hour without one
        raise ValueError("time.kind = 'date_hour' needs time.hour_column")
    dtype = pl.Datetime("us", "UTC") if spec.date_is_utc else pl.Datetime("us")
    day = pl.coalesce([text.str.strptime(dtype, fmt, strict=False) for fmt in expand_formats(spec.formats)])
    if spec.date_is_utc:
        day = day.dt.convert_time_zone(tz).dt.replace_time_zone(None)
    hour = _blank_to_null(pl.col(spec.hour_column)).cast(pl.Float64, strict=False)
    hour_ok = hour.is_between(0, 23) & (hour == hour.floor())
    naive = pl.when(hour_ok).then(day.dt.truncate("1d") + pl.duration(hours=hour.cast(pl.Int64)))
    return frame.select(localize(naive, tz)).to_series()


def raw_time_expr(profile: SourceProfile) -> pl.Expr:
    """The time as the file wrote it, for the quarantine: one column, or the time columns joined."""
    spec = profile.time
    if spec.kind == "date_hour" and spec.column is not None and spec.hour_column is not None:  # as the profile checks
        return pl.concat_str([_blank_to_null(pl.col(spec.column)), _blank_to_null(pl.col(spec.hour_column))],
                             separator=" h", ignore_nulls=True)
    columns = spec.columns()
    if len(columns) == 1:
        return _blank_to_null(pl.col(columns[0]))
    joined = pl.concat_str([_blank_to_null(pl.col(c)) for c in columns], separator=" ", ignore_nulls=True)
    return pl.when(joined == "").then(None).otherwise(joined)


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


def stable_digests(frame: pl.DataFrame, profile: SourceProfile) -> pl.Series:
    """A digest of each row's content (the profile's columns): identical rows share it."""
    cols = [c for c in profile.required_columns()]
    content = frame.select(pl.concat_str([pl.col(c).cast(pl.String).fill_null("") for c in cols], separator="|")).to_series()
    uniques = content.unique()
    digests = pl.DataFrame(
        {"content": uniques, "digest": [hashlib.blake2b(s.encode(), digest_size=8).hexdigest() for s in uniques]}
    )
    keyed = pl.DataFrame({"content": content}).join(digests, on="content", how="left", maintain_order="left")
    return keyed["digest"]


def _stable_ids(frame: pl.DataFrame, profile: SourceProfile, before: pl.DataFrame | None = None) -> pl.Series:
    """Ids for sources that publish none: a digest of the row's content plus its ordinal among identical rows,
    so re-ingesting the same file yields the same ids and genuine repeats stay distinct. ``before``: (digest, n)
    identical rows in earlier chunks of the same file, so the ordinals run on across chunks."""
    keyed = stable_digests(frame, profile).to_frame("digest")
    if before is not None and before.height:
        keyed = keyed.join(before, on="digest", how="left", maintain_order="left").with_columns(pl.col("n").fill_null(0))
    else:
        keyed = keyed.with_columns(pl.lit(0, pl.UInt32).alias("n"))
    return keyed.select(
        (pl.col("digest") + "-" + (pl.int_range(pl.len()).over("digest") + pl.col("n")).cast(pl.String))
        .alias("incident_id")
    ).to_series()


def _normalise_category(expr: pl.Expr, case_sensitive: bool = False, collapse: bool = True) -> pl.Expr:
    text = expr.cast(pl.String).str.strip_chars()
    if collapse:
        text = text.str.replace_all(r"\s+", " ")
    return text if case_sensitive else text.str.to_uppercase()


def _normalise_value(value: str, case_sensitive: bool, collapse: bool) -> str:
    text = " ".join(value.split()) if collapse else value.strip()
    return text if case_sensitive else text.upper()


EXCLUDE = "\x00exclude"


def _categorise(raw: pl.Expr, profile: SourceProfile) -> tuple[pl.Expr, pl.Expr, pl.Expr, pl.Expr]:
    """(normalised value, canonical category or null, excluded?, unmapped?) for the raw category column: exact
    map first, then the pattern rules in order, then the default."""
    cats = profile.categories
    cs, collapse = cats.case_sensitive, cats.collapse_whitespace
    norm = _normalise_category(raw, cs, collapse)
    mapping = {_normalise_value(k, cs, collapse): v for k, v in cats.map.items()}
    matched = norm.replace_strict(mapping, default=None, return_dtype=pl.String) if mapping else pl.lit(None, pl.String)
    if cats.rules:
        first, *rest = cats.rules
        chain: Then | ChainedThen = pl.when(norm.str.contains(first.pattern(cs))).then(pl.lit(first.category or EXCLUDE))
        for rule in rest:
            chain = chain.when(norm.str.contains(rule.pattern(cs))).then(pl.lit(rule.category or EXCLUDE))
        matched = pl.coalesce(matched, chain.otherwise(None))
    listed = [_normalise_value(c, cs, collapse) for c in cats.exclude]
    excluded = (norm.is_in(listed) if listed else pl.lit(False)) | (matched == EXCLUDE).fill_null(False)
    unmapped = norm.is_not_null() & matched.is_null() & ~excluded
    category = pl.when(excluded).then(None).otherwise(pl.coalesce(matched, pl.lit(cats.default, pl.String)))
    return norm, category, excluded, unmapped


def _row_rule(frame: pl.DataFrame, rule: RowRule) -> pl.Expr:
    """True where the rule says the row is left out. A missing value never matches (except op is_null)."""
    column = pl.col(rule.column)
    text = _blank_to_null(column) if frame.schema[rule.column] == pl.String else column.cast(pl.String)
    number = text.cast(pl.Float64, strict=False)

    def side(value):
        if isinstance(value, bool):
            return text.str.to_lowercase(), pl.lit(str(value).lower())
        if isinstance(value, (int, float)):
            return number, pl.lit(float(value))
        return text, pl.lit(str(value))

    if rule.op == "is_null":
        match = text.is_null()
    elif rule.op == "not_null":
        match = text.is_not_null()
    elif rule.op in ("in", "not_in"):
        values = list(rule.value)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            inside = number.is_in([float(v) for v in values])
        else:
            inside = text.is_in([str(v) for v in values])
        match = (inside if rule.op == "in" else ~inside) & text.is_not_null()
    else:
        left, right = side(rule.value)
        ops = {"==": left == right, "!=": left != right, "<": left < right, "<=": left <= right, ">": left > right,
               ">=": left >= right}
        match = ops[rule.op]
    match = match.fill_null(False)
    return match if rule.action == "exclude" else ~match


def validate(
    frame: pl.DataFrame,
    profile: SourceProfile,
    *,
    now: datetime | None = None,
    future_tolerance: timedelta = timedelta(hours=1),
    boundary=None,
    chunk: ChunkContext | None = None,
) -> ValidationResult:
    """Split raw rows (from :func:`features.ingest.read_raw`) into canonical incidents and quarantine.

    ``boundary`` is an optional shapely (multi)polygon in WGS84: points outside it are out_of_area. ``chunk``:
    the rows are one chunk of a larger file, judged as the whole file would be (see :class:`ChunkContext`).
    """
    now = now or datetime.now(UTC)
    spec = profile.columns
    raw_id = (
        _blank_to_null(pl.col(spec.id)).alias("incident_id")
        if spec.id
        else pl.lit(None, pl.String).alias("incident_id")
    )
    work = frame.select(
        "source_row",
        raw_id,
        raw_time_expr(profile).alias("raw_time"),
        _blank_to_null(pl.col(spec.category)).alias("raw_category"),
        _blank_to_null(pl.col(profile.coordinates.x)).alias("raw_x"),
        _blank_to_null(pl.col(profile.coordinates.y)).alias("raw_y"),
        *[_row_rule(frame, rule).alias(f"_rule{i}") for i, rule in enumerate(profile.rows)],
    )
    if not spec.id:
        work = work.with_columns(_stable_ids(frame, profile, chunk.before if chunk else None))
    lon, lat = _coordinates(frame, profile)
    work = work.with_columns(_parse_time(frame, profile).alias("occurred_at"), lon, lat)

    norm, category, excluded, unmapped = _categorise(pl.col("raw_category"), profile)
    work = work.with_columns(category.alias("category"), excluded.alias("_excluded"), unmapped.alias("_unmapped"),
                             norm.alias("_norm"))

    earliest = profile.time.earliest
    local_date = pl.col("occurred_at").dt.convert_time_zone(profile.timezone).dt.date()
    lat_c, lon_c = pl.col("latitude"), pl.col("longitude")
    coords_finite = lat_c.is_finite() & lon_c.is_finite()
    # placeholders for "no location": (0, 0) as written (any CRS) or after transformation
    raw_zero = (pl.col("raw_x").cast(pl.Float64, strict=False) == 0) & (pl.col("raw_y").cast(pl.Float64, strict=False) == 0)
    placeholder = raw_zero.fill_null(False) | ((lat_c == 0) & (lon_c == 0)).fill_null(False)
    checks: list[tuple[str, pl.Expr]] = [(rule.reason, pl.col(f"_rule{i}")) for i, rule in enumerate(profile.rows)]
    checks += [
        ("missing_id", pl.col("incident_id").is_null()),
        ("missing_time", pl.col("raw_time").is_null()),
        ("unparseable_time", pl.col("occurred_at").is_null()),
        ("future_time", pl.col("occurred_at") > pl.lit(now + future_tolerance).dt.convert_time_zone("UTC")),
        ("before_coverage", local_date < earliest if earliest else pl.lit(False)),
        ("missing_coordinates", pl.col("raw_x").is_null() | pl.col("raw_y").is_null() | placeholder),
        (
            "invalid_coordinates",
            lat_c.is_null() | lon_c.is_null() | ~coords_finite | ~lat_c.is_between(-90, 90) | ~lon_c.is_between(-180, 180),
        ),
    ]
    tol = profile.area.sentinel_tolerance_deg
    sentinel = pl.lit(False)
    for s_lat, s_lon in profile.area.sentinels:
        sentinel = sentinel | (((lat_c - s_lat).abs() < tol) & ((lon_c - s_lon).abs() < tol))
    checks.append(("sentinel_point", sentinel))
    notes: list[str] = []
    outside = pl.lit(False)
    if profile.area.bbox:
        x0, y0, x1, y1 = profile.area.bbox
        outside = ~(lon_c.is_between(x0, x1) & lat_c.is_between(y0, y1))
    if boundary is not None:
        outside = outside | ~pl.lit(_inside_boundary(work, boundary))
    if profile.area.bbox is None and boundary is None and profile.area.outliers == "auto":
        # the robust default area: judged on the points every earlier check lets through
        earlier = pl.any_horizontal([failed for _, failed in checks]).fill_null(True)
        usable = work.select(~earlier).to_series().to_numpy()
        lat_np, lon_np = work["latitude"].fill_null(np.nan).to_numpy(), work["longitude"].fill_null(np.nan).to_numpy()
        if chunk is not None and chunk.usable_only:
            return ValidationResult(incidents=pl.DataFrame({"latitude": lat_np[usable], "longitude": lon_np[usable]}),
                                    quarantine=pl.DataFrame(schema=QUARANTINE_SCHEMA))
        if chunk is not None:
            rule = chunk.area.applied(lat_np, lon_np, usable)
        else:
            rule = far_from_bulk(lat_np, lon_np, usable, profile.area.outlier_factor)
            if rule.note():
                notes.append(rule.note())  # type: ignore[arg-type]
        outside = outside | pl.lit(pl.Series("far", rule.far))
    checks.append(("out_of_area", outside))
    checks.append(("excluded_category", pl.col("_excluded")))
    checks.append(("unknown_category", pl.col("category").is_null()))

    reason: Then | ChainedThen = pl.when(checks[0][1]).then(pl.lit(checks[0][0]))
    for name, failed in checks[1:]:
        reason = reason.when(failed).then(pl.lit(name))
    work = work.with_columns(reason.otherwise(None).alias("reason"))

    # duplicate ids among otherwise-valid rows: the first in file order is kept
    repeated = ~pl.col("incident_id").is_first_distinct().over(pl.col("reason").is_null())
    if chunk is not None and chunk.seen is not None:  # kept by an earlier chunk of the same file
        repeated = repeated | pl.col("incident_id").is_in(chunk.seen.implode())
    work = work.with_columns(
        pl.when(pl.col("reason").is_null() & repeated)
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
    unmapped_top = (work.filter(pl.col("_unmapped")).group_by("_norm").len()
                    .sort(["len", "_norm"], descending=[True, False]))
    if chunk is None:
        unmapped_top = unmapped_top.head(UNMAPPED_SHOWN)
    note = None if chunk else span_note(incidents["latitude"].to_numpy(), incidents["longitude"].to_numpy())
    if note:
        notes.append(note)
    return ValidationResult(incidents=incidents.cast(CANONICAL_SCHEMA),  # type: ignore[arg-type]  # polars#14468: dict keys
                            quarantine=quarantine.cast(QUARANTINE_SCHEMA),  # type: ignore[arg-type]  # polars#14468
                            notes=notes, unmapped={str(k): int(v) for k, v in unmapped_top.iter_rows()})


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
