"""Service commands: start the API and map (uvicorn), and manage its API keys."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from features.settings import Settings
from serving.cli.common import DataDir, Resolution, console, fail, project_settings

app = typer.Typer()


def ensure_planner_key(settings: Settings) -> str | None:
    """A new planner key (plaintext, to show once) when the data folder has no active one, else None."""
    from serving.keys import Role, create_key, list_keys

    if any(k.role is Role.planner and k.revoked_at is None for k in list_keys(settings)):
        return None
    return create_key(Role.planner, "planner (created by hotspots run)", settings)


def public_host(host: str) -> str:
    """The address to print for a browser: a wildcard bind is reachable on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)


def serve_forever(settings: Settings, host: str, port: int, workers: int, reload_seconds: float | None,
           access_log: bool) -> None:
    """Run uvicorn on the app factory. Settings travel as HOTSPOTS_* variables so that every worker process
    (which imports the app afresh) builds the same service."""
    import os
    import signal

    import uvicorn

    from features.settings import get_settings
    from serving.limits import LimitedHttpToolsProtocol

    os.environ["HOTSPOTS_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    os.environ["HOTSPOTS_H3_RESOLUTION"] = str(settings.h3_resolution)
    for name, value in (("AREA_LAYER", settings.area_layer), ("AREA_LAYER_NAME", settings.area_layer_name),
                        ("AREA_NAME_COLUMN", settings.area_name_column)):
        if value is not None:
            os.environ[f"HOTSPOTS_{name}"] = str(Path(value).resolve()) if name == "AREA_LAYER" else str(value)
    if reload_seconds is not None:
        os.environ["HOTSPOTS_MODEL_REFRESH_SECONDS"] = repr(float(reload_seconds))
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        # /metrics sums every worker's counters from this folder (prometheus_client's multiprocess mode)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="hotspots-metrics-")
    get_settings.cache_clear()  # this process may have read other settings before
    base = f"http://{public_host(host)}:{port}"
    console.print(f"data folder {Path(settings.data_dir).resolve()}; {workers} worker(s)"
                  + (" (each keeps its own forecast cache)" if workers > 1 else ""))
    console.print(f"map:  {base}/map", soft_wrap=True)
    console.print(f"docs: {base}/docs   (API under {base}/v1, key in the X-API-Key header)", soft_wrap=True)
    # uvicorn drains requests and runs the shutdown on SIGTERM, then re-raises the signal to the handler in
    # place before it started; a no-op one here makes a graceful stop exit 0, as service managers expect
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run("serving.app:create_app", factory=True, host=host, port=port, workers=workers,
                access_log=access_log, timeout_graceful_shutdown=10, http=LimitedHttpToolsProtocol)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, min=1, max=65535),
    workers: int = typer.Option(1, min=1, help="Worker processes; each keeps its own forecast cache."),
    reload_seconds: float | None = typer.Option(
        None, min=0, help="How often at most the registry is re-read, in the background, for a moved champion "
                          "(default: setting model_refresh_seconds, 60; 0: as often as every 0.25 s)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="uvicorn's per-request log line "
                                    "(the audit log is kept either way)."),
    areas: Path | None = typer.Option(
        None, "--areas", help="Boundary file (GeoJSON, GeoPackage, shapefile) naming the map's areas "
                              "(setting area_layer); default: the city's shipped layer or unnamed areas."),
    area_layer: str | None = typer.Option(None, help="Layer of --areas to read (GeoPackage; setting area_layer_name)."),
    area_name_column: str | None = typer.Option(None, help="Column of --areas with the names (setting "
                                                           "area_name_column); default: guessed."),
    resolution: int | None = Resolution,
    data_dir: Path | None = DataDir,
) -> None:
    """Start the hotspot service (FastAPI on uvicorn): the API under /v1, the planner map at /map."""
    settings = project_settings(data_dir, resolution)
    given = {k: v for k, v in (("area_layer", areas), ("area_layer_name", area_layer),
                               ("area_name_column", area_name_column)) if v is not None}
    if given:
        settings = settings.model_copy(update=given)
    if settings.area_layer is not None:  # a bad file is said now, in one line, not at the first request
        from serving.areas import AreaLayerError, configured_layer

        try:
            layer = configured_layer(settings)
        except AreaLayerError as exc:
            fail(str(exc))
        console.print(f"area names: {len(layer) if layer is not None else 0} areas from {settings.area_layer}")
    serve_forever(settings, host, port, workers, reload_seconds, access_log)


keys_app = typer.Typer(help="API keys of the service: create (shown once), revoke, list. Stored hashed.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def show_new_key(plaintext: str, role) -> None:
    console.print(f"new {role.value} key (send it in the X-API-Key header):")
    typer.echo(plaintext)  # plain echo: never wrapped or re-styled, so it can be copied whole
    console.print("[bold yellow]warning:[/] the key is shown only now; it is stored hashed and cannot be recovered. "
                  "Lost keys are revoked and replaced.")


@keys_app.command("create")
def keys_create(
    role: str = typer.Option(..., help="planner (forecasts), analyst (+ models), auditor (+ audit log) or admin."),
    name: str = typer.Option(..., help="A label for the key's use, e.g. 'night desk' or 'dispatch GIS': never a "
                                       "person's name (the service keeps no personal data)."),
    data_dir: Path | None = DataDir,
) -> None:
    """Create an API key and print it once."""
    from serving.keys import Role, create_key

    try:
        chosen = Role(role)
    except ValueError:
        fail(f"unknown role {role!r}; choose from {', '.join(r.value for r in Role)}")
    label = name.strip()
    if not 1 <= len(label) <= 200:
        fail("--name must be 1 to 200 characters: a label such as 'night desk'")
    if "@" in label:
        fail("--name looks like an e-mail address; use a label for the key's use such as 'night desk' (no personal data)")
    show_new_key(create_key(chosen, label, project_settings(data_dir)), chosen)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (the part after hsk_, see `hotspots keys list`)."),
                data_dir: Path | None = DataDir) -> None:
    """Revoke a key: requests with it get 401 from then on (the row stays for the audit trail)."""
    from serving.keys import revoke_key

    if not revoke_key(key_id, project_settings(data_dir)):
        fail(f"no active key with id {key_id!r}: see `hotspots keys list`")
    console.print(f"key {key_id} revoked")


@keys_app.command("list")
def keys_list(data_dir: Path | None = DataDir) -> None:
    """Keys with their ids, names, roles and dates (never the secrets)."""
    from serving.keys import list_keys

    found = list_keys(project_settings(data_dir))
    if not found:
        console.print("no keys: create one with `hotspots keys create --role planner --name 'night desk'`")
        return
    table = Table()
    for title, wrap in (("id", False), ("name", True), ("role", False), ("created (UTC)", False), ("revoked (UTC)", False)):
        table.add_column(title, no_wrap=not wrap)
    for k in found:
        table.add_row(k.key_id, k.name, k.role.value, f"{k.created_at:%Y-%m-%d %H:%M:%S}",
                      f"{k.revoked_at:%Y-%m-%d %H:%M:%S}" if k.revoked_at else "")
    console.print(table)
