"""Declarative source profiles: how a city's export maps onto the canonical incident table.

A profile is a TOML (or YAML) file; the built-in ones live in ``features/profiles``. Any other city is
supported by writing one, without code.
"""

from __future__ import annotations

import tomllib
from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile file is missing or malformed."""


class ColumnsSpec(BaseModel):
    id: str | None = Field(None, description="Event id column; None derives a stable id from row content.")
    category: str


class TimeSpec(BaseModel):
    kind: Literal["datetime", "date_hour"] = "datetime"
    column: str
    hour_column: str | None = None
    formats: list[str] = Field(default_factory=lambda: ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S"])
    date_is_utc: bool = Field(False, description="The date column is local midnight written in UTC.")
    earliest: date | None = Field(None, description="Times before this are outside the source's coverage.")

    @model_validator(mode="after")
    def _hour_needed(self) -> "TimeSpec":
        if self.kind == "date_hour" and not self.hour_column:
            raise ValueError("time.kind = 'date_hour' needs time.hour_column")
        return self


class CoordinatesSpec(BaseModel):
    x: str = Field(description="Longitude or projected easting column.")
    y: str = Field(description="Latitude or projected northing column.")
    crs: str = "EPSG:4326"

    @property
    def is_geographic(self) -> bool:
        return self.crs.upper() in {"EPSG:4326", "WGS84", "OGC:CRS84"}


class AreaSpec(BaseModel):
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="lon_min, lat_min, lon_max, lat_max in WGS84; points outside are out_of_area."
    )
    sentinels: list[tuple[float, float]] = Field(default_factory=list, description="(lat, lon) placeholder points.")
    sentinel_tolerance_deg: float = 1e-4

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not (v[0] < v[2] and v[1] < v[3]):
            raise ValueError("area.bbox must be [lon_min, lat_min, lon_max, lat_max]")
        return v


class CategoriesSpec(BaseModel):
    map: dict[str, str] = Field(description="raw category -> canonical category (matched case-insensitively).")
    exclude: list[str] = Field(default_factory=list, description="Raw categories deliberately left out.")

    @property
    def canonical(self) -> list[str]:
        return sorted(set(self.map.values()))


class SourceProfile(BaseModel):
    name: str
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

    def required_columns(self) -> list[str]:
        cols = [self.time.column, self.columns.category, self.coordinates.x, self.coordinates.y]
        if self.time.hour_column:
            cols.append(self.time.hour_column)
        if self.columns.id:
            cols.insert(0, self.columns.id)
        return list(dict.fromkeys(cols))

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


def load_profile(name_or_path: str | Path) -> SourceProfile:
    """Load a built-in profile by name (``chicago``) or any profile file by path."""
    builtins = builtin_profiles()
    path = builtins.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise ProfileError(
            f"no profile {str(name_or_path)!r}: not a built-in ({', '.join(builtins)}) and no such file"
        )
    try:
        if path.suffix.lower() in {".yaml", ".yml"}:
            raw = yaml.safe_load(path.read_text())
        else:
            raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ProfileError(f"profile {path} is not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    try:
        return SourceProfile(**raw, path=path)
    except ValidationError as exc:
        raise ProfileError(f"profile {path} is invalid:\n{exc}") from exc
