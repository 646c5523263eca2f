"""Feature matrices for forecast origins: one row per (origin shift, study-area cell).

Leakage rule: the row for origin t sees only counts of shifts < t, i.e. incidents that occurred before t's
start. The history loaded here (the panel's sparse rows, summed as running sums one shift at a time) stops at
the last origin (exclusive), and every window is a difference of running sums indexed at the origin, so later
shifts cannot reach a row. A row's values do not depend on which other origins are built with it (train/serve
consistency).

``rows`` builds only some (origin, cell) rows, e.g. a model's training rows after zeros are sampled: the same
arithmetic on the same history, gathered per row instead of over every cell, so a row's values are identical to
the full matrix's row, to the bit. A ring mean of counts reads the running sums of the neighbours' counts (whole
numbers, exact in float32); a ring mean of the near-repeat intensity adds the neighbours' values of the row's
origin in the order the full matrix's sparse product adds them.

Long-history features (parent cells' all-history rates, ring means of the long-run rate, the seasonal rates)
add the totals of shifts before the loaded history, taken from the sparse rows of shifts < that start, to the
history's cumulative sums at the origin: still only shifts < t, and the same value whatever history is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from features.panel import CountPanel


@dataclass(frozen=True)
class FeatureConfig:
    window_days: tuple[int, ...] = (1, 7, 28, 365)
    same_shift_days: tuple[int, ...] = (28, 365)  # same shift of day over the last N days
    same_weekday_weeks: int = 8  # same shift of the week over the last N weeks
    spatial_window_days: tuple[int, ...] = (7, 28, 365)
    decay_days: tuple[float, ...] = (1.0, 7.0)  # e-folding times of the near-repeat intensity
    category_window_days: int = 28
    include_location: bool = True
    # H3-native multi-scale: each cell's parent at these coarser resolutions, its counts over these windows
    # (None = all history, as a rate per shift); off by default
    parent_resolutions: tuple[int, ...] = ()
    parent_window_days: tuple[int | None, ...] = (28, 365, None)
    spatial_all_history: bool = False  # ring-1/ring-2 means of the all-history rate
    # all-history rates per cell (and per parent cell): same shift of day, same shift of the week, same month
    seasonal: bool = False

    def lookback(self, per_day: int) -> int:
        """Shifts of history any feature can reach (beyond it, history counts only in the long-run rate)."""
        windows = [d for d in self.parent_window_days if d is not None] if self.parent_resolutions else []
        days = max(max(self.window_days), max(self.same_shift_days), 7 * self.same_weekday_weeks,
                   max(self.spatial_window_days), self.category_window_days, *windows, 31 if self.seasonal else 0)
        return days * per_day


@dataclass
class FeatureMatrix:
    X: np.ndarray  # (n_origins * n_cells, n_features) float32, origin-major; (rows.size, n_features) with rows
    columns: list[str]
    origins: np.ndarray  # shift ids, sorted
    n_cells: int
    meta: dict = field(default_factory=dict)
    rows: np.ndarray | None = None  # the origin-major flat indices (origin position * n_cells + cell) built

    @property
    def origin(self) -> np.ndarray:
        if self.rows is not None:
            return self.origins[self.rows // self.n_cells]
        return np.repeat(self.origins, self.n_cells)

    @property
    def cell(self) -> np.ndarray:
        if self.rows is not None:
            return (self.rows % self.n_cells).astype(np.int32)
        return np.tile(np.arange(self.n_cells, dtype=np.int32), self.origins.size)

    def column(self, name: str) -> np.ndarray:
        return self.X[:, self.columns.index(name)]

    def frame(self) -> pl.DataFrame:
        data = {"origin": self.origin, "cell": self.cell}
        data.update({name: self.X[:, j] for j, name in enumerate(self.columns)})
        return pl.DataFrame(data)


def cumulative(counts: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Cumulative sums down the rows with a leading zero row (``cum[i]`` = sum of rows before i), so every
    trailing-window sum is one subtraction."""
    cum = np.zeros((counts.shape[0] + 1, *counts.shape[1:]), dtype=dtype)
    if counts.shape[0] == 0 or counts[0].size < 64:  # short rows: numpy's own loop
        np.cumsum(counts, axis=0, out=cum[1:])
        return cum
    # wide rows: one vector add per row is the same sequential sum as np.cumsum(axis=0), which walks the rows
    # column by column and takes 3-4x longer on a (shifts, cells) history
    for i in range(counts.shape[0]):
        np.add(cum[i], counts[i], out=cum[i + 1], dtype=cum.dtype)
    return cum


