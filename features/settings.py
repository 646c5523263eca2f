"""Settings from a TOML config file and ``HOTSPOTS_*`` environment variables.

Precedence (highest first): explicit keyword arguments, environment variables, the config file
(``HOTSPOTS_CONFIG`` or ``./hotspots.toml``), then the defaults below.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_FILE = "hotspots.toml"


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the ``[hotspots]`` table (or the top level) of the config file."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        path = Path(os.environ.get("HOTSPOTS_CONFIG", DEFAULT_CONFIG_FILE))
        self._data: dict[str, Any] = {}
        if path.is_file():
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
            self._data = raw.get("hotspots", raw)

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSPOTS_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Incident store, quarantine, panels and reports live here.")
    shared_data_dir: Path | None = Field(
        None, validation_alias=AliasChoices("HOTSPOTS_SHARED_DATA", "shared_data_dir"),
        description="Folder of real open data and area layers (env HOTSPOTS_SHARED_DATA, e.g. ../shared/data): "
                    "tests, benchmarks and the shipped bias-audit presets read it.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default is an embedded SQLite store in data_dir."
    )
    h3_resolution: int = Field(9, ge=0, le=15, description="H3 resolution of the forecasting grid.")
    shift_starts: Annotated[list[str], NoDecode] = Field(
        ["06:00", "14:00", "22:00"], description="Local start times of the patrol shifts (HH:MM)."
    )
    future_tolerance_minutes: int = Field(
        60, description="Incidents later than now + this are quarantined as future_time."
    )
    socrata_app_token: str | None = Field(None, description="App token for the Socrata API (optional).")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the service's database (API keys, audit log, patrol log), e.g. "
                          "postgresql+psycopg://user:password@host:5432/db; default: SQLite at data_dir/serving.db.",
    )

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
        return (init_settings, env_settings, _TomlSource(settings_cls))

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
