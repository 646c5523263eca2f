"""``hotspots verify``: is the data folder readable and consistent, and if not, what to do.

Checks the incident store (readable, canonical schema, unique ids, no empty fields), the revision history, the
quarantine, the ingest summaries (each one's rows add up) and every panel against the store it was built from
(the store re-binned with the panel's own study area and shift calendar must give the panel's counts).
Read-only: it takes no lock, since writers replace files atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from features.store import INDEX_SCHEMA, MANIFEST, IncidentStore, Manifest, leftovers, month_key
from features.storelock import StoreError, stale_temp_files
from features.validation import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, is_known_reason

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:<7} {self.what}" + (f"; fix: {self.fix}" if self.fix else "")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(path: Path, findings: list[Finding], fix: str) -> pl.DataFrame | None:
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        findings.append(Finding("error", f"{path} is unreadable ({_first_line(exc)})", fix))
        return None


def verify_store(data_dir: str | Path) -> list[Finding]:
    """Every check's finding, errors and warnings first within each part."""
    root = Path(data_dir)
    if not root.is_dir():
        kind = "a file, not a folder" if root.exists() else "missing"
        return [Finding("error", f"the data folder {root} is {kind}",
                        "pass --data-dir with the folder that `hotspots ingest` wrote")]
    findings: list[Finding] = []
    for stale in stale_temp_files(root):
        findings.append(Finding("warning", f"{stale} is left over from an interrupted write (the store itself is "
                                "intact)", "nothing: the next ingest removes it (or delete it)"))
    store = IncidentStore(root)
    stores = {source: store.path(source) if store.manifest_path(source).is_file() else store.legacy_path(source)
              for source in store.sources()}
    if not stores:
        findings.append(Finding("warning", f"no incidents stored in {root}", "run `hotspots ingest SOURCE FILE`"))
    incidents: dict[str, pl.DataFrame] = {}
    for source, path in stores.items():
        frame = _check_incidents(source, path, findings)
        if frame is not None:
            incidents[source] = frame
    for path in sorted((root / "revisions").glob("*.parquet")):
        frame = _read(path, findings, "move it aside: the store is unaffected, only the history of revised rows is lost")
        if frame is not None:
            missing = [c for c in CANONICAL_SCHEMA if c not in frame.columns]
            level: Level = "error" if missing else "ok"
            findings.append(Finding(level, f"{path}: {frame.height:,} replaced versions"
                                    + (f" but it lacks {missing}" if missing else ""),
                                    "move it aside" if missing else ""))
    _check_quarantine(root, findings)
    _check_summaries(root, findings)
    for folder in sorted((root / "panels").glob("*")):
        if folder.is_dir():
            _check_panel(folder, incidents, stores, findings)
    return findings


def _check_incidents(source: str, path: Path, findings: list[Finding]) -> pl.DataFrame | None:
    fix = "restore it from a backup, or move it aside and ingest the source's exports again"
    frame = _read(path, findings, fix) if path.is_file() else _read_partitions(source, path, findings, fix)
    if frame is None:
        return None
    problems = []
    if dict(frame.schema) != CANONICAL_SCHEMA:
        problems.append(f"columns {dict(frame.schema)} are not the canonical {list(CANONICAL_SCHEMA)}")
    else:
        dupes = frame.height - frame["incident_id"].n_unique()
        if dupes:
            problems.append(f"{dupes:,} repeated incident ids")
        nulls = {c: n for c, n in frame.null_count().row(0, named=True).items() if n}
        if nulls:
            problems.append(f"empty fields {nulls}")
        other = frame.filter(pl.col("source") != source).height
        if other:
            problems.append(f"{other:,} rows of another source")
    if problems:
        findings.append(Finding("error", f"{path}: " + "; ".join(problems),
                                "move it aside and ingest the source's exports again"))
        return None
    findings.append(Finding("ok", f"{path}: {frame.height:,} incidents, ids unique"))
    return frame


def _read_partitions(source: str, folder: Path, findings: list[Finding], fix: str) -> pl.DataFrame | None:
    """A partitioned store: the files its manifest names, each readable, each month's rows in their month, the id
    index matching the rows; files no manifest names are the leftovers of an interrupted write."""
    try:
        manifest = Manifest.load(folder / MANIFEST)
    except StoreError as exc:
        findings.append(Finding("error", str(exc).split(": run")[0], fix))
        return None
    for path in leftovers(folder, manifest):
        findings.append(Finding("warning", f"{path} is left over from an interrupted write that was not applied "
                                "(the store is the version its manifest names, intact)",
                                "nothing: the next ingest removes it (or delete it)"))
    parts, bad = [], False
    for month in sorted(manifest.months):
        path = folder / manifest.months[month]["file"]
        if not path.is_file():
            findings.append(Finding("error", f"{path} is missing: a half-applied or damaged write "
                                    f"({folder / MANIFEST} names it)", fix))
            bad = True
            continue
        frame = _read(path, findings, "move it aside and ingest the source's exports again")
        if frame is None:
            bad = True
            continue
        wrong = frame.height != int(manifest.months[month]["rows"]) or (
            "occurred_at" in frame.columns and frame.filter(month_key() != month).height > 0)
        if wrong:
            findings.append(Finding("error", f"{path}: its rows do not match the manifest's month {month} "
                                    f"({frame.height:,} rows, {manifest.months[month]['rows']:,} expected)", fix))
            bad = True
            continue
        parts.append(frame)
    if bad:
        return None
    frame = pl.concat(parts) if parts else pl.DataFrame(schema=CANONICAL_SCHEMA)
    index = _read(folder / manifest.ids, findings, fix) if manifest.ids else pl.DataFrame(schema=INDEX_SCHEMA)
    if index is None:
        return None
    if dict(frame.schema) == CANONICAL_SCHEMA and (index.height != frame.height or index.join(
            frame.select("incident_id", month_key().alias("month")), on=["incident_id", "month"], how="anti").height):
        findings.append(Finding("error", f"{folder}: the id index does not match the stored rows", fix))
        return None
    return frame