def window_sums(cum: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """Sums of the rows [end - length, end) for each end (cut at row 0), from :func:`cumulative`.

    The one trailing-window sum of the project: the feature windows, the baselines' windows and the feedback
    simulator's trailing patrol and crime counts."""
    ends = np.asarray(ends, dtype=np.int64)
    return cum[ends] - cum[np.maximum(ends - length, 0)]


class _Rows:
    """The rows a matrix is built for: every (origin, cell), or the flat origin-major indices ``flat``. Blocks
    are (n_origins, n_cells) arrays for every row, 1-D per-row arrays otherwise."""

    def __init__(self, origins: np.ndarray, n_cells: int, flat: np.ndarray | None = None):
        self.origins, self.n_cells, self.flat = origins, n_cells, flat  # origins sorted and unique
        self.position, self.cell = np.divmod(flat, n_cells) if flat is not None else (origins[:0], origins[:0])
        self.origin = origins[self.position]
        self._rings: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(adjacency) -> ring_terms

    def ring_terms(self, adjacency) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the flat indices of its cell's neighbours in an (origins, cells) block and their weights, as
        (max degree, rows) in the adjacency's stored order (zero-weight padding after them)."""
        key = id(adjacency)
        if key not in self._rings:
            n, indptr = self.n_cells, adjacency.indptr
            degree = np.diff(indptr)
            slot = np.arange(adjacency.indices.size) - np.repeat(indptr[:-1], degree)
            owner = np.repeat(np.arange(n), degree)
            width = int(degree.max()) if degree.size else 0
            neighbour, weight = np.zeros((n, width), np.int64), np.zeros((n, width), adjacency.dtype)
            neighbour[owner, slot], weight[owner, slot] = adjacency.indices, adjacency.data
            index = neighbour.T[:, self.cell] + self.position * n
            self._rings[key] = index, np.ascontiguousarray(weight.T[:, self.cell])
        return self._rings[key]

    def take(self, block: np.ndarray) -> np.ndarray:
        """The rows of a block computed over every (origin, cell). Indexed by (origin, cell) rather than through
        ``reshape(-1)``, which copies a whole block that is not C-ordered (a ring mean is a transposed product)."""
        if self.flat is None:
            return block
        return block.reshape(-1).take(self.flat) if block.flags.c_contiguous else block[self.position, self.cell]

    def per_origin(self, values: np.ndarray) -> np.ndarray:
        """A value per origin, the same in every cell (a broadcast view over every row)."""
        return np.broadcast_to(values[:, None], (self.origins.size, self.n_cells)) if self.flat is None else values[self.position]

    def per_cell(self, values: np.ndarray) -> np.ndarray:
        """A value per cell, the same at every origin (a broadcast view over every row)."""
        return np.broadcast_to(values, (self.origins.size, self.n_cells)) if self.flat is None else values[self.cell]


class _History:
    """Counts of shifts [h0, h1) as sparse events (row = shift - h0, column, count), and their running sums,
    in origin-relative indexing. Built from the panel's sparse rows, never as a dense (shifts, cells) array:
    about 30 of a city's thousands of cells have an incident in a shift, so each running sum kept is the
    previous one plus the few events between them.

    ``ends`` and ``reads`` (stride -> lookbacks in strides; stride 1: the plain cumulative sums, lookback 0 for
    :meth:`since_start`) name every window the caller will read: only those rows are kept (about half of a
    year-long history's), and reading any other row raises. Without them every row is kept."""

    def __init__(self, row: np.ndarray, col: np.ndarray, count: np.ndarray, h0: int, n_shifts: int, n_cols: int,
                 ends: np.ndarray | None = None, reads: dict[int, set[int]] | None = None):
        self.h0, self.n_shifts, self.n_cols = h0, n_shifts, n_cols
        self.row, self.col, self.count = row, col, count.astype(np.float32)  # rows sorted
        self.bounds = np.searchsorted(row, np.arange(n_shifts + 1))  # row r's events: [bounds[r], bounds[r + 1])
        self.ends, self.reads = ends, reads
        # float32 sums of whole counts are exact below 2**24 per cell, and half the memory traffic of float64
        self.cum, self._slot = self._running(self.row, n_shifts, 1)
        self._strided: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # stride -> (pad, sums, slots)
        self._origin_sums: dict[tuple[int, int], np.ndarray] = {}  # (id(rows), offset) -> _at_origin

    @classmethod
    def of(cls, panel: CountPanel, h0: int, h1: int, by_category: bool = False, ends: np.ndarray | None = None,
           reads: dict[int, set[int]] | None = None) -> _History:
        """Counts per cell summed over categories, or (``by_category``) per (category, cell) in column
        category * n_cells + cell."""
        rows = panel.slice(h0, h1)
        shift, cell, count = (rows[c].to_numpy() for c in ("shift", "cell", "count"))
        n = panel.n_cells
        if by_category:  # (shift, cell, category) rows are unique already
            return cls(shift - h0, rows["category"].to_numpy().astype(np.int64) * n + cell, count, h0, h1 - h0,
                       n * len(panel.categories), ends, reads)
        flat = (shift - h0) * n + cell  # sorted, so one (shift, cell)'s categories are adjacent
        first = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]]) if flat.size else flat
        total = np.add.reduceat(count, first) if flat.size else count
        return cls(shift[first] - h0, cell[first].astype(np.int64), total, h0, h1 - h0, n, ends, reads)

    def spread(self, adjacency, reads: dict[int, set[int]] | None = None) -> _History:
        """The history of each cell's neighbours' counts (adjacency[c, j] * counts of cell j, summed over j): its
        window sums are the sums of the neighbours' window sums, exact for whole counts, without a product over
        every (origin, cell)."""
        csc = adjacency.tocsc()  # column j lists the cells that have j as a neighbour
        per = np.diff(csc.indptr)[self.col]
        event = np.repeat(np.arange(self.col.size), per)
        at = np.arange(event.size) - np.repeat(np.cumsum(per) - per - csc.indptr[self.col], per)
        return _History(self.row[event], csc.indices[at].astype(np.int64), self.count[event] * csc.data[at], self.h0,
                        self.n_shifts, self.n_cols, self.ends, reads)

    def _running(self, row: np.ndarray, n_rows: int, lag: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Sums of the events in rows r - lag, r - 2 lag, ... for each r < n_rows + lag (``row``: the events' rows,
        sorted; lag 1: every earlier row, cumulative sums with a leading zero row), for the rows the reads need
        (``pad``: rows before the history's first), and each row's position in them (-1: not kept)."""
        n_out = n_rows + lag
        if self.ends is None or self.reads is None:
            keep = np.arange(n_out)
        else:
            end = self.ends + pad
            starts = [np.where(end >= k * lag, end - k * lag, end % lag) for k in self.reads.get(lag, ())]
            keep = np.unique(np.concatenate([end, *starts]))
        # an event counts in the kept rows of its phase after its own row: it is added at the first of them, then
        # carried by one running sum down the phase's kept rows (whole counts: float32 sums are exact)
        if lag == 1:  # one phase; rows and kept rows both sorted
            before = np.searchsorted(row, keep)  # events before each kept row
            first_after = np.repeat(np.arange(keep.size), np.diff(before, prepend=0))
            inside = slice(0, int(before[-1]))
            phases = [0] * keep.size
        else:  # each phase's kept rows in order
            keep = keep[np.lexsort((keep, keep % lag))]
            phase = keep % lag
            first_after = np.searchsorted(phase * n_out + keep, (row % lag) * n_out + row, side="right")
            found = first_after < keep.size
            found[found] = phase[first_after[found]] == row[found] % lag
            first_after, inside, phases = first_after[found], found, phase.tolist()
        out = np.zeros((keep.size, self.n_cols), np.float32)
        np.add.at(out.reshape(-1), first_after * self.n_cols + self.col[inside], self.count[inside])
        for j in range(1, keep.size):
            if phases[j] == phases[j - 1]:
                np.add(out[j], out[j - 1], out=out[j])
        slot = np.full(n_out, -1)
        slot[keep] = np.arange(keep.size)
        return out, slot

    @staticmethod
    def _kept(slot: np.ndarray, rows: np.ndarray) -> np.ndarray:
        found = slot[rows]
        if found.size and found.min() < 0:
            raise RuntimeError("a feature read a history row outside the reads it was built for; add its window "
                               "to the reads given to _History")
        return found

    def window(self, origins: np.ndarray, shifts: int, cols: slice = slice(None)) -> np.ndarray:
        """Sum of counts over [o - shifts, o) for each origin (history before h0 is empty by construction)."""
        ends = origins - self.h0
        hi, lo = self._kept(self._slot, ends), self._kept(self._slot, np.maximum(ends - shifts, 0))
        return self.cum[hi][:, cols] - self.cum[lo][:, cols]

    def window_at(self, at: _Rows, shifts: int, offset: int = 0) -> np.ndarray:
        """:meth:`window` for the rows of ``at`` (the same subtraction, per row), in columns ``offset`` + cell."""
        if at.flat is None:
            return self.window(at.origins, shifts, slice(offset, offset + at.n_cells))
        ends, cell = at.origin - self.h0, at.cell + offset
        lo = self._kept(self._slot, np.maximum(ends - shifts, 0))
        return self._at_origin(at, offset) - self.cum.reshape(-1).take(lo * self.n_cols + cell)

    def _at_origin(self, at: _Rows, offset: int = 0) -> np.ndarray:
        """Cumulative counts at each row's origin, in columns ``offset`` + cell: read once, shared by every
        window of those rows."""
        key = (id(at), offset)
        if key not in self._origin_sums:
            hi = self._kept(self._slot, at.origin - self.h0)
            self._origin_sums[key] = self.cum.reshape(-1).take(hi * self.n_cols + at.cell + offset)
        return self._origin_sums[key]

    def cumulative_at(self, shifts: np.ndarray) -> np.ndarray:
        """Cumulative counts from h0 to each of these shifts, every cell."""
        return self.cum[self._kept(self._slot, shifts - self.h0)]

    def since_start(self, at: _Rows) -> np.ndarray:
        """Cumulative counts from h0 to each row's origin."""
        if at.flat is None:
            return self.cumulative_at(at.origins)
        return self._at_origin(at)

    def lagged(self, origins: np.ndarray, stride: int, n: int, cells: np.ndarray | None = None) -> np.ndarray:
        """sum_{k=1..n} counts[o - k*stride]: the same shift of day (stride = shifts/day) or week. With ``cells``,
        one value per (origin, cell) pair instead of every cell of each origin."""
        pad, cum, slot = self._strided_cumulative(stride)
        d, q = np.divmod(origins - (self.h0 - pad), stride)
        hi, lo = self._kept(slot, d * stride + q), self._kept(slot, np.maximum(d - n, 0) * stride + q)
        if cells is not None:
            flat = cum.reshape(-1)
            return flat.take(hi * self.n_cols + cells) - flat.take(lo * self.n_cols + cells)
        return cum[hi] - cum[lo]

    def _strided_cumulative(self, stride: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Cumulative sums of every ``stride``-th shift per phase (the history padded at both ends to whole
        strides; row d * stride + q: phase q's first d strides), computed once per stride."""
        if stride not in self._strided:
            pad = self.h0 % stride
            extra = (-(pad + self.n_shifts)) % stride
            self._strided[stride] = pad, *self._running(self.row + pad, pad + self.n_shifts + extra, stride, pad)
        return self._strided[stride]

    def decayed(self, origins: np.ndarray, taus_shifts: Sequence[float], horizon: int) -> np.ndarray:
        """sum over the last ``horizon`` shifts of counts[o-k] * exp(-(k-1)/tau): the near-repeat intensity, for
        each tau (taus, origins, cells).

        Computed by one recursive filter, then truncated exactly at the horizon so the value does not depend
        on where the loaded history starts."""
        decays = [np.exp(-1.0 / tau) for tau in taus_shifts]
        g = np.array(decays).reshape(-1, 1)
        g_horizon = np.array([d**horizon for d in decays]).reshape(-1, 1)
        # e[i] = sum_{s < i} counts[s] g^(i-1-s) for i = 0..T (e[0] = 0): the recursion e[i+1] = g e[i] + counts[i]
        # one row at a time (the same arithmetic as scipy's lfilter([1], [1, -g])), every tau in one pass, adding
        # only the shift's events (adding a zero changes nothing). Only the rows the origins need are kept: e[o]
        # and the tail e[o - horizon].
        hi = origins - self.h0
        lo = hi - horizon
        tails = np.zeros((origins.size, g.size, self.n_cols))
        out = np.empty((g.size, origins.size, self.n_cols), np.float32)
        at_lo = {int(i): k for k, i in enumerate(lo) if i >= 0}
        at_hi = {int(i): k for k, i in enumerate(hi)}
        e = np.zeros((g.size, self.n_cols))
        col, count, bounds = self.col, self.count, self.bounds.tolist()
        for i in range(int(hi.max()) + 1 if hi.size and g.size else 0):
            if i in at_lo:
                np.multiply(e, g_horizon, out=tails[at_lo[i]])
            if i in at_hi:
                k = at_hi[i]
                np.subtract(e, tails[k], out=tails[k])
                out[:, k] = tails[k]
            if i < self.n_shifts:
                e *= g
                a, b = bounds[i], bounds[i + 1]
                if b > a:  # one event per (row, cell): histories from :meth:`of`
                    e[:, col[a:b]] += count[a:b]
        return out


def _neighbour_mean(values: np.ndarray, adjacency) -> np.ndarray:
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    summed = (adjacency @ values.T).T
    return (summed / np.maximum(degree, 1)).astype(np.float32)


def _ring_degree(adjacency) -> np.ndarray:
    """Each cell's divisor in :func:`_neighbour_mean` (its number of neighbours, at least 1), in its dtype."""
    return np.maximum(np.asarray(adjacency.sum(axis=1)).ravel(), 1)


def _ring_mean(values: np.ndarray, adjacency, at: _Rows) -> np.ndarray:
    """:func:`_neighbour_mean` of an (origins, cells) block at the rows of ``at``. For some rows, each row's
    neighbours are gathered and added one by one in the adjacency's stored order, as the sparse product adds
    them (y += a * x from y = 0), then divided the same way: the full block's value to the bit, without the
    product over every cell."""
    if at.flat is None:
        return _neighbour_mean(values, adjacency)
    index, weight = at.ring_terms(adjacency)
    dtype = np.result_type(adjacency.dtype, values.dtype)
    terms = np.ascontiguousarray(values).reshape(-1).take(index).astype(dtype, copy=False) * weight
    total = terms[0].copy() if terms.shape[0] else np.zeros(at.flat.size, dtype)
    for k in range(1, terms.shape[0]):
        total += terms[k]
    return (total / _ring_degree(adjacency)[at.cell]).astype(np.float32)


def _parent_index(panel: CountPanel, resolution: int) -> tuple[np.ndarray, int]:
    """Each study-area cell's parent at a coarser resolution, as a dense index (and the number of parents)."""
    import h3.api.numpy_int as h3n

    if resolution >= panel.study_area.resolution:
        raise ValueError(f"parent resolution {resolution} must be coarser than the grid's {panel.study_area.resolution}; "
                         f"use a smaller number in FeatureConfig.parent_resolutions")
    parents = np.array([h3n.cell_to_parent(int(c), resolution) for c in panel.study_area.cells], dtype=np.uint64)
    _, inverse = np.unique(parents, return_inverse=True)
    return inverse.astype(np.int64), int(inverse.max()) + 1


def _parent_sum(values: np.ndarray, parent: np.ndarray, n_parents: int) -> np.ndarray:
    """Group-sum of (origins, cells) values by parent cell, broadcast back to the cells."""
    n_rows = values.shape[0]
    flat = (np.arange(n_rows)[:, None] * n_parents + parent[None, :]).ravel()
    sums = np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=n_rows * n_parents)
    return sums.reshape(n_rows, n_parents)[:, parent].astype(np.float32)


def _class_sums(classes: np.ndarray, cells: np.ndarray, weights: np.ndarray, n_cells: int, n_classes: int) -> np.ndarray:
    """(n_classes, n_cells) sums of sparse count rows by their shift's class and their cell."""
    flat = classes.astype(np.int64) * n_cells + cells
    return np.bincount(flat, weights=weights, minlength=n_classes * n_cells).reshape(n_classes, n_cells)


def _year_month(shifts: np.ndarray, per_day: int) -> np.ndarray:
    """Months since 1970-01 of each shift's local day."""
    return (shifts // per_day).astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)


def _seasonal_rates(panel: CountPanel, history: _History, origins: np.ndarray) -> dict[str, np.ndarray]:
    """All-history rates per shift of each cell in the origin's shift of day, shift of the week and month of
    year: (counts in earlier shifts of that class) / (number of earlier shifts of that class), from first_shift."""
    per_day, n = panel.calendar.per_day, panel.n_cells
    h0, first = history.h0, panel.first_shift
    out: dict[str, np.ndarray] = {}
    for label, stride in (("shift_of_day", per_day), ("shift_of_week", 7 * per_day)):
        rows = panel.slice(first, h0)
        before = _class_sums(rows["shift"].to_numpy() % stride, rows["cell"].to_numpy(), rows["count"].to_numpy(), n, stride)
        deep = (origins.max() - h0) // stride + 2  # reaches back to h0 from every origin
        total = before[origins % stride] + history.lagged(origins, stride, int(deep))
        n_before = np.maximum((origins - first) // stride, 1)
        out[f"rate_{label}_all"] = (total / n_before[:, None]).astype(np.float32)

    # month of year: complete earlier months of the same calendar month, plus the origin's month so far
    ym_origin = _year_month(origins, per_day)
    ym0 = int(_year_month(np.array([first]), per_day)[0])
    ym_hi = int(ym_origin.max())
    rows = panel.slice(first, int(origins.max()))
    ym_rows = _year_month(rows["shift"].to_numpy(), per_day)
    done = ym_rows < ym_hi  # only months ending before the last origin's month (earlier origins filter below)
    monthly = _class_sums(ym_rows[done] - ym0, rows["cell"].to_numpy()[done], rows["count"].to_numpy()[done], n, ym_hi - ym0)
    all_shifts = np.arange(first, max(int(origins.max()), first + 1))
    month_shifts = np.bincount(_year_month(all_shifts, per_day) - ym0, minlength=ym_hi - ym0 + 1)[: ym_hi - ym0]
    # excl[k] = sum of months k' < k of the same calendar month (a running sum per calendar month)
    excl = np.zeros_like(monthly)
    excl_n = np.zeros(monthly.shape[0])
    running, running_n = np.zeros((12, n)), np.zeros(12)
    for k in range(monthly.shape[0]):
        m = (ym0 + k) % 12
        excl[k], excl_n[k] = running[m], running_n[m]
        running[m] += monthly[k]
        running_n[m] += month_shifts[k]
    m_last = (ym0 + monthly.shape[0]) % 12  # the last origin's month: every earlier month counts
    excl, excl_n = np.vstack([excl, running[m_last]]), np.append(excl_n, running_n[m_last])
    k_origin = ym_origin - ym0
    month_start = np.maximum(ym_origin.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) * per_day, first)
    so_far = history.cumulative_at(origins) - history.cumulative_at(month_start)
    base, base_n = excl[k_origin], excl_n[k_origin]
    shifts = np.maximum(base_n + (origins - month_start), 1)
    out["rate_month_all"] = ((base + so_far) / shifts[:, None]).astype(np.float32)
    return out


def build_features(panel: CountPanel, origins: int | np.ndarray, config: FeatureConfig = FeatureConfig(),
                   rows: np.ndarray | None = None) -> FeatureMatrix:
    """Feature matrix for one origin or many (vectorised over cells and origins, no per-origin loop).

    ``rows``: only these origin-major flat indices (origin position * n_cells + cell, sorted), e.g. the rows a
    model keeps after sampling zeros; each row's values are those of the full matrix's row."""
    origins = np.unique(np.atleast_1d(np.asarray(origins, dtype=np.int64)))
    if origins[0] < panel.first_shift:
        raise ValueError(f"origin {int(origins[0])} precedes the panel's first shift {panel.first_shift}")
    n_cells = panel.n_cells
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows[0] < 0 or rows[-1] >= origins.size * n_cells or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"rows must be sorted unique indices below {origins.size * n_cells} "
                             f"(origins x cells); give np.flatnonzero of a mask over the full matrix")
    at = _Rows(origins, n_cells, rows)
    per_day = panel.calendar.per_day
    horizon = config.lookback(per_day)
    h0 = max(panel.first_shift, int(origins[0]) - horizon)
    h1 = int(origins[-1])
    parent_days = config.parent_window_days if config.parent_resolutions else ()
    reads: dict[int, set[int]] | None = None  # every window read below (seasonal rates read any row: keep all)
    if not config.seasonal:
        windows = {*config.window_days, *config.spatial_window_days, *(d for d in parent_days if d is not None)}
        reads = {}
        for stride, lookbacks in ((1, {0, 1, *(d * per_day for d in windows)}), (per_day, set(config.same_shift_days)),
                                  (7 * per_day, {config.same_weekday_weeks})):
            reads.setdefault(stride, set()).update(lookbacks)
    history = _History.of(panel, h0, h1, ends=origins - h0, reads=reads)
    blocks: dict[str, np.ndarray] = {}
    full: dict[int, np.ndarray] = {}  # window days -> (origins, cells) sums, for features that need every cell

    def window(days: int) -> np.ndarray:
        if days not in full:
            full[days] = history.window(origins, days * per_day)
        return full[days]

    def lagged(stride: int, n: int) -> np.ndarray:
        return history.lagged(origins, stride, n) if rows is None else history.lagged(at.origin, stride, n, at.cell)

    blocks["count_prev_shift"] = history.window_at(at, 1)
    spread: dict[int, _History] = {}  # id(adjacency) -> the neighbours' history, for rows

    def ring_window(adjacency, days: int) -> np.ndarray:
        """Mean of the neighbours' counts over a window: of the full block, or for rows, from their history."""
        if rows is None:
            return _neighbour_mean(window(days), adjacency)
        if id(adjacency) not in spread:
            spread[id(adjacency)] = history.spread(adjacency, {1: {d * per_day for d in config.spatial_window_days}})
        return (spread[id(adjacency)].window_at(at, days * per_day) / _ring_degree(adjacency)[at.cell]).astype(np.float32)

    for days in config.window_days:
        needs_cells = (rows is None and days in config.spatial_window_days) or days in parent_days
        blocks[f"count_{days}d"] = at.take(window(days)) if needs_cells else history.window_at(at, days * per_day)
    for days in config.same_shift_days:
        blocks[f"same_shift_{days}d"] = lagged(per_day, days)
    blocks[f"same_weekday_shift_{config.same_weekday_weeks}w"] = lagged(7 * per_day, config.same_weekday_weeks)
    for days in config.spatial_window_days:
        blocks[f"ring1_mean_{days}d"] = ring_window(panel.study_area.ring1, days)
        blocks[f"ring2_mean_{days}d"] = ring_window(panel.study_area.ring2, days)
    decays = history.decayed(origins, [tau_days * per_day for tau_days in config.decay_days], horizon)
    for tau_days, decayed in zip(config.decay_days, decays):  # floats, unlike the day counts above
        label = f"{tau_days:g}d"
        blocks[f"near_repeat_{label}"] = at.take(decayed)
        blocks[f"near_repeat_ring1_{label}"] = _ring_mean(decayed, panel.study_area.ring1, at)

    # long-run rate per shift since the panel starts: older history enters as one per-cell total
    before = panel.cell_totals(panel.first_shift, h0) if h0 > panel.first_shift else np.zeros(n_cells)
    elapsed = np.maximum(origins - panel.first_shift, 1).astype(np.float64)

    def long_run_rate(at: _Rows) -> np.ndarray:
        return ((at.per_cell(before) + history.since_start(at)) / at.per_origin(elapsed)).astype(np.float32)

    long_run = long_run_rate(_Rows(origins, n_cells)) if (config.spatial_all_history or config.parent_resolutions) else None
    blocks["long_run_rate"] = long_run_rate(at) if long_run is None else at.take(long_run)
    if long_run is not None and config.spatial_all_history:
        blocks["ring1_mean_all"] = _ring_mean(long_run, panel.study_area.ring1, at)
        blocks["ring2_mean_all"] = _ring_mean(long_run, panel.study_area.ring2, at)
    seasonal = _seasonal_rates(panel, history, origins) if config.seasonal else {}
    blocks.update({name: at.take(values) for name, values in seasonal.items()})
    for res in config.parent_resolutions:
        parent, n_parents = _parent_index(panel, res)
        for window_days in config.parent_window_days:
            if window_days is None:  # all history, as a rate per shift
                assert long_run is not None  # built above whenever there are parent resolutions
                own, label = long_run, "all"
            else:
                own, label = window(window_days), f"{window_days}d"
            blocks[f"parent_r{res}_{label}"] = at.take(_parent_sum(own, parent, n_parents))
        for name, values in seasonal.items():
            blocks[f"parent_r{res}_{name}"] = at.take(_parent_sum(values, parent, n_parents))
    full.clear()

    c0 = max(panel.first_shift, int(origins[0]) - config.category_window_days * per_day)  # all they reach
    if panel.categories:  # one history, a column per (category, cell)
        by_category = _History.of(panel, c0, h1, by_category=True, ends=origins - c0,
                                  reads={1: {config.category_window_days * per_day}})
        cat_shifts = config.category_window_days * per_day
        for k, name in enumerate(panel.categories):
            blocks[f"cat_{name}_{config.category_window_days}d"] = by_category.window_at(at, cat_shifts, offset=k * n_cells)

    for name, values in panel.calendar.features(origins).items():
        blocks[name] = at.per_origin(values)
    if config.include_location:
        lat, lon = panel.study_area.centroids
        blocks["cell_lat"] = at.per_cell(lat.astype(np.float32))
        blocks["cell_lon"] = at.per_cell(lon.astype(np.float32))

    columns = list(blocks)
    X = np.empty((origins.size * n_cells if rows is None else rows.size, len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        X[:, j] = blocks.pop(name).reshape(-1)
    return FeatureMatrix(X=X, columns=columns, origins=origins, n_cells=n_cells, meta={"config": config.__dict__},
                         rows=rows)


def build_targets(panel: CountPanel, origins: int | np.ndarray, category: str | list[str] | None = None) -> np.ndarray:
    """Observed counts at each origin shift, aligned with :func:`build_features` rows (origin-major)."""
    origins = np.unique(np.atleast_1d(np.asarray(origins, dtype=np.int64)))
    rows = panel.slice(int(origins[0]), int(origins[-1]) + 1, category)
    rows = rows.filter(pl.col("shift").is_in(origins))
    pos = np.searchsorted(origins, rows["shift"].to_numpy())
    flat = pos * panel.n_cells + rows["cell"].to_numpy()
    return np.bincount(flat, weights=rows["count"].to_numpy(), minlength=origins.size * panel.n_cells).astype(np.float32)
