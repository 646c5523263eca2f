"""Figure and HTML of the bias audit (:mod:`forecasting.bias_audit` computes it): exposure ratios with their
intervals per split and measure, and the tables per split and coverage, as a section or a whole page."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from forecasting.bias_audit import ALL, BiasAudit, fmt_num
from forecasting.reporting.templating import figure_png, png_data_uri, render

MAJORITY_COLUMNS = ["split", "group", "forecaster", "coverage", "n_cells", "population_share", "exposure_ratio",
                    "exposure_to_crime_ratio", "hit_rate", "pai"]


# --- figure --------------------------------------------------------------------------------------------
def bias_audit_figure(result: BiasAudit, measures: Sequence[str] = ("exposure_ratio", "exposure_to_crime_ratio")) -> Figure:
    """Exposure ratios with intervals, one panel per split and measure; colour = forecaster, marker = coverage."""
    rows = result.frame.filter(pl.col("forecaster").is_not_null() & pl.col("measure").is_in(list(measures))
                               & (pl.col("group") != ALL))
    forecasters = result.meta["forecasters"]
    coverages = result.meta["coverages"]
    series = [(f, c) for f in forecasters for c in coverages]
    colours = {f: c for f, c in zip(forecasters, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"))}
    markers = dict(zip(coverages, ("o", "s", "^", "D", "v")))
    fig = Figure(figsize=(6.2 * len(measures), 3.9 * len(result.splits)))
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(result.splits), len(measures), squeeze=False))
    for i, split in enumerate(result.splits):
        groups = split["groups"]
        for j, measure in enumerate(measures):
            ax = axes[i, j]
            sub = rows.filter((pl.col("split") == split["name"]) & (pl.col("measure") == measure))
            width = 0.8 / len(series)
            for s, (f, c) in enumerate(series):
                part = sub.filter((pl.col("forecaster") == f) & ((pl.col("coverage") - c).abs() < 1e-12))
                lookup = {r["group"]: r for r in part.iter_rows(named=True)}
                x = np.arange(len(groups)) + (s - (len(series) - 1) / 2) * width
                v = np.array([lookup.get(g, {}).get("value", np.nan) for g in groups], dtype=float)
                lo = np.array([lookup.get(g, {}).get("low", np.nan) for g in groups], dtype=float)
                hi = np.array([lookup.get(g, {}).get("high", np.nan) for g in groups], dtype=float)
                err = np.nan_to_num(np.clip(np.stack([v - lo, hi - v]), 0, None))
                ax.errorbar(x, v, yerr=err, fmt=markers[c], color=colours[f], ms=5, capsize=2, lw=1,
                            label=f"{f}, {c * 100:g}% of area")
            ax.axhline(1, color="grey", ls="--", lw=1)
            ax.set_yscale("log")
            ax.set_xticks(np.arange(len(groups)),
                          [split.get("group_labels", {}).get(g, g).replace("_", " ") for g in groups],
                          rotation=20, ha="right", fontsize=8)
            ax.set_title(f"{split['label']}: {measure.replace('_', ' ')}", fontsize=10)
            ax.grid(axis="y", alpha=0.3, which="both")
            ax.yaxis.set_major_formatter(lambda y, _: f"{y:g}")
            ax.yaxis.set_minor_formatter(lambda y, _: f"{y:g}" if round(y * 10) % 5 == 0 else "")
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{result.meta.get('title', 'Bias audit')}: 1 = in proportion (dashed); "
                 f"{result.meta['level']:.0%} day-block bootstrap intervals", fontsize=10)
    fig.tight_layout()
    return fig


def bias_audit_png(result: BiasAudit, fig: Figure | None = None) -> bytes:
    """The figure as PNG (100 dpi, tight), as written beside the audit and embedded in its HTML; a figure drawn
    here is cleared afterwards, one passed in is left for its owner (to log it too)."""
    if fig is not None:
        return figure_png(fig, dpi=100, bbox_inches="tight")
    fig = bias_audit_figure(result)
    png = figure_png(fig, dpi=100, bbox_inches="tight")
    fig.clear()
    return png


# --- HTML ----------------------------------------------------------------------------------------------
def _fmt(row: dict | None) -> str:
    if row is None or row["value"] is None:
        return "n/a"
    if row["low"] is None:
        return fmt_num(row["value"])
    return f"{fmt_num(row['value'])} [{fmt_num(row['low'])}, {fmt_num(row['high'])}]"


def _tables(result: BiasAudit) -> list[dict]:
    """One table per split and coverage: a row per group (and 'all'), columns per measure and forecaster."""
    m = result.meta
    fc, base = list(m["forecasters"]), m.get("baseline")
    versus = [f for f in fc if f != base] if base else []

    def get(split: str, group: str, measure: str, forecaster: str | None = None, coverage: float | None = None):
        try:
            return result.get(split, group, measure, forecaster, coverage)
        except KeyError:
            return None

    tables = []
    for split in result.splits:
        for c in m["coverages"]:
            header = ["group", "population share", "crime share"] + [f"exposure ratio {f}" for f in fc]
            header += [f"{f} - {base}" for f in versus] + [f"exposure / crime share {f}" for f in fc]
            header += [f"hit rate {f}" for f in fc] + [f"PAI {f}" for f in fc] + [f"calibration {f}" for f in fc]
            rows = []
            for g in split["groups"] + [ALL]:
                cells = [split.get("group_labels", {}).get(g, g), _fmt(get(split["name"], g, "population_share")),
                         _fmt(get(split["name"], g, "crime_share"))]
                cells += [_fmt(get(split["name"], g, "exposure_ratio", f, c)) for f in fc]
                cells += [_fmt(get(split["name"], g, f"exposure_ratio_minus_{base}", f, c)) for f in versus]
                for measure in ("exposure_to_crime_ratio", "hit_rate", "pai", "calibration"):
                    cells += [_fmt(get(split["name"], g, measure, f, c)) for f in fc]
                rows.append(cells)
            tables.append({"label": split["label"], "coverage": f"{c * 100:g}%", "header": header, "rows": rows})
    return tables


def _majority(result: BiasAudit) -> dict | None:
    if not result.majority.height:
        return None
    rows = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in MAJORITY_COLUMNS]
            for r in result.majority.iter_rows(named=True)]
    return {"header": MAJORITY_COLUMNS, "rows": rows}


def bias_audit_section(result: BiasAudit, png: bytes | None = None) -> str:
    """A self-contained ``<section>`` (the figure inline) for reports and MLflow; ``png`` reuses a rendered figure."""
    m = result.meta
    return render("bias_audit_section.html.j2", title=m.get("title", "Bias audit"), description=m.get("description", ""),
                  level=f"{m['level']:.0%}", n_boot=m["n_boot"], n_shifts=m["n_shifts"], baseline=str(m.get("baseline")),
                  definitions=result.definitions, notes=m.get("notes", []), findings=result.findings(),
                  tables=_tables(result), majority=_majority(result),
                  figure_uri=png_data_uri(bias_audit_png(result) if png is None else png))


def bias_audit_page(result: BiasAudit, png: bytes | None = None) -> str:
    """A whole HTML page (inline CSS) around :func:`bias_audit_section`."""
    return render("bias_audit_page.html.j2", title=result.meta.get("title", "Bias audit"),
                  section=Markup(bias_audit_section(result, png))) + "\n"