def _check_quarantine(root: Path, findings: list[Finding]) -> None:
    files = sorted((root / "quarantine").glob("*/*.parquet"))
    rows, bad = 0, 0
    for path in files:
        frame = _read(path, findings, "ingest the input file again (its quarantine is rewritten) or delete it")
        if frame is None:
            bad += 1
            continue
        missing = [c for c in QUARANTINE_SCHEMA if c not in frame.columns]
        unknown = sorted(r for r in set(frame["reason"].unique().to_list()) if not is_known_reason(r)) if not missing else []
        if missing or unknown:
            bad += 1
            findings.append(Finding("error", f"{path}: " + (f"lacks {missing}" if missing else f"unknown reasons {unknown}"),
                                    "ingest the input file again (its quarantine is rewritten) or delete it"))
        rows += frame.height
    if files and not bad:
        findings.append(Finding("ok", f"quarantine: {len(files)} file(s), {rows:,} rows, every one with a known reason"))


def _check_summaries(root: Path, findings: list[Finding]) -> None:
    reports = sorted((root / "reports" / "ingest").glob("*.json"))
    unbalanced = 0
    for path in reports:
        try:
            s = json.loads(path.read_text())
            total = s["stored_new"] + s.get("updated", 0) + s["already_stored"] + sum(s["quarantined"].values())
            if total != s["input_rows"]:
                unbalanced += 1
                findings.append(Finding("error", f"{path}: {s['input_rows']:,} input rows but {total:,} accounted for",
                                        "ingest that file again and report the bug: rows must never go missing"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            unbalanced += 1
            findings.append(Finding("warning", f"{path} is not a readable ingest summary ({_first_line(exc)})",
                                    "delete it or ingest that file again"))
    if reports and not unbalanced:
        findings.append(Finding("ok", f"ingest summaries: {len(reports)}, each one's rows add up"))


def _check_panel(folder: Path, incidents: dict[str, pl.DataFrame], stores: dict[str, Path],
                 findings: list[Finding]) -> None:
    from features.panel import CountPanel, bin_incidents

    source = folder.name.rsplit("-r", 1)[0]
    rebuild = f"rebuild it with `hotspots panel {source}`"
    try:
        panel = CountPanel.load(folder)
    except Exception as exc:  # noqa: BLE001 - any damage in the folder's files means the same thing to the user
        findings.append(Finding("error", f"panel {folder} is unreadable ({_first_line(exc)})", rebuild))
        return
    if source not in incidents:
        level: Level = "error" if source in stores else "warning"
        findings.append(Finding(level, f"panel {folder}: no readable incident store for {source!r} to compare with",
                                "fix the store first" if source in stores else f"ingest {source} or delete the panel"))
        return
    store = incidents[source]
    binned = bin_incidents(store, panel.study_area, panel.calendar)
    later = int((binned["shift"] >= panel.end_shift).sum())
    lookup = {c: i for i, c in enumerate(panel.categories)}
    expected = (
        binned.filter(pl.col("shift").is_between(panel.first_shift, panel.end_shift, closed="left") & (pl.col("cell") >= 0))
        .with_columns(pl.col("category").replace_strict(lookup, default=-1, return_dtype=pl.Int16))
        .group_by("shift", "cell", "category").len("count")
        .cast(panel.counts.schema)
    )
    diff = expected.join(panel.counts, on=["shift", "cell", "category"], how="full", coalesce=True, suffix="_panel")
    differing = diff.filter(pl.col("count").fill_null(0) != pl.col("count_panel").fill_null(0)).height
    if differing:
        findings.append(Finding("error", f"panel {folder} differs from the store in {differing:,} (cell, shift, "
                                "category) counts: incidents were revised, deleted or added since it was built", rebuild))
    elif later:
        findings.append(Finding("warning", f"panel {folder} ends before {later:,} stored incidents (newer data was "
                                "ingested after it was built)", rebuild))
    else:
        findings.append(Finding("ok", f"panel {folder}: {panel.counts['count'].sum():,} binned incidents, matches the store"))
