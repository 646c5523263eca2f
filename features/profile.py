"""Declarative source profiles: how a city's export maps onto the canonical incident table.

A profile is a TOML (or YAML) file; the built-in ones live in ``features/profiles``. Any other city is
supported by writing one, without code.
"""

from __future__ import annotations

import re
import tomllib
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile file is missing or malformed."""


class ColumnsSpec(BaseModel):
    id: str | None = Field(None, description="Event id column; None derives a stable id from row content.")
    category: str


ISO8601 = "iso8601"  # a format keyword: ISO 8601 with or without a fraction, an offset or Z
AWARE_DIRECTIVES = ("%z", "%:z", "%#z", "%::z", "%+")
ISO8601_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z",
                   "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d")


def expand_formats(formats: list[str]) -> list[str]:
    """The chrono formats a profile's list stands for (the ``iso8601`` keyword is several)."""
    out: list[str] = []
    for fmt in formats:
        out += list(ISO8601_FORMATS) if fmt.strip().lower() == ISO8601 else [fmt]
    return list(dict.fromkeys(out))


def is_aware_format(fmt: str) -> bool:
    """Formats with an offset directive give instants; the others give local wall-clock times."""
    return any(d in fmt for d in AWARE_DIRECTIVES)


class PartsSpec(BaseModel):
    """Split date columns: year, month and day, optionally hour, minute and second (local time)."""

    model_config = ConfigDict(extra="forbid")
    year: str
    month: str
    day: str
    hour: str | None = None
    minute: str | None = None
    second: str | None = None

    def columns(self) -> list[str]:
        return [c for c in (self.year, self.month, self.day, self.hour, self.minute, self.second) if c]


class TimeSpec(BaseModel):
    """Where an incident's time is. ``kind``:

    - ``datetime``: one column parsed with ``formats`` (chrono strftime, as polars uses; ``iso8601`` is a keyword)
    - ``date_hour``: a date column (``formats``) plus an hour column (0-23)
    - ``date_time``: a date column (``formats``) plus a time-of-day column (``time_formats``)
    - ``parts``: split columns (``parts.year``, ``.month``, ``.day``, optional ``.hour``, ``.minute``, ``.second``)
    - ``epoch``: seconds or milliseconds since 1970-01-01 UTC (``epoch_unit``)
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["datetime", "date_hour", "date_time", "parts", "epoch"] = "datetime"
    column: str | None = None
    hour_column: str | None = None
    time_column: str | None = None
    formats: list[str] = Field(default_factory=lambda: ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", ISO8601])
    time_formats: list[str] = Field(default_factory=lambda: ["%H:%M:%S", "%H:%M", "%H%M"])
    parts: PartsSpec | None = None
    epoch_unit: Literal["s", "ms"] = "s"
    date_is_utc: bool = Field(False, description="The date column is local midnight written in UTC.")
    earliest: date | None = Field(None, description="Times before this are outside the source's coverage.")

    @model_validator(mode="after")
    def _columns_for_kind(self) -> TimeSpec:
        if self.kind == "parts":
            if self.parts is None:
                raise ValueError("time.kind = 'parts' needs [time.parts] with year, month and day columns")
        elif not self.column:
            raise ValueError(f"time.kind = {self.kind!r} needs time.column")
        if self.kind == "date_hour" and not self.hour_column:
            raise ValueError("time.kind = 'date_hour' needs time.hour_column")
        if self.kind == "date_time" and not self.time_column:
            raise ValueError("time.kind = 'date_time' needs time.time_column")
        if not self.formats:
            raise ValueError("time.formats is empty: give at least one format such as '%Y-%m-%d %H:%M:%S'")
        return self

    def columns(self) -> list[str]:
        """Every column the time is read from, in order."""
        if self.kind == "parts":
            return self.parts.columns()  # type: ignore[union-attr]
        extra = {"date_hour": self.hour_column, "date_time": self.time_column}.get(self.kind)
        return [c for c in (self.column, extra) if c]


GEOGRAPHIC = {"EPSG:4326", "WGS84", "OGC:CRS84"}


def check_crs(value: str) -> str:
    """The CRS as pyproj knows it, or a one-line problem with the fix (``EPSG:102696`` is ``ESRI:102696``)."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(value)
        return value
    except CRSError:
        pass
    code = value.split(":", 1)[-1].strip()
    for other in ("ESRI", "EPSG"):
        candidate = f"{other}:{code}"
        if candidate.upper() != value.upper():
            try:
                found = CRS.from_user_input(candidate)
            except CRSError:
                continue
            raise ValueError(f"pyproj does not know CRS {value!r}, but {candidate!r} exists ({found.name}): "
                             f"write crs = {candidate!r}")
    raise ValueError(f"pyproj does not know CRS {value!r}: give an authority code such as 'EPSG:2263' or "
                     f"'ESRI:102696' (see https://epsg.io), or a WKT/PROJ string")


class CoordinatesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: str = Field(description="Longitude or projected easting column.")
    y: str = Field(description="Latitude or projected northing column.")
    crs: str = "EPSG:4326"

    @field_validator("crs")
    @classmethod
    def _known_crs(cls, v: str) -> str:
        return v if v.upper() in GEOGRAPHIC else check_crs(v)

    @property
    def is_geographic(self) -> bool:
        return self.crs.upper() in GEOGRAPHIC


class AreaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="lon_min, lat_min, lon_max, lat_max in WGS84; points outside are out_of_area."
    )
    sentinels: list[tuple[float, float]] = Field(default_factory=list, description="(lat, lon) placeholder points.")
    sentinel_tolerance_deg: float = 1e-4
    outliers: Literal["auto", "off"] = Field(
        "auto", description="Without a bbox or boundary, quarantine points far outside the bulk of the data as "
        "out_of_area (features/area_rule.py).")
    outlier_factor: float = Field(4.0, gt=1, description="A point is far when its distance from the median point "
                                  "exceeds this factor times the 95th percentile distance.")

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not (v[0] < v[2] and v[1] < v[3]):
            raise ValueError("area.bbox must be [lon_min, lat_min, lon_max, lat_max]")
        return v


def glob_to_regex(pattern: str) -> str:
    """``THEFT*`` -> ``^THEFT.*$`` for polars' (Rust) regex: only ``*`` and ``?`` are wildcards."""
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return f"^{body}$"


