"""Settings of the web service (``HOTSPOTS_*`` environment variables), beside the project's
:class:`features.settings.Settings` (data folder, MLflow URI, resolution, shifts)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOTSPOTS_", extra="ignore", protected_namespaces=())

    model_refresh_seconds: float = Field(
        60.0, ge=0, description="How often (at most) a request re-reads the registry for new champions and the "
                                "panels folder for new or updated panels; 0 checks on every request.",
    )
    forecast_cache_size: int = Field(256, ge=1, description="Forecasts kept in memory (LRU).")
    default_k: int = Field(20, ge=1, description="Hotspots returned when neither k nor coverage is given.")
    map_tile_url: str | None = Field(
        None, pattern=r"^https?://[^\s]*\{z\}[^\s]*$",
        description="Slippy-map tile template for the /map page's base map, e.g. "
                    "https://tile.openstreetmap.org/{z}/{x}/{y}.png ({s} becomes 'a'). Unset: no base map and the "
                    "page makes no request outside the service.",
    )
