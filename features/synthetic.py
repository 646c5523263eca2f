"""A synthetic city with a known true intensity: self-exciting (Hawkes / ETAS-style) incidents on a real grid.

Real data never shows the intensity that generated it, so a forecaster's error cannot be split into "the
data are noisy" and "the model is wrong". Here the generator is known, and ``SyntheticResult.true_expected``
is the best possible forecast (the conditional mean given everything before the shift), so any forecaster
can be scored against the ceiling.

Model (times in hours, cells are rows of the study area)::

    lambda(c, t) = mu(c, t) + sum_{events i, t_i < t} theta * omega * exp(-omega (t - t_i)) * K[c_i, c]

``mu(c, t) = background[c] * shift_profile[shift of day] * weekday_profile[local weekday]`` is piecewise
constant per shift; ``K`` is row-stochastic: an offspring stays in its parent's cell with probability
``1 - spread`` and otherwise lands in a uniformly chosen ring-1 neighbour inside the area (a cell without
neighbours keeps all of it). Mass is conserved, so the long-run count is ``background total / (1 - theta)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.calendar import ShiftCalendar
from features.grid import StudyArea, points_to_cells
from features.panel import CountPanel, build_panel
from features.validation import CANONICAL_SCHEMA

US_PER_HOUR = 3_600_000_000
EARTH_RADIUS_M = 6_371_008.8
DEFAULT_SHIFT_PROFILE_3 = (0.7, 1.2, 1.1)  # day, evening, night (relative; night/evening busier)
DEFAULT_WEEKDAY_PROFILE = (0.95, 0.95, 0.95, 1.0, 1.1, 1.1, 0.95)  # Monday..Sunday, mean 1


def _profile(values, length: int, name: str) -> np.ndarray:
    """Positive multipliers rescaled to mean 1, so ``background`` stays the average hourly rate."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (length,):
        raise ValueError(f"{name} needs {length} values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and positive, got {values!r}")
    return arr / arr.mean()


@dataclass
class SyntheticCity:
    """Configuration of the generator. ``background`` is expected background events per cell per hour."""

    study_area: StudyArea
    calendar: ShiftCalendar
    background: np.ndarray
    shift_profile: tuple[float, ...] | None = None  # per shift of day; None -> (0.7, 1.2, 1.1) for 3 shifts, else flat
    weekday_profile: tuple[float, ...] = DEFAULT_WEEKDAY_PROFILE  # Monday..Sunday (local day of the shift)
    branching_ratio: float = 0.3  # theta: mean offspring per event; < 1 so clusters are finite
    decay_per_hour: float = 1 / 24  # omega: exponential kernel rate, mean delay 1/omega hours (a day)
    spread: float = 0.3  # probability an offspring lands in a ring-1 neighbour instead of the parent cell
    categories: tuple[str, ...] = ("synthetic",)
    category_weights: tuple[float, ...] | None = None  # iid label per event; None -> uniform

    def __post_init__(self) -> None:
        n = len(self.study_area)
        self.background = np.asarray(self.background, dtype=np.float64)
        if self.background.shape != (n,):
            raise ValueError(f"background needs shape ({n},), got {self.background.shape}")
        if not np.all(np.isfinite(self.background)) or np.any(self.background < 0):
            raise ValueError("background rates must be finite and >= 0")
        if self.shift_profile is None:
            per_day = self.calendar.per_day
            self.shift_profile = DEFAULT_SHIFT_PROFILE_3 if per_day == 3 else (1.0,) * per_day
        self.shift_profile = tuple(float(v) for v in self.shift_profile)
        self.weekday_profile = tuple(float(v) for v in self.weekday_profile)
        _profile(self.shift_profile, self.calendar.per_day, "shift_profile")
        _profile(self.weekday_profile, 7, "weekday_profile")
        if not 0 <= self.branching_ratio < 1:
            raise ValueError(f"branching_ratio must be in [0, 1) (>= 1 explodes), got {self.branching_ratio}")
        if not self.decay_per_hour > 0:
            raise ValueError(f"decay_per_hour must be > 0, got {self.decay_per_hour}")
        if not 0 <= self.spread <= 1:
            raise ValueError(f"spread must be in [0, 1], got {self.spread}")
        self.categories = tuple(self.categories)
        if not self.categories:
            raise ValueError("categories must be non-empty")
        if self.category_weights is not None:
            w = np.asarray(self.category_weights, dtype=np.float64)
            if w.shape != (len(self.categories),) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError("category_weights needs one non-negative weight per category")

    # --- derived pieces --------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return len(self.study_area)

    @property
    def category_probabilities(self) -> np.ndarray:
        """Share of each category; the expected count of category k is this share times ``true_expected``."""
        if self.category_weights is None:
            return np.full(len(self.categories), 1 / len(self.categories))
        w = np.asarray(self.category_weights, dtype=np.float64)
        return w / w.sum()

    def spatial_kernel(self) -> sp.csr_matrix:
        """Row-stochastic K: K[p, c] = probability an offspring of an event in cell p lands in cell c."""
        adj = sp.csr_matrix(self.study_area.ring1, dtype=np.float64)
        deg = np.asarray(adj.sum(axis=1)).ravel()
        has = deg > 0
        stay = np.where(has, 1 - self.spread, 1.0)
        move = np.where(has, self.spread / np.where(has, deg, 1.0), 0.0)
        return sp.csr_matrix(sp.diags(stay) + sp.diags(move) @ adj)

    def background_rates(self, shift_ids: np.ndarray) -> np.ndarray:
        """(len(shift_ids), n_cells) background events per hour during each shift."""
        ids = np.asarray(shift_ids, dtype=np.int64)
        day, idx = np.divmod(ids, self.calendar.per_day)
        weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0, as in ShiftCalendar.features
        mult = _profile(self.shift_profile, self.calendar.per_day, "shift_profile")[idx]
        mult = mult * _profile(self.weekday_profile, 7, "weekday_profile")[weekday]
        return mult[:, None] * self.background[None, :]


