"""The count panel: incidents per (cell, shift, category), stored sparsely, densified on demand."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import h3
import numpy as np
import polars as pl

from features.calendar import ShiftCalendar
from features.grid import StudyArea, points_to_cells

COUNTS_SCHEMA = {"shift": pl.Int64(), "cell": pl.Int32(), "category": pl.Int16(), "count": pl.Int32()}


@dataclass
class BinningReport:
    incidents: int
    binned: int
    outside_study_area: int
    outside_period: int

    @property
    def balanced(self) -> bool:
        return self.incidents == self.binned + self.outside_study_area + self.outside_period


@dataclass
class CountPanel:
    """Sparse counts over shifts [first_shift, end_shift) for every study-area cell.

    ``counts`` rows are (shift, cell index, category index, count>0), sorted by shift then cell; any
    (cell, shift) not listed had no incident.
    """

    study_area: StudyArea
    calendar: ShiftCalendar
    categories: tuple[str, ...]
    first_shift: int
    end_shift: int
    counts: pl.DataFrame
    meta: dict = field(default_factory=dict)
    # shared by a panel and its until() views (prefixes of the same data), so derived results can be reused
    lineage: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def n_cells(self) -> int:
        return len(self.study_area)

    @property
    def n_shifts(self) -> int:
        return self.end_shift - self.first_shift

    def category_index(self, category: str | list[str] | None) -> list[int] | None:
        if category is None:
            return None
        names = [category] if isinstance(category, str) else list(category)
        unknown = [c for c in names if c not in self.categories]
        if unknown:
            raise KeyError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; panel has {list(self.categories)}")
        return [self.categories.index(c) for c in names]

    def slice(self, start: int, stop: int, category: str | list[str] | None = None) -> pl.DataFrame:
        """Sparse rows with start <= shift < stop (binary search on the sorted shift column)."""
        shifts = self.counts["shift"]
        lo = int(shifts.search_sorted(start, side="left"))
        hi = int(shifts.search_sorted(stop, side="left"))
        rows = self.counts.slice(lo, hi - lo)
        idx = self.category_index(category)
        return rows if idx is None else rows.filter(pl.col("category").is_in(idx))

    def dense(self, start: int, stop: int, category: str | list[str] | None = None, dtype=np.float32) -> np.ndarray:
        """Counts as an array (stop - start, n_cells); shifts outside the panel's span are zeros."""
        rows = self.slice(start, stop, category)
        n = self.n_cells
        flat = (rows["shift"].to_numpy() - start) * n + rows["cell"].to_numpy()
        out = np.bincount(flat, weights=rows["count"].to_numpy(), minlength=(stop - start) * n)
        return out.reshape(stop - start, n).astype(dtype, copy=False)

    def cell_totals(self, start: int, stop: int, category: str | list[str] | None = None) -> np.ndarray:
        rows = self.slice(start, stop, category)
        return np.bincount(rows["cell"].to_numpy(), weights=rows["count"].to_numpy(), minlength=self.n_cells)

    def until(self, cutoff: int) -> CountPanel:
        """The panel as it was known at ``cutoff``: only shifts before it. Fitting on this view cannot see
        the future, whatever the forecaster does."""
        end = min(self.end_shift, cutoff)
        rows = self.slice(self.first_shift, end)
        return CountPanel(self.study_area, self.calendar, self.categories, self.first_shift, end, rows, dict(self.meta),
                          lineage=self.lineage)

    def fingerprint(self) -> str:
        """Digest of the panel's contents (for experiment tracking)."""
        import hashlib

        digest = hashlib.blake2b(digest_size=12)
        digest.update(self.study_area.cells.tobytes())
        digest.update(json.dumps([self.calendar.timezone, list(self.calendar.starts), list(self.categories),
                                  self.first_shift, self.end_shift]).encode())
        for name in ("shift", "cell", "category", "count"):
            digest.update(self.counts[name].to_numpy().tobytes())
        return digest.hexdigest()

    # --- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Each file is replaced atomically (a reader never sees a torn file), panel.json last: it is what
        marks a panel as present."""
        from features.storelock import atomic_write_bytes, atomic_write_parquet

        folder = Path(folder)
        atomic_write_parquet(self.counts, folder / "counts.parquet")
        self.study_area.save(folder / "study_area")
        meta = {
            "timezone": self.calendar.timezone,
            "starts": list(self.calendar.starts),
            "categories": list(self.categories),
            "first_shift": self.first_shift,
            "end_shift": self.end_shift,
            "meta": self.meta,
        }
        atomic_write_bytes(json.dumps(meta, indent=2).encode(), folder / "panel.json")

    @classmethod
    def load(cls, folder: str | Path) -> CountPanel:
        folder = Path(folder)
        meta = json.loads((folder / "panel.json").read_text())
        return cls(
            study_area=StudyArea.load(folder / "study_area"),
            calendar=ShiftCalendar(meta["timezone"], tuple(meta["starts"])),
            categories=tuple(meta["categories"]),
            first_shift=meta["first_shift"],
            end_shift=meta["end_shift"],
            counts=pl.read_parquet(folder / "counts.parquet"),
            meta=meta["meta"],
        )


def with_cells(incidents: pl.DataFrame, resolution: int) -> pl.DataFrame:
    """Add each incident's H3 cell (uint64) as ``h3_cell``: bin once, reuse for the study area and the panel."""
    cells = points_to_cells(incidents["latitude"].to_numpy(), incidents["longitude"].to_numpy(), resolution)
    return incidents.with_columns(pl.Series("h3_cell", cells, dtype=pl.UInt64))


