"""Figures and HTML of the feedback-loop diagnostics (:mod:`forecasting.diagnostics` computes them).

The computation hands over numbers; here they become the four-panel figure and the ``<section>`` that the
backtest folder, MLflow (:func:`forecasting.reporting.assess.log_diagnostics`) and the model card show.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from forecasting.diagnostics import Diagnostics
from forecasting.measures import lorenz
from forecasting.reporting.templating import figure_png, png_data_uri, render

FLAG_HEADER = ["model", "rule", "cells/shift", "Gini", "static Gini", "top 1% share", "top 5% share",
               "cells ever flagged", "rotation", "tie share", "Jaccard shift→shift", "Jaccard day→day (same shift)",
               "run mean / median / p90 / max (shifts)", "run mean / max (days)"]


# --- figure --------------------------------------------------------------------------------------------
def diagnostics_figure(diag: Diagnostics) -> Figure:
    """Lorenz curves of flag counts, churn over time, run-length histogram, dose-response."""
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    (lz, ch), (rl, dr) = fig.subplots(2, 2)
    styles = ["-", "--", ":", "-."]
    colour = {diag.model: "#c0392b", diag.baseline: "#2c7fb8"}
    tags = diag.rules
    never = min(1 - f.share_ever_flagged for f in diag.flags.values())
    x_from = max(0.0, math.floor(never * 10 - 0.5) * 10)  # Lorenz x axis starts below the first flagged cell
    edges = np.unique(np.round(np.logspace(0, np.log10(max(f.n_shifts for f in diag.flags.values()) + 1), 16)))
    for (name, tag), f in diag.flags.items():
        kw = {"color": colour.get(name, "#555"), "ls": styles[tags.index(tag) % 4], "lw": 1.6,
              "label": f"{name}, {f.rule.label}"}
        x, y = lorenz(f.flag_counts, 2001)
        lz.plot(x * 100, y * 100, **kw)
        days, values = f.series_day[0] // diag.per_day, f.series_day[1]
        uniq, inv = np.unique(days, return_inverse=True)
        daily = np.bincount(inv, weights=values) / np.bincount(inv)
        smooth = np.convolve(daily, np.ones(7) / 7, mode="valid") if daily.size >= 7 else daily
        ch.plot(np.arange(smooth.size) + (daily.size - smooth.size) // 2, smooth, **kw)
        if f.runs_shift.n_runs:  # log-spaced bins: runs of 1, 2, 3, 4-5, ... shifts
            hist, _ = np.histogram(f.runs_shift.lengths, bins=np.append(edges, np.inf), weights=f.runs_shift.counts)
            rl.plot(edges, hist / f.runs_shift.n_runs, marker="o", ms=3, **kw)
    lz.plot([0, 100], [0, 100], color="grey", lw=1, ls="--", label="equal flags")
    lz.set(xlabel="study-area cells, least to most often flagged (%)", ylabel="share of all flags (%)",
           title=f"Concentration of flags (Lorenz curve; the first {x_from:g}% of cells are never flagged)"
           if x_from else "Concentration of flags (Lorenz curve)", xlim=(x_from, 100), ylim=(0, 100))
    ch.set(xlabel="day of the test period", ylabel="Jaccard, same shift on consecutive days",
           title="Stability of the flagged set (7-day mean; churn = 1 - Jaccard)", ylim=(0, 1))
    rl.set(xscale="log", yscale="log", xlabel="consecutive shifts flagged (log bins, point at bin start)",
           ylabel="share of runs", title="How long cells stay flagged (runs at the period's ends censored)")
    for ax in (lz, ch, rl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _plot_dose(diag, dr)
    return fig


def _plot_dose(diag: Diagnostics, ax) -> None:
    p = diag.patrol
    if p is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no patrol log given:\ndose-response not analysed", ha="center", va="center",
                fontsize=12, color="#555", transform=ax.transAxes)
        return
    outcomes = p.bins["outcome"].unique(maintain_order=True).to_list()
    width = 0.8 / len(outcomes)
    for i, name in enumerate(outcomes):
        b = p.bins.filter(pl.col("outcome") == name)
        x = np.arange(b.height) + (i - (len(outcomes) - 1) / 2) * width
        rate = b["rate"].to_numpy()
        err = np.nan_to_num(np.clip(np.stack([rate - b["rate_low"].to_numpy(), b["rate_high"].to_numpy() - rate]), 0, None))
        ax.bar(x, np.nan_to_num(rate), width, yerr=err, capsize=3, label=f"recorded: {name}")
        if name == "all":
            ax.plot(x, b["expected"].to_numpy(), "kD", ms=5, label="model expected")
        labels = b["bin"].to_list()
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(xlabel="patrol dose in the cell-shift (minutes)", ylabel="crimes per cell-shift",
           title="Recorded crime by patrol dose (95% cell-bootstrap intervals)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def diagnostics_png(diag: Diagnostics, fig: Figure | None = None) -> bytes:
    """The figure as the PNG the HTML section embeds (90 dpi)."""
    return figure_png(diagnostics_figure(diag) if fig is None else fig, dpi=90)


# --- HTML ----------------------------------------------------------------------------------------------
def _num(x: float | None, digits: int) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _interval(point, low, high, digits: int) -> str:
    return "n/a" if point is None or not math.isfinite(point) else \
        f"{_num(point, digits)} [{_num(low, digits)}, {_num(high, digits)}]"


def _flag_rows(diag: Diagnostics) -> list[list[str]]:
    """One row per (rule, model), the model before its baseline."""
    ordered = sorted(diag.flags.items(), key=lambda kv: (kv[0][1], kv[0][0] != diag.model))
    return [[name, f.rule.label, f"{f.mean_flagged:.1f}", f"{f.gini:.3f}", f"{f.gini_static:.3f}",
             f"{f.top1_share:.1%}", f"{f.top5_share:.1%}",
             f"{f.cells_ever_flagged} ({f.share_ever_flagged:.1%})", f"{f.rotation:.1f}", f"{f.tie_share:.1%}",
             f"{f.jaccard_shift:.3f}", f"{f.jaccard_day:.3f}",
             f"{f.runs_shift.mean:.1f} / {f.runs_shift.median:g} / {f.runs_shift.p90:g} / {f.runs_shift.max}",
             f"{f.runs_day.mean:.1f} / {f.runs_day.max}"]
            for (name, _), f in ordered]


def _gain(diag: Diagnostics) -> dict | None:
    g = diag.gain
    if g is None:
        return None
    return {"lagged_share": f"{g.lagged_share:.1%}",
            "by_group": [[k, f"{v:.1%}"] for k, v in g.by_group.items()],
            "top": [[t["feature"], t["group"], f"{t['gain_share']:.1%}"] for t in g.payload()["features"][:8]]}


def _patrol(diag: Diagnostics) -> dict | None:
    p = diag.patrol
    if p is None:
        return None
    bins = [[r["outcome"], r["bin"], f"{r['cell_shifts']:.0f}", f"{r['recorded']:.0f}",
             _interval(r["rate"], r["rate_low"], r["rate_high"], 4), _num(r["expected"], 4),
             _interval(r["obs_exp"], r["obs_exp_low"], r["obs_exp_high"], 2)] for r in p.bins.iter_rows(named=True)]
    regression = [[r["outcome"], r["term"], _interval(r["rate_ratio_per_60min"], r["low"], r["high"], 3),
                   f"{r['p_value']:.3g}"] for r in p.regression.iter_rows(named=True) if r["term"] != "intercept"]
    return {"n_patrolled": p.n_patrolled, "n_cell_shifts": p.n_cell_shifts, "hours": f"{p.total_dose_hours:.0f}",
            "split_note": p.split_note, "bins": bins, "method": p.method,
            "regression": regression if p.regression.height else [], "notes": p.notes}


def diagnostics_section(diag: Diagnostics, title: str = "Feedback-loop diagnostics", figure: bool = True,
                        png: bytes | None = None) -> str:
    """A self-contained ``<section>`` (tables, sentences, the figure as a data URI) for reports and MLflow;
    ``png`` reuses an already rendered figure, ``figure=False`` leaves it out."""
    uri = png_data_uri(png if png is not None else diagnostics_png(diag)) if figure else None
    return render("diagnostics_section.html.j2", title=title, model=diag.model, baseline=diag.baseline,
                  flag_header=FLAG_HEADER, flag_rows=_flag_rows(diag), gain=_gain(diag), patrol=_patrol(diag),
                  notes=diag.notes, figure_uri=uri)


def diagnostics_page(diag: Diagnostics, title: str | None = None, png: bytes | None = None) -> str:
    """A whole HTML page around :func:`diagnostics_section`; ``title`` adds a heading above it."""
    section = diagnostics_section(diag, png=png)
    return render("diagnostics_page.html.j2", title=title or "Diagnostics", heading=title is not None,
                  section=Markup(section)) + "\n"