@dataclass
class SyntheticResult:
    """One simulated history over shifts [first_shift, end_shift).

    ``true_expected[t, c]`` = E[N(cell c, shift first_shift + t) | every simulated event before that shift's
    start], all categories together (category k's share is ``city.category_probabilities[k]``). It is the
    background integrated over the shift's real length plus the expected triggered events: those from the
    excitation left by earlier events and those from the cascade inside the shift. ``background_expected``
    is the background part alone. ``incidents`` (canonical schema, sorted by time) hold only events inside
    [first_shift, end_shift); burn-in events are not listed but are part of the history conditioned on.
    ``generation`` and ``cell_index`` are aligned with the rows of ``incidents`` (generation 0 = background).
    """

    city: SyntheticCity
    first_shift: int
    end_shift: int
    incidents: pl.DataFrame
    true_expected: np.ndarray
    background_expected: np.ndarray
    shift_hours: np.ndarray
    generation: np.ndarray
    cell_index: np.ndarray
    burn_in_shifts: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_shifts(self) -> int:
        return self.end_shift - self.first_shift

    def panel(self) -> CountPanel:
        """The incidents as a CountPanel over exactly [first_shift, end_shift)."""
        panel, _ = build_panel(
            self.incidents, self.city.study_area, self.city.calendar, self.city.categories,
            first_shift=self.first_shift, end_shift=self.end_shift,
        )
        return panel


# --- backgrounds -----------------------------------------------------------------------------------
def background_from_rates(
    study_area: StudyArea, per_cell_counts: np.ndarray, hours: float, floor: float = 0.0
) -> np.ndarray:
    """Hourly background per cell from observed counts over ``hours`` (e.g. a real panel's cell totals),
    plus ``floor`` events/hour everywhere so no cell is impossible. Note real counts include triggered
    events; multiply by (1 - theta) to keep the long-run total unchanged."""
    counts = np.asarray(per_cell_counts, dtype=np.float64)
    if counts.shape != (len(study_area),):
        raise ValueError(f"per_cell_counts needs shape ({len(study_area)},), got {counts.shape}")
    if not hours > 0 or floor < 0 or np.any(counts < 0):
        raise ValueError("hours must be > 0, floor and counts >= 0")
    return counts / hours + floor