def bin_incidents(
    incidents: pl.DataFrame, study_area: StudyArea, calendar: ShiftCalendar
) -> pl.DataFrame:
    """(cell index, shift, category) of every incident; cell -1 where outside the study area.

    Uses the incidents' ``h3_cell`` column when present (from :func:`with_cells` at the same resolution),
    so a caller that already binned them for the study area does not bin twice."""
    if "h3_cell" in incidents.columns:
        cells = incidents["h3_cell"].to_numpy()
        if cells.size and h3.get_resolution(h3.int_to_str(int(cells[0]))) != study_area.resolution:
            raise ValueError("the incidents' h3_cell column is at another resolution than the study area")
    else:
        cells = points_to_cells(incidents["latitude"].to_numpy(), incidents["longitude"].to_numpy(), study_area.resolution)
    return pl.DataFrame(
        {
            "shift": calendar.shift_ids(incidents["occurred_at"]),
            "cell": study_area.index_of(cells).astype(np.int32),
            "category": incidents["category"],
        }
    )


def build_panel(
    incidents: pl.DataFrame,
    study_area: StudyArea,
    calendar: ShiftCalendar,
    categories: list[str] | tuple[str, ...],
    *,
    first_shift: int | None = None,
    end_shift: int | None = None,
) -> tuple[CountPanel, BinningReport]:
    """Aggregate canonical incidents into the sparse panel. ``categories`` fixes the category axis (from the
    profile, not the data, so adding an incident never changes a matrix's columns)."""
    binned = bin_incidents(incidents, study_area, calendar)
    if first_shift is None:
        first_shift = cast(int, binned["shift"].min()) if binned.height else 0  # an Int64 column's min
    if end_shift is None:
        end_shift = cast(int, binned["shift"].max()) + 1 if binned.height else first_shift
    cat_lookup = {c: i for i, c in enumerate(categories)}
    unknown = set(binned["category"].unique().to_list()) - set(cat_lookup)
    if unknown:
        raise ValueError(f"incidents carry categories {sorted(unknown)} not in the panel's categories {list(categories)}")
    in_period = binned["shift"].is_between(first_shift, end_shift, closed="left")
    in_area = binned["cell"] >= 0
    counts = (
        binned.filter(in_period & in_area)
        .with_columns(pl.col("category").replace_strict(cat_lookup, return_dtype=pl.Int16))
        .group_by("shift", "cell", "category")
        .len("count")
        .sort("shift", "cell", "category")
        .cast(COUNTS_SCHEMA)  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys
    )
    report = BinningReport(
        incidents=incidents.height,
        binned=int((in_period & in_area).sum()),
        outside_study_area=int((in_period & ~in_area).sum()),
        outside_period=int((~in_period).sum()),
    )
    panel = CountPanel(study_area, calendar, tuple(categories), first_shift, end_shift, counts)
    return panel, report
