"""What to fix when an ingest stores nothing: the most common reason and the profile field behind it."""

from __future__ import annotations

import polars as pl

from features.profile import SourceProfile, expand_formats
from features.validation import ROW_RULE_PREFIX

FIELD_OF_REASON: dict[str, str] = {
    "missing_id": "columns.id (the id column; omit it to derive ids from each row's content)",
    "missing_time": "time.column (the column holding the time)",
    "unparseable_time": "time.formats (chrono formats such as '%Y-%m-%d %H:%M:%S', or 'iso8601')",
    "future_time": "timezone or time.formats (day and month swapped?)",
    "before_coverage": "time.earliest",
    "missing_coordinates": "coordinates.x and coordinates.y (columns with no location, or (0, 0) placeholders)",
    "invalid_coordinates": "coordinates.crs (or x and y swapped)",
    "sentinel_point": "area.sentinels",
    "out_of_area": "area.bbox (lon_min, lat_min, lon_max, lat_max in WGS84) or coordinates.crs",
    "excluded_category": "categories.exclude",
    "unknown_category": "categories.map, categories.rules or categories.default",
    "duplicate_id": "columns.id (a column that is unique per incident)",
    "truncated_row": "nothing in the profile: the export file is cut off; export it again",
    "malformed_row": "nothing in the profile: the export has broken quotes; export it again",
}


def field_of(reason: str) -> str:
    if reason.startswith(ROW_RULE_PREFIX):
        return f"rows (the rule named {reason[len(ROW_RULE_PREFIX):]!r} leaves these rows out)"
    return FIELD_OF_REASON.get(reason, "the profile")


def nothing_stored_hint(profile: SourceProfile, file_name: str, input_rows: int, reasons: dict[str, int],
                        quarantine: pl.DataFrame, unmapped: dict[str, int]) -> str:
    """One line: why nothing was stored and which field to change (with what the data looks like)."""
    if input_rows == 0:
        return f"{file_name} has a header but no rows: nothing to ingest; export the incidents again (check its date filter)"
    reason, n = max(reasons.items(), key=lambda kv: kv[1])
    hint = (f"nothing stored from {file_name}: {n:,} of {input_rows:,} rows are {reason}; "
            f"fix {field_of(reason)} in {profile.where}")
    if reason == "unparseable_time":
        samples = quarantine.filter(pl.col("reason") == reason)["raw_time"].drop_nulls().head(3).to_list()
        hint += (f"; the values look like {', '.join(repr(s) for s in samples)}, "
                 f"tried formats {expand_formats(profile.time.formats)}")
        from features.profile_assistant import detect_time_format

        found = detect_time_format(pl.Series(samples, dtype=pl.String))
        if found:
            hint += f"; these parse with formats = {found}"
    elif reason == "unknown_category" and unmapped:
        hint += "; unmapped values " + ", ".join(f"{k!r} ({v:,})" for k, v in list(unmapped.items())[:5])
    elif reason in ("out_of_area", "invalid_coordinates"):
        samples = quarantine.filter(pl.col("reason") == reason).select("raw_x", "raw_y").head(2).rows()
        hint += f"; e.g. x, y = {', '.join(f'({x}, {y})' for x, y in samples)} with crs = {profile.coordinates.crs!r}"
    return hint + (f" (`hotspots profile check {profile.where} {file_name}` shows samples)" if profile.path else "")