def smooth_background(
    study_area: StudyArea,
    total_per_day: float,
    seed: int | np.random.Generator | None,
    *,
    sigma: float = 1.5,
    passes: int = 3,
    floor_share: float = 0.0,
) -> np.ndarray:
    """A spatially smooth lognormal background (events per cell per hour) summing to ``total_per_day / 24``.

    White noise averaged over each cell and its ring-1 neighbours ``passes`` times gives a correlated field;
    exp(sigma * standardised field) makes a few contiguous hot areas and many near-zero cells, as in real
    crime maps. ``floor_share`` of the total is spread evenly so every cell has some chance.
    """
    if total_per_day < 0 or not 0 <= floor_share <= 1 or sigma < 0 or passes < 0:
        raise ValueError("need total_per_day >= 0, 0 <= floor_share <= 1, sigma >= 0, passes >= 0")
    rng = np.random.default_rng(seed)
    n = len(study_area)
    adj = study_area.ring1
    deg = np.asarray(adj.sum(axis=1)).ravel()
    z = rng.standard_normal(n)
    for _ in range(passes):
        z = (z + adj @ z) / (1 + deg)
    sd = z.std()
    z = (z - z.mean()) / sd if sd > 0 else np.zeros(n)
    w = np.exp(sigma * z)
    w = (1 - floor_share) * w / w.sum() + floor_share / n
    return total_per_day / 24 * w


