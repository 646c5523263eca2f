"""Named area layers for the bias audit: which file, layer, group columns, table and split variable.

The shipped presets point into the shared data folder (``HOTSPOTS_SHARED_DATA``, default ``../shared/data``);
any other city is an :class:`AreaLayerSpec` built in code or read from a TOML table with the same fields::

    [area]
    path = "areas/mycity.gpkg"
    layer = "tracts"
    total = "pop_total"
    split = "poverty_rate"
    split_label = "poverty rate"
    [area.groups]
    white = "pop_white"
    black = "pop_black"
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

from features.grid import StudyArea
from features.settings import Settings
from forecasting.area_join import AreaJoin, AreaJoinError, join_file


def shared_data_dir() -> Path:
    """The one shared-data setting (HOTSPOTS_SHARED_DATA), default ../shared/data beside the checkout."""
    configured = Settings().shared_data_dir
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class AreaLayerSpec:
    """One city's population layer. ``groups`` maps an output name to a column or an expression of columns;
    ``partition`` lists the mutually exclusive groups (for majority-group assignment), default all groups;
    ``split`` is an intensive variable (a rate) whose population-weighted quintiles form a second split,
    quintile 5 being the highest value."""

    name: str
    path: str
    groups: Mapping[str, str]
    layer: str | None = None
    total: str | None = None
    table: str | None = None
    key: str | None = None
    table_key: str | None = None
    split: str | None = None
    split_label: str = ""
    partition: tuple[str, ...] | None = None
    group_label: str = "group"
    description: str = ""
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    label: str | None = None  # the column naming each area (the service's map shows it)

    @overload
    def resolve(self, relative: str, base: Path | None) -> Path: ...
    @overload
    def resolve(self, relative: str | None, base: Path | None) -> Path | None: ...
    def resolve(self, relative: str | None, base: Path | None) -> Path | None:
        if relative is None:
            return None
        path = Path(relative)
        return path if path.is_absolute() else (base or shared_data_dir()) / path

    def join(self, study_area: StudyArea, base: Path | None = None) -> AreaJoin:
        """Join this layer to the study area's cells (the split variable as an intensive variable)."""
        result = join_file(
            self.resolve(self.path, base), study_area, dict(self.groups), layer=self.layer, total=self.total,
            intensive=[self.split] if self.split else (), table=self.resolve(self.table, base), key=self.key,
            table_key=self.table_key,
        )
        result.meta["preset"] = self.name
        return result

    @classmethod
    def from_toml(cls, path: str | Path, name: str | None = None) -> AreaLayerSpec:
        raw = tomllib.loads(Path(path).read_text())
        area = raw.get("area", raw)
        allowed = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(area) - allowed
        if unknown:
            raise AreaJoinError(f"unknown area-layer field(s) {sorted(unknown)} in {path}; allowed: {sorted(allowed)}")
        if "path" not in area or "groups" not in area:
            raise AreaJoinError(f"{path} needs at least 'path' and an [area.groups] table")
        area = {**area, "partition": tuple(area["partition"]) if "partition" in area else None,
                "notes": tuple(area.get("notes", ()))}
        return cls(name=name or Path(path).stem, **area)


PRESETS: dict[str, AreaLayerSpec] = {
    "chicago-community-areas": AreaLayerSpec(
        name="chicago-community-areas",
        path="areas/chicago.gpkg",
        layer="community_areas_cmap_acs2015_19",
        groups={"white": "WHITE", "black": "BLACK", "hispanic": "HISP", "asian": "ASIAN", "other": "OTHER"},
        total="TOT_POP",
        table="areas/chicago_community_area_demographics.csv",
        key="ca_num",
        split="hardship_index_2008_12",
        split_label="hardship index (2008-12)",
        group_label="race/ethnicity",
        description="77 community areas, ACS 2015-19 (CMAP): mutually exclusive White, Black, Hispanic, Asian, "
                    "other (non-Hispanic groups); hardship index 2008-12 from the community-area table.",
        source="CMAP Community Data Snapshots (ACS 2015-19); City of Chicago socioeconomic indicators 2008-12",
        notes=("Hardship (2008-12) predates the population counts (2015-19) by about seven years.",),
        label="community",
    ),
    "toronto-neighbourhoods": AreaLayerSpec(
        name="toronto-neighbourhoods",
        path="areas/toronto.gpkg",
        layer="neighbourhoods_140_with_2016",
        groups={
            "visible_minority": "vismin_total",
            "black": "black",
            "visible_minority_not_black": "vismin_total - black",
            "not_visible_minority": "vismin_denominator - vismin_total",
        },
        total="vismin_denominator",
        split="pct_low_income_limat",
        split_label="low-income rate (LIM-AT, 2016)",
        partition=("black", "visible_minority_not_black", "not_visible_minority"),
        group_label="visible-minority group",
        description="140 neighbourhoods, 2016 census profile: visible minority (Black included), Black, "
                    "visible minority other than Black and not a visible minority (derived), out of the "
                    "private-household population; low-income rate (LIM-AT).",
        source="City of Toronto neighbourhood profiles 2016 (Statistics Canada census)",
        notes=("Statistics Canada rounds counts to 5, so derived groups can be off by a few people.",),
        label="HOOD",
    ),
}


def get_preset(name: str) -> AreaLayerSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise AreaJoinError(f"unknown area preset {name!r}; presets: {sorted(PRESETS)}") from None


# the shipped layer of each built-in source, audited by default when its file is present
SOURCE_PRESETS = {"chicago": "chicago-community-areas", "toronto-mci": "toronto-neighbourhoods"}


def default_layer(source: str) -> AreaLayerSpec | None:
    """The source's shipped area layer when its file is on this machine (HOTSPOTS_SHARED_DATA), else None."""
    name = SOURCE_PRESETS.get(source)
    if name is None:
        return None
    spec = PRESETS[name]
    return spec if spec.resolve(spec.path, None).is_file() else None
