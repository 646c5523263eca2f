"""Replaying live operation on the Toronto test panel for the accuracy-record and drift tests: planners ask the
service for the 'next' shift at successive moments, a saved backtest to compare with, and perturbed streams."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import numpy as np
import polars as pl
from service_support import CITY, asgi_service

from features.panel import CountPanel
from features.paths import DataPaths
from forecasting import registry
from forecasting.metrics import summarise
from forecasting.reporting.report import summary_dict
from serving.dependencies import get_now
from serving.keys import Role
from serving.shifts import shift_times

SERVED_DAYS = 10  # the replay serves every shift of the panel's last ten days
COVERAGE = 0.05  # the planners ask for 5% of the area: the backtest band is compared at the same coverage


def served_shift_ids(panel: CountPanel, days: int = SERVED_DAYS) -> np.ndarray:
    return np.arange(panel.end_shift - days * panel.calendar.per_day, panel.end_shift, dtype=np.int64)


def serve_next_shifts(svc, shift_ids: np.ndarray, coverage: float = COVERAGE) -> list[dict]:
    """Before each shift starts (a minute before), a planner asks for the 'next' shift's hotspots."""
    served = []
    try:
        for sid in shift_ids.tolist():
            moment = shift_times(svc.panel.calendar, sid).start - timedelta(minutes=1)
            svc.app.dependency_overrides[get_now] = lambda moment=moment: moment
            r = svc.client.get("/v1/hotspots", params={"city": CITY, "shift": "next", "coverage": coverage},
                               headers={"X-API-Key": svc.keys[Role.planner]})
            assert r.status_code == 200, r.text
            assert r.json()["shift"]["shift_id"] == sid
            served.append(r.json())
    finally:
        svc.app.dependency_overrides.pop(get_now, None)
    return served


def write_saved_backtest(settings, panel: CountPanel, model, days: int = 28) -> str:
    """A saved backtest summary of the champion and the naive baseline over the ``days`` before the served
    days, written by the backtest's own summary writer (intervals from the day-block bootstrap)."""
    origins = np.arange(panel.end_shift - (SERVED_DAYS + days) * panel.calendar.per_day,
                        panel.end_shift - SERVED_DAYS * panel.calendar.per_day, dtype=np.int64)
    observed = panel.dense(int(origins[0]), int(origins[-1]) + 1, dtype=np.float64)
    areas = panel.study_area.areas_km2
    naive = registry.make("naive").fit(panel, int(origins[0])).predict(panel, origins)
    summaries = {name: summarise(pred, observed, areas, origins, panel.calendar.per_day, n_boot=200)
                 for name, pred in (("lightgbm", model.predict(panel, origins)), ("naive", naive))}
    name = f"{CITY}-r{panel.study_area.resolution}-20200101-20200220"
    folder = DataPaths(settings).backtests_root / name
    folder.mkdir(parents=True)
    meta = {"test_start": "2020-01-23", "test_end": "2020-02-20", "strongest_baseline": "naive"}
    (folder / "summary.json").write_text(json.dumps(summary_dict(summaries, [], meta, "test backtest", {}, {})))
    (folder / "predictions.npz").write_bytes(b"")  # latest_backtest finds a backtest by this file
    return name


def moved_panel(panel: CountPanel, shift_ids: np.ndarray, seed: int = 0) -> CountPanel:
    """The stream perturbed: the incidents of ``shift_ids`` happen in other cells (a fixed shuffle of the
    cells), volume and category mix unchanged."""
    permutation = np.random.default_rng(seed).permutation(panel.n_cells)
    counts = panel.counts.with_columns(
        pl.when(pl.col("shift").is_in(shift_ids.tolist()))
        .then(pl.col("cell").map_batches(lambda s: pl.Series(permutation[s.to_numpy()]), return_dtype=pl.Int64))
        .otherwise(pl.col("cell")).cast(panel.counts["cell"].dtype).alias("cell"))
    counts = counts.group_by(["shift", "cell", "category"]).agg(pl.col("count").sum()).sort(["shift", "cell", "category"])
    return replace(panel, counts=counts.select(panel.counts.columns).cast(dict(panel.counts.schema)),
                   lineage=uuid.uuid4().hex)


def scaled_panel(panel: CountPanel, days: int, factor: int) -> CountPanel:
    """The stream perturbed: every incident of the last ``days`` days recorded ``factor`` times (a volume surge)."""
    start = panel.end_shift - days * panel.calendar.per_day
    counts = panel.counts.with_columns(
        pl.when(pl.col("shift") >= start).then(pl.col("count") * factor).otherwise(pl.col("count"))
        .cast(panel.counts["count"].dtype).alias("count"))
    return replace(panel, counts=counts, lineage=uuid.uuid4().hex)


def save_panel(settings, panel: CountPanel) -> None:
    panel.save(DataPaths(settings).panel(CITY))


def use_panel(svc, panel: CountPanel) -> None:
    """The data stream moved on: the city's panel file is replaced and the service re-reads it."""
    save_panel(svc.settings, panel)
    svc.app.state.models.refresh()


@contextmanager
def live_service(incidents, root) -> Iterator:
    """The service on the Toronto test panel with a saved backtest to compare with, after planners were served
    the 'next' shift of every shift of the panel's last ten days (``svc.served``: the responses)."""
    def before(city) -> None:
        city.backtest = write_saved_backtest(city.settings, city.panel, city.model)

    with asgi_service(incidents, root, before_start=before) as svc:
        svc.served = serve_next_shifts(svc, served_shift_ids(svc.panel))
        yield svc