# --- simulation ------------------------------------------------------------------------------------
def _offspring(
    rng: np.random.Generator, city: SyntheticCity, t_us: np.ndarray, cell: np.ndarray, end_us: int,
    adj: sp.csr_matrix, deg: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One generation of children (times in integer microseconds, cells), dropping those at/after end."""
    n_children = rng.poisson(city.branching_ratio, size=t_us.size)
    parent = np.repeat(np.arange(t_us.size), n_children)
    delay_h = rng.exponential(1 / city.decay_per_hour, size=parent.size)
    child_t = t_us[parent] + np.floor(delay_h * US_PER_HOUR).astype(np.int64)
    child_cell = cell[parent]
    d = deg[child_cell]
    moves = (rng.random(parent.size) < city.spread) & (d > 0)
    pick = rng.integers(0, np.maximum(d, 1))  # uniform neighbour slot in [0, deg)
    if adj.indices.size:
        neighbour = adj.indices[np.minimum(adj.indptr[child_cell] + pick, adj.indices.size - 1)]
        child_cell = np.where(moves, neighbour, child_cell)
    keep = child_t < end_us
    return child_t[keep], child_cell[keep].astype(np.int64)


def _jittered_points(
    rng: np.random.Generator, study_area: StudyArea, cell: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Centroid plus a uniform offset in a disc of radius edge/3 (inside the hexagon's inscribed circle,
    radius ~0.87 edge), then checked with H3 so every point bins back into its own cell (any that would not
    fall back to the centroid; their number is returned)."""
    lat0, lon0 = study_area.centroids
    area_m2 = study_area.areas_km2 * 1e6
    edge_m = np.sqrt(2 * area_m2 / (3 * np.sqrt(3)))  # regular hexagon: area = 3 sqrt(3) / 2 * edge^2
    r = edge_m[cell] / 3 * np.sqrt(rng.random(cell.size))
    angle = rng.random(cell.size) * 2 * np.pi
    lat_c, lon_c = lat0[cell], lon0[cell]
    lat = lat_c + np.degrees(r * np.cos(angle) / EARTH_RADIUS_M)
    lon = lon_c + np.degrees(r * np.sin(angle) / (EARTH_RADIUS_M * np.cos(np.radians(lat_c))))
    wrong = np.zeros(cell.size, dtype=bool)
    if cell.size:
        wrong = points_to_cells(lat, lon, study_area.resolution) != study_area.cells[cell]
        lat, lon = np.where(wrong, lat_c, lat), np.where(wrong, lon_c, lon)
    return lat, lon, int(wrong.sum())


def _start_excitation(
    city: SyntheticCity, t_us: np.ndarray, cell: np.ndarray, starts_us: np.ndarray
) -> np.ndarray:
    """(n_shifts, n_cells) expected triggering intensity per hour at each shift's start from the events
    strictly before it: sum_i theta omega exp(-omega (a - t_i)) K[c_i, :]."""
    n_shifts, n = starts_us.size - 1, city.n_cells
    omega = city.decay_per_hour
    # events in shift s deposit exp(-omega (a_{s+1} - t_i)) at the start of shift s + 1 (parent-cell space)
    shift = np.searchsorted(starts_us, t_us, side="right") - 1
    gap_h = (starts_us[shift + 1] - t_us) / US_PER_HOUR
    deposit = np.bincount(
        (shift + 1) * n + cell, weights=np.exp(-omega * gap_h), minlength=(n_shifts + 1) * n
    ).reshape(n_shifts + 1, n)[:n_shifts]
    decay = np.exp(-omega * np.diff(starts_us) / US_PER_HOUR)
    state = np.zeros((n_shifts, n))
    carry = np.zeros(n)
    for s in range(n_shifts):  # loop over time steps only; each step is a vector over cells
        carry = carry * (decay[s - 1] if s else 0.0) + deposit[s]
        state[s] = carry
    kernel_t = city.spatial_kernel().T.tocsr()
    return city.branching_ratio * omega * (kernel_t @ state.T).T


def _integrate_shifts(
    city: SyntheticCity, x0: np.ndarray, mu: np.ndarray, hours: np.ndarray, max_step_hours: float,
    chunk_elements: int = 4_000_000,
) -> np.ndarray:
    """Expected count over each shift: integral of mu + x(t), where the expected excitation x obeys the
    linear ODE  dx/dt = -omega x + theta omega (mu + x) K  (the in-shift cascade).

    Classic RK4 with a per-shift step of at most ``max_step_hours``. The system is linear with constant
    coefficients inside a shift, so each RK4 step applies the 4th-order Taylor polynomial of the exact
    propagator; the relative error scales as (omega (1 + theta) h)^4: ~1e-11 for the defaults (omega = 1/24,
    h = 15 min) and ~1e-8 for a 4-hour kernel (checked against the exact matrix exponential in the tests).
    """
    theta, omega = city.branching_ratio, city.decay_per_hour
    kernel_t = city.spatial_kernel().T.tocsr()
    n_steps = max(1, int(np.ceil(float(hours.max(initial=0.0)) / max_step_hours)))
    out = np.empty_like(mu)
    cols = max(1, chunk_elements // max(city.n_cells, 1))
    for lo in range(0, mu.shape[0], cols):  # chunks of shifts bound memory; cells stay vectorised
        # cells x shifts layout, so the sparse kernel multiplies contiguous columns without transposes
        m = np.ascontiguousarray(mu[lo : lo + cols].T)
        x = np.ascontiguousarray(x0[lo : lo + cols].T)
        h = hours[lo : lo + cols] / n_steps
        drive = theta * omega * (kernel_t @ m)  # constant inside the shift
        integral = np.zeros_like(x)

        def f(xx: np.ndarray, drive: np.ndarray = drive) -> np.ndarray:  # this chunk's drive, bound now
            return drive + theta * omega * (kernel_t @ xx) - omega * xx

        for _ in range(n_steps):
            k1 = f(x)
            y2 = x + h / 2 * k1
            k2 = f(y2)
            y3 = x + h / 2 * k2
            k3 = f(y3)
            y4 = x + h * k3
            k4 = f(y4)
            # dI/dt = mu + x, so I's RK4 stages are mu plus the x-stage arguments
            integral += h / 6 * (6 * m + x + 2 * y2 + 2 * y3 + y4)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[lo : lo + cols] = integral.T
    return out


def simulate(
    city: SyntheticCity,
    first_shift: int,
    end_shift: int,
    seed: int | np.random.SeedSequence | None,
    *,
    burn_in_shifts: int = 0,
    max_step_hours: float = 0.25,
) -> SyntheticResult:
    """Simulate shifts [first_shift, end_shift) by the cluster (branching) representation in continuous time.

    Background events: Poisson count per cell and shift, uniform times inside the shift. Then generation by
    generation: Poisson(theta) children per event, Exponential(omega) delays, the parent's cell or a random
    ring-1 neighbour; children at or after the end are dropped. ``burn_in_shifts`` earlier shifts are
    simulated first (and conditioned on, not returned) so the output starts near stationarity. Times are
    integer microseconds throughout, so shift membership is exact. Deterministic given ``seed``.
    """
    if end_shift <= first_shift:
        raise ValueError(f"need end_shift > first_shift, got [{first_shift}, {end_shift})")
    if burn_in_shifts < 0 or not max_step_hours > 0:
        raise ValueError("burn_in_shifts must be >= 0 and max_step_hours > 0")
    # independent streams: changing how points are jittered never changes event times or cells
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    bg_rng, branch_rng, mark_rng = (np.random.default_rng(s) for s in root.spawn(3))
    cal, area, n = city.calendar, city.study_area, city.n_cells
    shift_ids = np.arange(first_shift - burn_in_shifts, end_shift, dtype=np.int64)
    starts_us = cal.starts_utc(np.append(shift_ids, end_shift)).astype(np.int64)
    length_us = np.diff(starts_us)
    hours = length_us / US_PER_HOUR
    mu = city.background_rates(shift_ids)  # per hour
    background_expected = mu * hours[:, None]

    # background events
    counts = bg_rng.poisson(background_expected)
    flat = np.repeat(np.arange(counts.size), counts.ravel())
    s_idx, cell = np.divmod(flat, n)
    t_us = starts_us[s_idx] + np.floor(bg_rng.random(flat.size) * length_us[s_idx]).astype(np.int64)
    times, cells, gens = [t_us], [cell.astype(np.int64)], [np.zeros(flat.size, dtype=np.int32)]

    # offspring, one generation at a time (finite because theta < 1)
    adj = sp.csr_matrix(area.ring1)
    adj.sort_indices()
    deg = np.diff(adj.indptr)
    generation = 0
    while city.branching_ratio > 0 and times[-1].size:
        generation += 1
        child_t, child_c = _offspring(branch_rng, city, times[-1], cells[-1], int(starts_us[-1]), adj, deg)
        times.append(child_t)
        cells.append(child_c)
        gens.append(np.full(child_t.size, generation, dtype=np.int32))
    t_all, c_all, g_all = np.concatenate(times), np.concatenate(cells), np.concatenate(gens)
    order = np.lexsort((c_all, t_all))
    t_all, c_all, g_all = t_all[order], c_all[order], g_all[order]

    # the best possible forecast: start excitation from actual history + expected in-shift cascade
    if city.branching_ratio > 0:
        x0 = _start_excitation(city, t_all, c_all, starts_us)
        true_expected = _integrate_shifts(city, x0, mu, hours, max_step_hours)
    else:
        true_expected = background_expected.copy()

    # canonical incidents for the requested window only
    in_window = t_all >= starts_us[burn_in_shifts]
    t_out, c_out, g_out = t_all[in_window], c_all[in_window], g_all[in_window]
    lat, lon, centroid_fallbacks = _jittered_points(mark_rng, area, c_out)
    category = np.asarray(city.categories, dtype=object)[
        mark_rng.choice(len(city.categories), size=t_out.size, p=city.category_probabilities)
    ]
    incidents = (
        pl.DataFrame(
            {
                "occurred_at": pl.Series(t_out, dtype=pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
                "category": pl.Series(category.tolist(), dtype=pl.String),
                "latitude": lat,
                "longitude": lon,
            }
        )
        .with_columns(
            ("syn-" + pl.int_range(1, pl.len() + 1, dtype=pl.Int64).cast(pl.String).str.zfill(6)).alias("incident_id"),
            pl.lit(cal.timezone, dtype=pl.String).alias("timezone"),
            pl.lit("synthetic", dtype=pl.String).alias("source"),
        )
        .select(list(CANONICAL_SCHEMA))
        .cast(CANONICAL_SCHEMA)  # type: ignore[arg-type]  # polars#14468: dict[str, ...] keys
    )
    keep = slice(burn_in_shifts, None)
    return SyntheticResult(
        city=city,
        first_shift=first_shift,
        end_shift=end_shift,
        incidents=incidents,
        true_expected=true_expected[keep],
        background_expected=background_expected[keep],
        shift_hours=hours[keep],
        generation=g_out,
        cell_index=c_out,
        burn_in_shifts=burn_in_shifts,
        meta={
            "seed": None if isinstance(seed, np.random.SeedSequence) else seed,
            "generations": generation,
            "events_simulated": int(t_all.size),
            "max_step_hours": max_step_hours,
            "centroid_fallbacks": centroid_fallbacks,
        },
    )