class CategoryRule(BaseModel):
    """One pattern rule, tried in order after the exact ``map``: exactly one of prefix, glob or regex."""

    model_config = ConfigDict(extra="forbid")
    prefix: str | None = None
    glob: str | None = None
    regex: str | None = None
    category: str | None = Field(None, description="Canonical category; omit with exclude = true.")
    exclude: bool = Field(False, description="Matching values are excluded_category instead.")

    @model_validator(mode="after")
    def _one_pattern(self) -> CategoryRule:
        given = [k for k in ("prefix", "glob", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a category rule needs exactly one of prefix, glob or regex (got {given or 'none'})")
        if (self.category is None) == (not self.exclude):
            raise ValueError("a category rule needs either category = '...' or exclude = true")
        if self.regex is not None:
            import polars as pl

            try:
                pl.Series([""]).str.contains(self.regex)
            except pl.exceptions.PolarsError as exc:
                raise ValueError(f"regex {self.regex!r} is not valid: {str(exc).splitlines()[-1].strip()}") from None
        return self

    def pattern(self, case_sensitive: bool) -> str:
        """The rule as one anchored regex on the normalised value."""
        if self.prefix is not None:
            rx = "^" + re.escape(self.prefix if case_sensitive else self.prefix.upper())
        elif self.glob is not None:
            rx = glob_to_regex(self.glob if case_sensitive else self.glob.upper())
        elif self.regex is not None:
            rx = self.regex if case_sensitive else f"(?i){self.regex}"
        else:  # the validator refuses a rule without one
            raise ValueError("a category rule needs exactly one of prefix, glob or regex")
        return rx


class CategoriesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    map: dict[str, str] = Field(default_factory=dict, description="raw category -> canonical category.")
    rules: list[CategoryRule] = Field(default_factory=list, description="Patterns tried in order after map.")
    default: str | None = Field(None, description="Category for values nothing matches (else unknown_category).")
    exclude: list[str] = Field(default_factory=list, description="Raw categories deliberately left out.")
    case_sensitive: bool = Field(False, description="Match case as written (default: ignore case).")
    collapse_whitespace: bool = Field(True, description="Trim and collapse runs of spaces before matching.")

    @model_validator(mode="after")
    def _something_maps(self) -> CategoriesSpec:
        if not self.map and not any(r.category for r in self.rules) and not self.default:
            raise ValueError("no category is defined: give [categories.map], [[categories.rules]] or categories.default")
        return self

    @property
    def canonical(self) -> list[str]:
        names = set(self.map.values()) | {r.category for r in self.rules if r.category}
        if self.default:
            names.add(self.default)
        return sorted(names)


Op = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null", "not_null"]


class RowRule(BaseModel):
    """Keep or exclude rows by another column: ``{name = "reversal", column = "count", op = "<", value = 0}``.
    Excluded rows (and, for ``action = "keep"``, rows that do not match) are quarantined as
    ``excluded_row:<name>``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Names the rule in the quarantine reason.")
    column: str
    op: Op = "=="
    value: Any = None
    action: Literal["exclude", "keep"] = "exclude"

    @model_validator(mode="after")
    def _value_fits_op(self) -> RowRule:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"row rule {self.name!r}: op {self.op!r} needs value = [a list]")
        if self.op in ("is_null", "not_null"):
            if self.value is not None:
                raise ValueError(f"row rule {self.name!r}: op {self.op!r} takes no value")
        elif self.value is None:
            raise ValueError(f"row rule {self.name!r}: op {self.op!r} needs a value")
        if self.op in ("<", "<=", ">", ">=") and not isinstance(self.value, (int, float)):
            raise ValueError(f"row rule {self.name!r}: op {self.op!r} compares numbers; value must be a number")
        return self

    @property
    def reason(self) -> str:
        return f"excluded_row:{self.name}"


class SourceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The source name in the store.")
    description: str = ""
    licence: str = ""
    timezone: str
    encoding: str = "utf-8"
    delimiter: str = Field(",", description="Field separator of CSV exports: one character such as ',', ';' or '\\t'.")
    columns: ColumnsSpec
    time: TimeSpec
    coordinates: CoordinatesSpec
    area: AreaSpec = Field(default_factory=AreaSpec)
    categories: CategoriesSpec
    rows: list[RowRule] = Field(default_factory=list, description="Keep or exclude rows by any column.")
    path: Path | None = Field(None, exclude=True, description="Where the profile was read from.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r}") from exc
        return v

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, v: str) -> str:
        if len(v) != 1 or v in {'"', "\n", "\r"}:
            raise ValueError(f"delimiter must be one character other than a quote or a line end, not {v!r}")
        return v

    @model_validator(mode="after")
    def _unique_rule_names(self) -> SourceProfile:
        names = [r.name for r in self.rows]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"row rule name(s) {twice} used more than once: give each rule its own name")
        return self

    def required_columns(self) -> list[str]:
        cols = [*self.time.columns(), self.columns.category, self.coordinates.x, self.coordinates.y]
        cols += [r.column for r in self.rows]
        if self.columns.id:
            cols.insert(0, self.columns.id)
        return list(dict.fromkeys(cols))

    def to_toml(self) -> str:
        """The resolved profile as TOML (what is remembered beside the store)."""
        import tomli_w

        raw = self.model_dump(mode="json", exclude_none=True, exclude={"path"})
        return tomli_w.dumps(raw)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"built-in profile {self.name!r}"

    @property
    def is_builtin(self) -> bool:
        """Shipped inside the package: users copy it rather than edit it (an upgrade would undo the edit)."""
        return self.path is None or self.path.resolve().parent == PROFILE_DIR.resolve()

    def how_to_change(self, change: str) -> str:
        """Advice to make ``change`` (e.g. "set delimiter = ';'") where the user can: never in the package."""
        if self.is_builtin:
            source = f" ({self.path})" if self.path else ""
            return (f"copy the built-in profile {self.name!r}{source} to a file of your own, {change} in the copy "
                    f"and pass it with --profile")
        return f"{change} in {self.path}"


def builtin_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "model-"))) or "(top level)"


def explain(exc: ValidationError, where: str) -> str:
    """A pydantic error as one line per problem: "profile F: field X: problem; fix"."""
    lines = []
    for err in exc.errors():
        loc = _field(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        kind = err["type"]
        if kind == "missing":
            fix = f"add {loc.split('.')[-1]} = ... (see the profile reference in the README)"
        elif kind == "extra_forbidden":
            fix = "remove it or check its spelling against the profile reference in the README"
            msg = "not a profile field"
        elif kind in ("string_type", "list_type", "dict_type", "int_type", "float_type", "bool_type", "literal_error",
                      "string_pattern_mismatch"):
            given = err.get("input")
            fix = f"the value {given!r} has the wrong shape" + (
                "; for split date columns use time.kind = 'parts' with [time.parts]" if loc.startswith("time.") and
                isinstance(given, list) else "")
        else:
            fix = ""
        lines.append(f"profile {where}: field {loc}: {msg}" + (f"; {fix}" if fix else ""))
    return "\n".join(lines)


def profile_from_text(text: str, path: Path, suffix: str | None = None) -> SourceProfile:
    suffix = (suffix or path.suffix).lower()
    try:
        raw = yaml.safe_load(text) if suffix in {".yaml", ".yml"} else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ProfileError(f"profile {path} is not valid {suffix.lstrip('.').upper() or 'TOML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path} is not a table of fields: start from the README's profile reference")
    try:
        return SourceProfile(**raw, path=path)
    except ValidationError as exc:
        raise ProfileError(explain(exc, str(path))) from None
    except TypeError as exc:
        raise ProfileError(f"profile {path}: {exc}") from None


def load_profile(name_or_path: str | Path, remembered: Path | None = None) -> SourceProfile:
    """Load a built-in profile by name (``chicago``), any profile file by path, or (``remembered``: a data
    folder's ``profiles/``) the profile last ingested under that source name."""
    builtins = builtin_profiles()
    path = builtins.get(str(name_or_path), Path(name_or_path))
    if not path.is_file() and remembered is not None and (remembered / f"{name_or_path}.toml").is_file():
        path = remembered / f"{name_or_path}.toml"
    if not path.is_file():
        known = f"; remembered sources: {', '.join(sorted(p.stem for p in remembered.glob('*.toml')))}" if (
            remembered is not None and remembered.is_dir() and any(remembered.glob("*.toml"))) else ""
        raise ProfileError(
            f"no profile {str(name_or_path)!r}: not a built-in ({', '.join(builtins)}), not a file and not a "
            f"source ingested before{known}; give a profile file (`hotspots profile init EXPORT` drafts one)"
        )
    return profile_from_text(path.read_text(), path)
