"""``hotspots log verify``: check the hash chain of the service's audit and patrol logs (not the bias audit,
``hotspots audit``)."""

from __future__ import annotations

from pathlib import Path

import typer

from serving.cli.common import DataDir, console, fail, project_settings

app = typer.Typer()
log_app = typer.Typer(help="The service's append-only audit and patrol logs.", no_args_is_help=True)
app.add_typer(log_app, name="log")


@log_app.command("verify")
def verify(data_dir: Path | None = DataDir) -> None:
    """Recompute the hash chain of the audit and patrol logs; name the first break (exit 1) or say intact."""
    from serving.chain import verify as verify_chain
    from serving.db import Database

    settings = project_settings(data_dir, None)
    try:
        db = Database.for_settings(settings)
    except RuntimeError as exc:
        fail(str(exc))
    try:
        breaks = verify_chain(db.engine)
    finally:
        db.dispose()
    if not breaks:
        console.print(f"intact: the audit and patrol logs of {db.display_url} match their hash chains")
        return
    for found in breaks:
        console.print(f"[bold red]broken:[/] {found.message}", soft_wrap=True)
    console.print("the first break is listed first per table; restore the database from a backup taken before it "
                  "and keep this output for the incident record", soft_wrap=True)
    raise typer.Exit(1)
