"""Store commands: ``hotspots verify`` checks the data folder's store, revisions, quarantine, summaries and panels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from serving.cli.common import DataDir, console, project_settings

app = typer.Typer()


@app.command()
def verify(
    data_dir: Path | None = DataDir,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only problems.")] = False,
) -> None:
    """Check that the store, revisions, quarantine, ingest summaries and panels are readable and consistent;
    each problem says what to do. Exit 1 when anything is wrong, 0 otherwise (warnings included)."""
    from features.verify import verify_store

    folder = project_settings(data_dir).data_dir
    findings = verify_store(folder)
    styles = {"ok": "green", "warning": "yellow", "error": "bold red"}
    for finding in findings:
        if quiet and finding.level == "ok":
            continue
        fix = f"; fix: {escape(finding.fix)}" if finding.fix else ""
        console.print(f"[{styles[finding.level]}]{finding.level:<7}[/] {escape(finding.what)}{fix}", soft_wrap=True,
                      highlight=False)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    console.print(f"{errors} error(s), {warnings} warning(s) in {folder}", highlight=False)
    if errors:
        raise typer.Exit(code=1)
