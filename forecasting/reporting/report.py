"""Backtest report: figures, a Markdown report, the same as a self-contained HTML page, and a JSON summary.

Everything is written into one folder::

    hit_rate_curves.png  pai_bars.png  calibration.png  hotspot_map.png  report.md  report.html  summary.json

The document is built once as a list of blocks (headings, paragraphs, tables, images) and rendered twice,
to Markdown and to HTML (a jinja2 template, autoescaped); the HTML embeds the images as base64 data URIs
and uses inline CSS only, so the single file can be mailed or archived. Figures use matplotlib's Agg canvas
directly (``Figure`` + ``FigureCanvasAgg``), so no pyplot state is created and nothing is left open. No
base-map tiles: offline.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from features.panel import CountPanel
from forecasting.backtest import BacktestResult
from forecasting.claim import ClaimResult
from forecasting.jsonable import jsonable
from forecasting.metrics import HEADLINE_COVERAGES, MetricSummary, calibration, pooled, rank_cells, shift_hits
from forecasting.references import CEILING, LABELS, NO_HEADROOM, Headroom
from forecasting.reporting.templating import png_data_uri, render

DPI = 100
METRICS = ("hit_rate", "pai", "pei", "rri", "area_share")
IMAGES = {
    "hit_rate_curves": ("hit_rate_curves.png", "Pooled hit rate against share of area flagged"),
    "pai_bars": ("pai_bars.png", "PAI by coverage with bootstrap intervals"),
    "calibration": ("calibration.png", "Calibration: mean predicted vs mean observed count by decile"),
    "hotspot_map": ("hotspot_map.png", "Hotspots of the busiest test shift"),
}


# --- small helpers ---------------------------------------------------------------------------------
def busiest_shift(observed: np.ndarray) -> int:
    """Row index of the test shift with the most observed crimes (the first one on ties)."""
    return int(np.argmax(np.asarray(observed).sum(axis=1)))


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def fmt_ratio(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.2f}"


def fmt_interval(point: float, low: float, high: float, fmt=fmt_rate) -> str:
    return f"{fmt(point)} [{fmt(low)}, {fmt(high)}]"


def fmt_coverage(c: float) -> str:
    return f"{c * 100:g}%"


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except Exception:  # noqa: BLE001 - no git, not a checkout: fall back to the package version
        pass
    try:
        from importlib.metadata import version

        return f"hotspots {version('hotspots')}"
    except Exception:  # noqa: BLE001
        return "unknown"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    fig.clear()
    return path


def _colours(names: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


# --- meta ------------------------------------------------------------------------------------------
def default_meta(result: BacktestResult, panel: CountPanel) -> dict[str, Any]:
    area = panel.study_area
    cal = panel.calendar
    bounds = cal.bounds(result.origins[[0, -1]])
    start, end = bounds["start_local"][0], bounds["end_local"][1]
    cutoffs = np.asarray(result.cutoffs, dtype=np.int64)
    spacing = np.diff(cutoffs) / result.per_day if cutoffs.size > 1 else np.array([])
    cadence = f"{cutoffs.size} refit{'s' if cutoffs.size != 1 else ''}"
    if spacing.size:
        cadence += f", every ~{np.median(spacing):.0f} days"
    return {
        "city": area.name or panel.meta.get("city") or panel.meta.get("source") or "unnamed",
        "resolution": f"H3 {area.resolution}: {len(area)} cells, mean {area.areas_km2.mean():.3f} km², "
                      f"total {area.areas_km2.sum():.1f} km²",
        "shifts": f"{cal.per_day} per day from {', '.join(cal.labels)} ({cal.timezone}); "
                  f"{result.origins.size} test shifts",
        "test_period": f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} {cal.timezone}",
        "refit_cadence": cadence,
        "test_crimes": float(result.observed.sum()),
        "data_fingerprint": panel.fingerprint(),
        "code_version": _code_version(),
    }


# --- document model --------------------------------------------------------------------------------
@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | ul | table | img
    text: str = ""
    items: list = field(default_factory=list)  # ul items, or table rows
    header: list = field(default_factory=list)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("*", "\\*")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---" for _ in b.header) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.items]
            out.append("\n".join(lines))
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.items[0]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str, out_dir: Path) -> str:
    """The blocks as one self-contained page (template ``backtest_report.html.j2``): the images in ``out_dir``
    embedded as data URIs, inline CSS only."""
    images = {b.items[0]: png_data_uri((out_dir / b.items[0]).read_bytes()) for b in blocks if b.kind == "img"}
    return render("backtest_report.html.j2", blocks=blocks, title=title, images=images) + "\n"


# --- figures ---------------------------------------------------------------------------------------
def plot_hit_rate_curves(result: BacktestResult, path: Path, colours: dict) -> Path:
    # one ranking per forecaster: a 0.5% grid over the whole range plus a 0.25% grid over 0-20% for the zoom
    grid = np.union1d(np.linspace(0, 1, 201), np.linspace(0, 0.2, 81))
    fig = Figure(figsize=(12, 5))
    full, zoom = fig.subplots(1, 2)
    for name, pred in result.predictions.items():
        h = shift_hits(pred, result.observed, result.areas, result.origins, coverages=np.clip(grid, 1e-9, 1))
        rates = pooled(h)["hit_rate"]
        rates[0] = 0.0
        for ax in (full, zoom):
            ax.plot(grid * 100, rates * 100, color=colours[name], lw=1.8, label=name)
    for ax, top in ((full, 100), (zoom, 20)):
        ax.plot([0, top], [0, top], color="grey", ls="--", lw=1, label="random (diagonal)")
        ax.set_xlim(0, top)
        ax.set_xlabel("share of area flagged (%)")
        ax.set_ylabel("share of crimes in flagged cells (%)")
        ax.grid(alpha=0.3)
    full.set_ylim(0, 100)
    zoom.set_ylim(bottom=0)
    full.set_title("Hit rate, pooled over the test period")
    zoom.set_title("Zoom: 0-20% of the area")
    zoom.legend(loc="upper left", fontsize=9)
    return _save(fig, path)


def plot_pai_bars(summaries: dict[str, MetricSummary], path: Path, colours: dict) -> Path:
    names = list(summaries)
    coverages = np.asarray(next(iter(summaries.values())).coverages, dtype=float)
    width = 0.8 / max(len(names), 1)
    x = np.arange(coverages.size)
    fig = Figure(figsize=(max(7, 1.4 * coverages.size + 3), 4.8))
    ax = fig.subplots()
    for i, name in enumerate(names):
        s = summaries[name]
        point = np.asarray(s.point["pai"], dtype=float)
        err = np.stack([point - np.asarray(s.low["pai"]), np.asarray(s.high["pai"]) - point])
        err = np.nan_to_num(np.clip(err, 0, None))
        ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(point), width, yerr=err, capsize=3,
               color=colours[name], label=name, error_kw={"lw": 1, "ecolor": "#333"})
    ax.axhline(1, color="grey", ls="--", lw=1, label="random (PAI = 1)")
    ax.set_xticks(x, [fmt_coverage(c) for c in coverages])
    ax.set_xlabel("share of area flagged")
    ax.set_ylabel("PAI (hit rate / area share)")
    ax.set_title("Predictive accuracy index, 95% day-block bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def plot_calibration(result: BacktestResult, path: Path, colours: dict) -> Path:
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    lo, hi = np.inf, 0.0
    for name, pred in result.predictions.items():
        cal = calibration(pred, result.observed)
        keep = (cal["predicted"] > 0) & (cal["observed"] > 0)  # log axes
        p, o = cal["predicted"][keep], cal["observed"][keep]
        if p.size:
            ax.plot(p, o, marker="o", ms=5, lw=1.3, color=colours[name], label=name)
            lo, hi = min(lo, p.min(), o.min()), max(hi, p.max(), o.max())
    if not np.isfinite(lo):
        lo, hi = 1e-3, 1.0
    lo, hi = lo / 1.5, hi * 1.5
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("mean predicted count per cell-shift (decile of forecast)")
    ax.set_ylabel("mean observed count per cell-shift")
    ax.set_title("Calibration by forecast decile")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    return _save(fig, path)


def plot_hotspot_map(result: BacktestResult, panel: CountPanel, path: Path, forecaster: str,
                     coverage: float) -> dict[str, Any]:
    """Map of the busiest test shift; returns what was drawn (for the report and the JSON)."""
    row = busiest_shift(result.observed)
    shift_id = int(result.origins[row])
    pred = np.asarray(result.predictions[forecaster][row], dtype=float)
    obs = np.asarray(result.observed[row], dtype=float)
    order = rank_cells(pred, shift_id)[0]
    h = shift_hits(pred, obs, result.areas, np.array([shift_id]), coverages=[coverage])
    k = int(h.n_flagged[0, 0])
    flagged = order[:k]
    bounds = panel.calendar.bounds([shift_id])
    start, end = bounds["start_local"][0], bounds["end_local"][0]
    when = f"{start:%a %Y-%m-%d %H:%M} to {end:%H:%M}" if start.date() == end.date() else \
        f"{start:%a %Y-%m-%d %H:%M} to {end:%a %Y-%m-%d %H:%M}"

    gdf = panel.study_area.to_geodataframe(observed=obs)
    fig = Figure(figsize=(8.5, 8))
    ax = fig.subplots()
    gdf.plot(ax=ax, color="#e6e6e6", edgecolor="white", linewidth=0.3)
    cmap = ListedColormap(colormaps["YlOrRd_r"](np.linspace(0, 0.85, 256)))  # no near-white top ranks
    norm = Normalize(vmin=1, vmax=max(k, 2))
    hot = gdf.iloc[flagged].assign(rank=np.arange(1, k + 1))
    hot.plot(ax=ax, color=cmap(norm(hot["rank"].to_numpy())), edgecolor="#7a0000", linewidth=0.4)
    seen = gdf[gdf["observed"] > 0]
    if len(seen):
        seen.plot(ax=ax, facecolor="none", edgecolor="#0b3d91", linewidth=1.4)
        pts = seen.geometry.representative_point()
        ax.scatter(pts.x, pts.y, s=12 + 18 * seen["observed"].to_numpy(), color="#0b3d91", zorder=5,
                   edgecolor="white", linewidth=0.5)
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.6, pad=0.02)
    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()
    cbar.set_label("rank of flagged cell (1 = highest forecast)")
    ax.legend(handles=[
        Patch(facecolor=cmap(0.3), edgecolor="#7a0000", label=f"flagged by {forecaster} ({k} cells)"),
        Line2D([], [], marker="o", ls="none", color="#0b3d91", markeredgecolor="white",
               label="cells with observed crimes (dot size = count)"),
        Patch(facecolor="#e6e6e6", edgecolor="white", label="study area"),
    ], loc="lower left", fontsize=8, framealpha=0.9)
    ax.set_axis_off()
    crimes, hits = float(obs.sum()), float(h.hits[0, 0])
    ax.set_title(f"{forecaster}, top {fmt_coverage(coverage)} of area: shift {when} ({panel.calendar.timezone})\n"
                 f"{crimes:g} crimes in the shift, {hits:g} inside the {k} flagged cells "
                 f"({h.area_share[0, 0]:.1%} of the area)", fontsize=10)
    _save(fig, path)
    return {
        "forecaster": forecaster, "coverage": float(coverage), "shift_id": shift_id, "row": row,
        "start_local": start.isoformat(), "end_local": end.isoformat(), "label": when,
        "crimes": crimes, "hits": hits, "cells_flagged": k, "area_share": float(h.area_share[0, 0]),
    }


# --- tables and sentences --------------------------------------------------------------------------
def _cov_index(summary: MetricSummary, coverage: float) -> int | None:
    hits = np.flatnonzero(np.isclose(np.asarray(summary.coverages, dtype=float), coverage))
    return int(hits[0]) if hits.size else None


def best_sentence(summaries: dict[str, MetricSummary], coverage: float, candidates: set[str]) -> str:
    names = list(summaries)
    j = _cov_index(summaries[names[0]], coverage)
    if j is None:  # x[None] would be a new axis, not a value
        raise ValueError(f"coverage {coverage:g} is not among the backtest's coverages")
    rates = np.array([summaries[n].point["hit_rate"][j] for n in names], dtype=float)
    if not np.isfinite(rates).any():
        return f"At {fmt_coverage(coverage)} of the area no forecaster has a hit rate (no crimes)."
    ranking = [names[i] for i in np.argsort(-np.nan_to_num(rates, nan=-np.inf), kind="stable")]
    best = ranking[0]
    sb = summaries[best]
    text = (f"At {fmt_coverage(coverage)} of the area the best forecaster is **{best}**, hit rate "
            f"{fmt_interval(sb.point['hit_rate'][j], sb.low['hit_rate'][j], sb.high['hit_rate'][j])}")
    if len(ranking) > 1:
        second = summaries[ranking[1]]
        text += f"; next is {ranking[1]} at {fmt_rate(second.point['hit_rate'][j])}."
        if sb.low["hit_rate"][j] <= second.high["hit_rate"][j]:
            text += (" Their bootstrap intervals overlap, so this ordering is not clear-cut "
                     "(the paired claim test above is the sharper comparison).")
    else:
        text += "."
    if candidates and best not in candidates:
        beaten = ", ".join(sorted(candidates & set(names)))
        text += f" **A baseline wins here:** {best} beats {beaten or 'the candidate'}."
    return text


def _metric_rows(summaries: dict[str, MetricSummary], j_of: dict[str, int]) -> list[list[str]]:
    rows = []
    for name, s in summaries.items():
        j = j_of[name]
        rows.append([
            name,
            fmt_interval(s.point["hit_rate"][j], s.low["hit_rate"][j], s.high["hit_rate"][j]),
            fmt_rate(s.pessimistic["hit_rate"][j]) if "hit_rate" in s.pessimistic else "",
            fmt_interval(s.point["pai"][j], s.low["pai"][j], s.high["pai"][j], fmt_ratio),
            fmt_rate(s.point["pei"][j]),
            fmt_ratio(s.point["rri"][j]),
            f"{s.point['area_share'][j]:.2%}",
        ])
    return rows


def _per_category_blocks(per_category: pl.DataFrame) -> list[Block]:
    blocks = [Block("h2", "Hit rate by crime category"),
              Block("p", "Each forecaster's all-crime map scored against each category's incidents alone.")]
    crimes = per_category.group_by("category").agg(pl.col("crimes").first())
    forecasters = per_category["forecaster"].unique(maintain_order=True).to_list()
    for cov in sorted(per_category["coverage"].unique().to_list()):
        wide = (per_category.filter(pl.col("coverage") == cov)
                .pivot(on="forecaster", index="category", values="hit_rate")
                .join(crimes, on="category", how="left")
                .sort(["crimes", "category"], descending=[True, False]))
        rows = [[r["category"], f"{r['crimes']:g}"] + [fmt_rate(r.get(f)) for f in forecasters]
                for r in wide.iter_rows(named=True)]
        blocks += [Block("h3", f"At {fmt_coverage(cov)} of the area"),
                   Block("table", items=rows, header=["category", "crimes", *forecasters])]
    return blocks


def _summary_entry(s: MetricSummary) -> dict:
    entry = {
        "deviance": s.deviance, "n_shifts": s.n_shifts, "crimes": s.crimes,
        "coverages": [
            {"coverage": float(c), **{m: {"point": s.point[m][j], "low": s.low[m][j], "high": s.high[m][j]}
                                      for m in METRICS if m in s.point}}
            for j, c in enumerate(np.asarray(s.coverages, dtype=float))
        ],
    }
    if s.pessimistic:
        entry["pessimistic"] = {m: [float(v) for v in values] for m, values in s.pessimistic.items()}
    return entry


def summary_dict(summaries: dict[str, MetricSummary], claims: list[ClaimResult], meta: dict,
                 title: str, map_info: dict, best: dict, references: dict[str, MetricSummary] | None = None,
                 headroom: list[Headroom] | None = None) -> dict:
    forecasters = {name: _summary_entry(s) for name, s in summaries.items()}
    out = {"title": title, "meta": meta, "forecasters": forecasters,
           "claims": [c.as_dict() for c in claims], "best_by_hit_rate": best, "map": map_info}
    if references:  # kept apart from "forecasters": references no forecaster can use
        out["references"] = {name: {"label": LABELS.get(name, name), **_summary_entry(s)}
                             for name, s in references.items()}
    if headroom:
        out["headroom"] = {"strongest_baseline": headroom[0].strongest, "ceiling": CEILING,
                           "shares": [h.as_dict() for h in headroom]}
    return jsonable(out)


def _reference_blocks(references: dict[str, MetricSummary], headroom: list[Headroom],
                      headline: list[float]) -> list[Block]:
    """The clairvoyant references (labelled as such, never ranked with the forecasters) and each forecaster's
    share of the headroom between the strongest baseline and the shift-of-day ceiling."""
    blocks = [Block("h2", "Clairvoyant references (not forecasters)"),
              Block("p", "Maps made from the test period's own recorded counts, scored exactly like the "
                         "forecasters. No forecaster can use them: they show how far any map could get. "
                         + "; ".join(f"{name}: {label}" for name, label in LABELS.items() if name in references)
                         + ".")]
    rows = []
    for name, s in references.items():
        row = [name + " (reference)"]
        for c in headline:
            j = _cov_index(s, c)
            if j is None:
                row += ["n/a", "n/a", "n/a"]
                continue
            row += [fmt_interval(s.point["hit_rate"][j], s.low["hit_rate"][j], s.high["hit_rate"][j]),
                    fmt_rate(s.pessimistic["hit_rate"][j]) if "hit_rate" in s.pessimistic else "",
                    fmt_interval(s.point["pai"][j], s.low["pai"][j], s.high["pai"][j], fmt_ratio)]
        rows.append(row)
    header = ["reference"] + [f"{h} {fmt_coverage(c)}" for c in headline
                              for h in ("hit rate [CI]", "pessimistic ties", "PAI [CI]")]
    blocks.append(Block("table", header=header, items=rows))
    blocks.append(Block("h2", "Share of the headroom"))
    if not headroom:
        blocks.append(Block("p", "No strongest baseline was chosen (no non-learned forecaster in the backtest), so "
                                 "no headroom share is stated."))
        return blocks
    first = headroom[0]
    blocks.append(Block("p", f"(forecaster - {first.strongest}) / ({CEILING} - {first.strongest}) in hit rate: the "
                             f"share of the distance between the strongest baseline, {first.strongest}, and the "
                             f"shift-of-day ceiling each forecaster has covered (0% = the strongest baseline, 100% = "
                             f"the ceiling; negative = below the strongest baseline). '{NO_HEADROOM}' where the "
                             "ceiling is not above the strongest baseline. Each side uses the same tie rule."))
    by = {(h.forecaster, h.coverage, h.ties): h for h in headroom}
    ties = [t for t in ("random", "pessimistic") if any(h.ties == t for h in headroom)]
    covs = list(dict.fromkeys(h.coverage for h in headroom))
    names = list(dict.fromkeys(h.forecaster for h in headroom))
    header = ["forecaster"] + [f"{fmt_coverage(c)}, {t} ties" for c in covs for t in ties]
    blocks.append(Block("table", header=header, items=[
        [n + (" (strongest baseline)" if n == first.strongest else "")]
        + [by[(n, c, t)].text() if (n, c, t) in by else "" for c in covs for t in ties] for n in names]))
    return blocks


# --- entry point -----------------------------------------------------------------------------------
def write_report(result: BacktestResult, panel: CountPanel, out_dir: Path, *, title: str,
                 summaries: dict[str, MetricSummary], claims: list[ClaimResult],
                 per_category: pl.DataFrame | None = None, meta: dict | None = None,
                 map_forecaster: str | None = None, map_coverage: float = 0.05, strongest=None,
                 references: dict[str, MetricSummary] | None = None,
                 headroom: list[Headroom] | None = None) -> dict[str, Path]:
    """Write the figures, report.md, report.html and summary.json into ``out_dir``; returns paths by key
    (``hit_rate_curves``, ``pai_bars``, ``calibration``, ``hotspot_map``, ``report_md``, ``report_html``,
    ``summary_json``). ``references`` (the clairvoyant maps, :mod:`forecasting.references`) and ``headroom``
    get their own sections, apart from the forecasters; ``map_forecaster`` defaults to the first forecaster."""
    if not summaries:
        raise ValueError("write_report needs at least one forecaster's summary")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(result.predictions)
    colours = _colours(list(dict.fromkeys(names + list(summaries))))
    if map_forecaster is None or map_forecaster not in result.predictions:
        map_forecaster = names[0]
    meta_all = {**default_meta(result, panel), **(meta or {})}
    candidates = {c.candidate for c in claims} or {map_forecaster}

    paths = {
        "hit_rate_curves": plot_hit_rate_curves(result, out_dir / IMAGES["hit_rate_curves"][0], colours),
        "pai_bars": plot_pai_bars(summaries, out_dir / IMAGES["pai_bars"][0], colours),
        "calibration": plot_calibration(result, out_dir / IMAGES["calibration"][0], colours),
    }
    paths["hotspot_map"] = out_dir / IMAGES["hotspot_map"][0]
    map_info = plot_hotspot_map(result, panel, paths["hotspot_map"], map_forecaster, map_coverage)

    first = next(iter(summaries.values()))
    coverages = np.asarray(first.coverages, dtype=float)
    headline = [c for c in HEADLINE_COVERAGES if _cov_index(first, c) is not None] or list(coverages)

    blocks: list[Block] = [Block("h1", title)]
    blocks += [Block("h2", "Setup"),
               Block("table", header=["item", "value"],
                     items=[[str(k).replace("_", " "), _fmt_meta(v)] for k, v in meta_all.items()])]

    if strongest is not None:
        blocks.append(Block("h2", "Strongest baseline"))
        blocks.append(Block("p", strongest.sentence() + ". Chosen among every non-learned forecaster on the "
                                 "validation window before the test period; the claim tests and the promotion gate "
                                 "compare with it first."))
        covs = list(strongest.hit_rates[strongest.name])
        blocks.append(Block("table", header=["baseline"] + [f"validation hit rate {float(c):.0%}" for c in covs]
                            + [f"pessimistic {float(c):.0%}" for c in covs],
                            items=[[n + (" (strongest)" if n == strongest.name else "")]
                                   + [fmt_rate(r[c]) for c in covs] + [fmt_rate(strongest.pessimistic[n][c]) for c in covs]
                                   for n, r in strongest.hit_rates.items()]))

    blocks.append(Block("h2", "Claim tests"))
    if claims:
        blocks.append(Block("p", "Paired day-block bootstrap of the ratio of pooled hit rates; the claim is supported "
                                 "when the whole interval is at or above the claimed ratio, refuted when it is all "
                                 "below, undetermined otherwise."))
        blocks.append(Block("ul", items=[c.sentence() for c in claims]))
        blocks.append(Block("table", header=["candidate", "baseline", "coverage", "candidate hit rate",
                                             "baseline hit rate", "claimed ratio", "ratio [CI]",
                                             "difference [CI]", "verdict"],
                            items=[[c.candidate, c.baseline, fmt_coverage(c.coverage), fmt_rate(c.candidate_hit_rate),
                                    fmt_rate(c.baseline_hit_rate), fmt_ratio(c.claimed_ratio),
                                    fmt_interval(c.ratio, c.ratio_low, c.ratio_high, fmt_ratio),
                                    fmt_interval(c.difference, c.difference_low, c.difference_high),
                                    c.verdict.upper()] for c in claims]))
    else:
        blocks.append(Block("p", "No claim test was run."))

    blocks.append(Block("h2", "Who wins"))
    best = {}
    for c in headline:
        blocks.append(Block("p", best_sentence(summaries, c, candidates)))
        j = _cov_index(first, c)
        rates = {n: s.point["hit_rate"][j] for n, s in summaries.items()}
        best[fmt_coverage(c)] = max(rates, key=lambda n: np.nan_to_num(rates[n], nan=-np.inf))

    if references:
        blocks += _reference_blocks(references, headroom or [], headline)

    blocks.append(Block("h2", "Metrics by coverage"))
    blocks.append(Block("p", "Pooled over all test shifts; brackets are 95% day-block bootstrap intervals. "
                             "PAI = hit rate / area share; PEI* = hits / best possible hits with the same number "
                             "of cells; RRI = forecast share in the flagged cells / observed share there (1 is "
                             "ideal). Coverage is by area, so the realised area share can exceed the target. "
                             "Ties are ordered at random per shift; the pessimistic column ranks tied cells with "
                             "fewer actual incidents first (the worst a tie order can do)."))
    header = ["forecaster", "hit rate [CI]", "hit rate, pessimistic ties", "PAI [CI]", "PEI*", "RRI", "area share"]
    for j, c in enumerate(coverages):
        j_of = {n: (i if (i := _cov_index(s, c)) is not None else j) for n, s in summaries.items()}
        blocks += [Block("h3", f"{fmt_coverage(c)} of the area"), Block("table", header=header,
                                                                       items=_metric_rows(summaries, j_of))]

    blocks.append(Block("h2", "Poisson deviance"))
    lowest = min(summaries, key=lambda n: summaries[n].deviance)
    blocks.append(Block("p", f"Mean Poisson deviance per cell-shift (lower is better); lowest: **{lowest}**."))
    blocks.append(Block("table", header=["forecaster", "Poisson deviance", "shifts", "crimes", "fit s", "predict s"],
                        items=[[n, f"{s.deviance:.5f}", s.n_shifts, f"{s.crimes:g}",
                                f"{result.fit_seconds.get(n, float('nan')):.1f}",
                                f"{result.predict_seconds.get(n, float('nan')):.1f}"] for n, s in summaries.items()]))

    if per_category is not None and per_category.height:
        blocks += _per_category_blocks(per_category)

    blocks.append(Block("h2", "Figures"))
    for key in ("hit_rate_curves", "pai_bars", "calibration"):
        blocks.append(Block("img", IMAGES[key][1], items=[IMAGES[key][0]]))
    blocks.append(Block("p", f"Hotspot map: {map_info['forecaster']} at {fmt_coverage(map_coverage)} of the area for "
                             f"the busiest test shift (id {map_info['shift_id']}, {map_info['label']}), "
                             f"{map_info['crimes']:g} crimes, {map_info['hits']:g} in flagged cells."))
    blocks.append(Block("img", IMAGES["hotspot_map"][1], items=[IMAGES["hotspot_map"][0]]))

    paths["report_md"] = out_dir / "report.md"
    paths["report_md"].write_text(to_markdown(blocks), encoding="utf-8")
    paths["report_html"] = out_dir / "report.html"
    paths["report_html"].write_text(to_html(blocks, title, out_dir), encoding="utf-8")
    paths["summary_json"] = out_dir / "summary.json"
    paths["summary_json"].write_text(
        json.dumps(summary_dict(summaries, claims, meta_all, title, map_info, best, references, headroom), indent=2,
                   allow_nan=False),
        encoding="utf-8")
    return paths


def _fmt_meta(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
