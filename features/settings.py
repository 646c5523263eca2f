"""The project's one settings object: a TOML config file and ``HOTSPOTS_*`` environment variables.

Precedence (highest first): explicit keyword arguments, environment variables, the config file
(``HOTSPOTS_CONFIG`` or ``./hotspots.toml``; its ``[hotspots]`` table, or its top level), then the defaults below.
It sits at the bottom of the layers because every stage needs it: the data folder, the grid, the shifts, MLflow,
the service.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = "hotspots.toml"
TABLE = "hotspots"

# MLflow 3 sends usage telemetry to its vendor by default. A police deployment's tracking must stay on its own
# machines (and work offline), so the product turns it off before any MLflow call; a user who wants it sets
# MLFLOW_DISABLE_TELEMETRY=false (or DO_NOT_TRACK) explicitly.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow also draws a tqdm bar on stderr for every artifact download, terminal or not: each model a service loaded
# wrote a line of carriage-return frames into its log. The product logs its own stages instead; a user who wants
# the bar sets MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _config_source(settings_cls: type[BaseSettings]) -> TomlConfigSettingsSource:
    """pydantic-settings' TOML source on the configured file, reading the ``[hotspots]`` table when there is one."""
    path = Path(os.environ.get("HOTSPOTS_CONFIG", DEFAULT_CONFIG_FILE))
    header: tuple[str, ...] = ()
    if path.is_file():
        with path.open("rb") as fh:
            header = (TABLE,) if TABLE in tomllib.load(fh) else ()
    return TomlConfigSettingsSource(settings_cls, toml_file=path, toml_table_header=header)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSPOTS_", extra="ignore", protected_namespaces=())

    # --- data and grid ---------------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Incident store, quarantine, panels and reports live here.")
    shared_data_dir: Path | None = Field(
        None, validation_alias=AliasChoices("HOTSPOTS_SHARED_DATA", "shared_data_dir"),
        description="Folder of real open data and area layers (env HOTSPOTS_SHARED_DATA, e.g. ../shared/data): "
                    "tests, benchmarks and the shipped bias-audit presets read it.",
    )
    h3_resolution: int = Field(9, ge=0, le=15, description="H3 resolution of the forecasting grid.")
    shift_starts: Annotated[list[str], NoDecode] = Field(
        ["06:00", "14:00", "22:00"], description="Local start times of the patrol shifts (HH:MM) for new panels; "
                                                 "a saved panel keeps the shifts it was built with."
    )
    future_tolerance_minutes: int = Field(
        60, description="Incidents later than now + this are quarantined as future_time."
    )
    socrata_app_token: str | None = Field(None, description="App token for the Socrata API (optional).")
    update_drop_dir: Path | None = Field(
        None, description="Folder `hotspots update` takes new export files from when --drop-dir is not given.")
    update_overlap_days: float = Field(
        7.0, ge=0, description="`hotspots update` pulls from the API starting this long before the last stored "
                               "time, so late and revised rows are read again.")

    # --- tracking ------------------------------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default is an embedded SQLite store in data_dir."
    )

    # --- scale-out ------------------------------------------------------------------------------------------
    dask_scheduler: str | None = Field(
        None, description="Address of a Dask scheduler (e.g. tcp://10.0.0.5:8786; env HOTSPOTS_DASK_SCHEDULER): "
                          "long commands run their tasks on that cluster (extra `dask`). Unset: everything runs "
                          "in this process.",
    )

    # --- the service ---------------------------------------------------------------------------------------
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the service's database (API keys, audit log, patrol log), e.g. "
                          "postgresql+psycopg://user:password@host:5432/db; default: SQLite at data_dir/serving.db.",
    )
    model_refresh_seconds: float = Field(
        60.0, ge=0, description="How often (at most) the service re-reads, in the background, the registry for new "
                                "champions and the panels folder for new or updated panels; 0: as often as every 0.25 s.",
    )
    forecast_cache_size: int = Field(256, ge=1, description="Forecasts kept in memory (LRU).")
    default_k: int = Field(20, ge=1, description="Hotspots returned when neither k nor coverage is given.")
    map_tile_url: str | None = Field(
        None, pattern=r"^https?://[^\s]*\{z\}[^\s]*$",
        description="Slippy-map tile template for the /map page's base map, e.g. "
                    "https://tile.openstreetmap.org/{z}/{x}/{y}.png ({s} becomes 'a'). Unset: no base map and the "
                    "page makes no request outside the service.",
    )

    area_layer: Path | None = Field(
        None, description="Boundary file (GeoJSON, GeoPackage, shapefile) whose polygons name the map's areas "
                          "(neighbourhoods, districts); `hotspots serve --areas FILE`. Unset: the city's shipped "
                          "layer under shared_data_dir, for toronto-mci the installed wheel's neighbourhoods, "
                          "else unnamed areas.",
    )
    area_layer_name: str | None = Field(None, description="Layer of area_layer to read (GeoPackage); default: the first.")
    area_name_column: str | None = Field(
        None, description="Column of area_layer holding the area names; default: a column called name, "
                          "neighbourhood, community, ... or else the first text column.",
    )
    # --- realised accuracy and drift alarms (README: "Accuracy record and drift") ------------------------------
    accuracy_window_days: int = Field(28, ge=1, description="Days of served shifts the rolling realised accuracy pools.")
    drift_min_shifts: int = Field(
        21, ge=1, description="Scored shifts the rolling window needs before a low realised hit rate raises the alarm.")
    drift_recent_days: int = Field(28, ge=1, description="Latest days of the panel whose incidents the volume and "
                                                         "category-mix checks compare ...")
    drift_reference_days: int = Field(182, ge=1, description="... with the days just before them.")
    drift_volume_change: float = Field(
        0.35, gt=0, description="The volume alarm fires when the daily incident rate moves by more than this share "
                                "(0.35: +-35%) against the reference days.")
    drift_mix_distance: float = Field(
        0.10, gt=0, le=1, description="The category-mix alarm fires when the category shares move by more than this "
                                      "total variation distance (half the sum of absolute share changes).")

    @field_validator("shift_starts", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _config_source(settings_cls))

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_dir(self) -> Path:
        return (self.data_dir / "mlartifacts").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
