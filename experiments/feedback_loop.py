"""Closed-loop feedback simulator: do patrols sent by a forecast narrow the record onto where they already went?

Lum & Isaac (2016) and Ensign et al. (2018) argue that predictive policing learns from data its own patrols
produce. This module makes that loop explicit, with a known truth, so it can be measured per policy.

World. A true expected count ``expected[t, c]`` per shift and cell: from a real city's history
(:func:`world_from_history`: a smoothed rate per cell x shift of day x day of week) or the synthetic Hawkes
city's known conditional mean (:func:`world_from_synthetic`). True incidents are Poisson draws (or, for the
synthetic city, its simulated events).

Recording. Every true incident is *reported* by the public with probability ``report_prob`` wherever it
happens; an unreported incident in a cell holding a patrol is *discovered* with probability
``discover_prob`` (patrols go to distinct cells, so presence is 0 or 1). The department's record is reported +
discovered; the two streams are kept apart so a policy can train on reported incidents only. Draws use common
random numbers: the true, reported and would-be-discovered counts are drawn once per world and seed, so every
policy faces the same crimes and only where it looks differs.

Loop. A warm-up sends ``patrols`` patrols to uniformly random cells (the same for every policy) to build a first
record. Then, each shift, the policy's forecaster (any :class:`forecasting.base.Forecaster`, fitted on a
cadence on the policy's training stream as a :class:`CountPanel`, so the project's features apply unchanged and
see only shifts before the one forecast) ranks the cells; patrols go to the top cells (ties: the project's
seeded rule), optionally with an exploration share drawn at random; the shift's incidents are recorded and
appended to the stream.

The Ensign correction. Ensign et al. weight a discovered incident by the inverse of the probability that police
were sent to its cell. With a deterministic top-k that probability is 1 in flagged cells and 0 elsewhere, so the
weight is undefined where it matters: nothing can be learnt about unvisited cells, however it is weighted. The
principled version needs (i) a randomised allocation with a known inclusion probability ``pi_c > 0`` in every
cell and (ii) weights the panel (integer counts) can hold. Here (i): the top ``k - m`` cells are patrolled
(``pi = 1``) and ``m`` patrols go to cells drawn uniformly from the rest (``pi = m / (n - k + m)``; the warm-up
has ``pi = k / n``). (ii): importance weighting by thinning, the rejection-sampling form of the same estimator
(Ensign et al. accept a discovered incident with probability inversely proportional to the patrol probability):
each discovered incident is kept with probability ``pi_min / pi_c``, ``pi_min`` the smallest inclusion probability
the policy ever uses. Then E[kept discovered in c] = lambda_c (1 - r) d pi_c * pi_min / pi_c = lambda_c (1 - r) d
pi_min, the same multiple of the truth in every cell and shift, so reported + kept discovered is an unbiased
(up to one constant) picture of the truth. The price is variance: most discovered incidents are dropped.

Measures per round (vectorised over rounds after the run; windows are trailing, current shift included):
``patrol_gini`` (Gini of patrol counts per cell over the window) and ``patrol_gini_cumulative`` (since the
warm-up began), ``recorded_topk_share`` (share of the window's recorded incidents in the k cells with most),
``tvd_recorded`` / ``tvd_training`` (total variation distance between the spatial distribution of the
department's record / the policy's training stream and that of the true incidents, over the window),
``outside_true_topk`` (share of patrols in cells outside the top-k of the true expected count), ``churn``
(1 - Jaccard of consecutive shifts' patrolled cells), ``captured`` and ``captured_expected`` (share of the shift's
true incidents / true expected count in patrolled cells).
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from features.calendar import EPOCH, ShiftCalendar
from features.grid import StudyArea
from features.matrix import FeatureConfig, cumulative, window_sums
from features.panel import COUNTS_SCHEMA, CountPanel
from forecasting.base import Forecaster
from forecasting.baselines import Naive
from forecasting.lgbm import LightGBMForecaster
from forecasting.measures import gini, jaccard, top_share
from forecasting.metrics import rank_cells

MEASURES = (
    "patrol_gini", "patrol_gini_cumulative", "recorded_topk_share", "tvd_recorded", "tvd_training",
    "outside_true_topk", "churn", "captured", "captured_expected",
)
# per-shift measures (no window) are noisy: the plot and the summary smooth them
PER_SHIFT = ("outside_true_topk", "churn", "captured", "captured_expected")


# --- the truth ------------------------------------------------------------------------------------
@dataclass
class World:
    """True expected incidents per shift and cell over shifts [first_shift, first_shift + n_shifts).

    ``realised`` (optional) is a known realisation (the synthetic city's own events); otherwise true incidents
    are Poisson draws from ``expected``."""

    study_area: StudyArea
    calendar: ShiftCalendar
    first_shift: int
    expected: np.ndarray  # (n_shifts, n_cells)
    realised: np.ndarray | None = None
    name: str = "world"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.expected = np.asarray(self.expected, dtype=np.float64)
        n = len(self.study_area)
        if self.expected.ndim != 2 or self.expected.shape[1] != n or self.expected.shape[0] == 0:
            raise ValueError(f"expected needs shape (n_shifts, {n}), got {self.expected.shape}")
        if not np.all(np.isfinite(self.expected)) or np.any(self.expected < 0):
            raise ValueError("expected counts must be finite and >= 0")
        if self.realised is not None:
            self.realised = np.asarray(self.realised)
            if self.realised.shape != self.expected.shape or np.any(self.realised < 0):
                raise ValueError(f"realised needs shape {self.expected.shape} and non-negative counts")

    @property
    def n_shifts(self) -> int:
        return self.expected.shape[0]

    @property
    def n_cells(self) -> int:
        return self.expected.shape[1]

    @property
    def shifts(self) -> np.ndarray:
        return np.arange(self.first_shift, self.first_shift + self.n_shifts, dtype=np.int64)


def weekday_of(shifts: np.ndarray, per_day: int) -> np.ndarray:
    """Local weekday of each shift (Monday = 0), as in ShiftCalendar.features."""
    return ((np.asarray(shifts, dtype=np.int64) // per_day) + 3) % 7


def intensity_from_history(
    panel: CountPanel, start: int, stop: int, shifts: np.ndarray, *, scale: float = 1.0, shrink: float = 20.0
) -> np.ndarray:
    """Expected count per (shift, cell) for ``shifts`` from the panel's counts over [start, stop).

    A year of one cell's counts split by shift of day and weekday (21 slots) is too noisy to be a truth, so:
    each cell's total rate, times its shift-of-day shares shrunk towards the city's (``shrink`` pseudo-incidents),
    times a city-wide weekday factor per shift of day. No seasonality: the truth repeats weekly."""
    if stop <= start:
        raise ValueError(f"need stop > start, got [{start}, {stop})")
    if not scale > 0 or shrink < 0:
        raise ValueError("scale must be > 0 and shrink >= 0")
    per_day, n = panel.calendar.per_day, panel.n_cells
    rows = panel.slice(start, stop)
    shift, cell, count = rows["shift"].to_numpy(), rows["cell"].to_numpy(), rows["count"].to_numpy().astype(np.float64)
    if count.sum() <= 0:
        raise ValueError(f"no incidents in shifts [{start}, {stop}): cannot derive a truth")
    sod, dow = shift % per_day, weekday_of(shift, per_day)
    all_shifts = np.arange(start, stop)
    n_slot = np.bincount((all_shifts % per_day) * 7 + weekday_of(all_shifts, per_day), minlength=per_day * 7)
    n_slot = n_slot.reshape(per_day, 7).astype(np.float64)  # shifts of each (shift of day, weekday)
    per_cell_sod = np.bincount(cell * per_day + sod, weights=count, minlength=n * per_day).reshape(n, per_day)
    city_slot = np.bincount(sod * 7 + dow, weights=count, minlength=per_day * 7).reshape(per_day, 7)
    city_sod_share = city_slot.sum(1) / city_slot.sum()
    cell_total = per_cell_sod.sum(1, keepdims=True)
    denom = cell_total + shrink
    share = np.divide(per_cell_sod + shrink * city_sod_share, denom,  # (n, per_day), rows sum to 1
                      out=np.broadcast_to(city_sod_share, per_cell_sod.shape).copy(), where=denom > 0)
    rate_sod = cell_total * share / n_slot.sum(1)  # expected count per shift of that shift of day
    slot_rate = np.divide(city_slot, n_slot, out=np.zeros_like(city_slot), where=n_slot > 0)
    sod_rate = city_slot.sum(1) / n_slot.sum(1)
    weekday_factor = np.divide(slot_rate, sod_rate[:, None], out=np.ones_like(slot_rate), where=sod_rate[:, None] > 0)
    shifts = np.asarray(shifts, dtype=np.int64)
    s_sod, s_dow = shifts % per_day, weekday_of(shifts, per_day)
    return scale * rate_sod.T[s_sod] * weekday_factor[s_sod, s_dow][:, None]


def world_from_history(
    panel: CountPanel, start: int, stop: int, first_shift: int, n_shifts: int, *, scale: float = 1.0,
    shrink: float = 20.0, name: str = "history",
) -> World:
    """A world whose truth repeats the panel's [start, stop) pattern (see :func:`intensity_from_history`)."""
    shifts = np.arange(first_shift, first_shift + n_shifts, dtype=np.int64)
    expected = intensity_from_history(panel, start, stop, shifts, scale=scale, shrink=shrink)
    return World(panel.study_area, panel.calendar, first_shift, expected, name=name,
                 meta={"truth": "history", "history_shifts": [start, stop], "scale": scale, "shrink": shrink})


def world_from_synthetic(result, name: str = "synthetic") -> World:
    """The synthetic city: its exact conditional mean is the truth and its simulated events are the incidents."""
    panel = result.panel()
    realised = panel.dense(result.first_shift, result.end_shift, dtype=np.int32)
    return World(result.city.study_area, result.city.calendar, result.first_shift, result.true_expected,
                 realised=realised, name=name, meta={"truth": "synthetic", "branching_ratio": result.city.branching_ratio})


# --- recording ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recording:
    """Reporting and discovery probabilities (see the module docstring)."""

    report_prob: float = 0.4
    discover_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("report_prob", "discover_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass
class Incidents:
    """Common random numbers for every policy: (n_shifts, n_cells) counts."""

    true: np.ndarray
    reported: np.ndarray
    discoverable: np.ndarray  # unreported incidents that a patrol in the cell would discover


def draw_incidents(world: World, recording: Recording, seed: int) -> Incidents:
    rng = np.random.default_rng([seed, 0])
    true = world.realised if world.realised is not None else rng.poisson(world.expected)
    true = true.astype(np.int32)
    reported = rng.binomial(true, recording.report_prob).astype(np.int32)
    discoverable = rng.binomial(true - reported, recording.discover_prob).astype(np.int32)
    return Incidents(true, reported, discoverable)


# --- policies -------------------------------------------------------------------------------------
Training = Literal["recorded", "reported", "ensign"]
Exploration = Literal["risk", "uniform"]


@dataclass
class Policy:
    """A forecaster, the stream it learns from, and how patrols follow its forecast.

    ``training``: the department's record ("recorded"), reported incidents only ("reported"), or reported plus
    discovered incidents thinned by the inverse patrol probability ("ensign", needs uniform exploration so every
    cell has a known probability > 0). ``explore_share`` of the patrols go to cells drawn at random among those
    outside the forecast's top: in proportion to forecast risk ("risk") or uniformly ("uniform")."""

    name: str
    make_forecaster: Callable[[], Forecaster]
    training: Training = "recorded"
    explore_share: float = 0.0
    exploration: Exploration = "risk"

    def __post_init__(self) -> None:
        if self.training not in ("recorded", "reported", "ensign"):
            raise ValueError(f"training must be recorded, reported or ensign, got {self.training!r}")
        if self.exploration not in ("risk", "uniform"):
            raise ValueError(f"exploration must be risk or uniform, got {self.exploration!r}")
        if not 0 <= self.explore_share < 1:
            raise ValueError(f"explore_share must be in [0, 1), got {self.explore_share}")
        if self.training == "ensign" and (self.explore_share <= 0 or self.exploration != "uniform"):
            raise ValueError("the Ensign correction needs a known patrol probability > 0 in every cell: "
                             "give it explore_share > 0 with exploration='uniform'")

    def split(self, patrols: int) -> tuple[int, int]:
        """(patrols to the top cells, exploring patrols); at least one explores when the share is > 0."""
        explore = int(round(self.explore_share * patrols))
        explore = max(explore, 1) if self.explore_share > 0 else 0
        if explore >= patrols:
            raise ValueError(f"explore_share {self.explore_share} leaves no patrol for the top cells of {patrols}")
        return patrols - explore, explore


@dataclass
class TrueIntensityForecaster(Forecaster):
    """Reference policy: forecasts the world's true expected count (patrols go to the true top-k)."""

    world: World | None = None
    name: str = field(default="oracle", init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        pass

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        return self.world.expected[origins - self.world.first_shift]


@dataclass
class Uniform(Forecaster):
    """Reference policy: the same forecast everywhere, so the seeded tie rule sends patrols at random."""

    name: str = field(default="random", init=False, repr=False)

    def _fit(self, panel: CountPanel, until: int) -> None:
        pass

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        return np.ones((origins.size, panel.n_cells))


# short windows so a simulated year at resolution 9 runs in minutes; history beyond 28 days enters only
# through the long-run rate
LIGHT_FEATURES = FeatureConfig(
    window_days=(1, 7, 28), same_shift_days=(28,), same_weekday_weeks=4, spatial_window_days=(7, 28),
    decay_days=(1.0, 7.0), category_window_days=28,
)


def light_lightgbm(num_threads: int = 1, seed: int = 0) -> LightGBMForecaster:
    """The project's LightGBM forecaster, configured for the simulator: 8 weeks of training rows, 2 of them
    for early stopping, at most 100 trees of 15 leaves, short feature windows, every zero row kept at 5% (the
    zero sampling the committed simulations were run with)."""
    return LightGBMForecaster(
        train_days=56, valid_days=14, n_estimators=100, learning_rate=0.1, num_leaves=15, min_child_samples=50,
        early_stopping_rounds=10, chunk_shifts=84, seed=seed, num_threads=num_threads, features=LIGHT_FEATURES,
        zero_sampling="uniform", zero_rate=0.05,
    )


def default_policies(num_threads: int = 1, seed: int = 0, explore_share: float = 0.1) -> list[Policy]:
    lgbm = lambda: light_lightgbm(num_threads, seed)  # noqa: E731
    return [
        Policy("naive", lambda: Naive(window_days=28)),
        Policy("lightgbm", lgbm),
        Policy("lightgbm_reported", lgbm, training="reported"),
        Policy("lightgbm_ensign", lgbm, training="ensign", explore_share=explore_share, exploration="uniform"),
        Policy("lightgbm_explore", lgbm, explore_share=explore_share, exploration="risk"),
    ]


def reference_policies(world: World) -> list[Policy]:
    """What the measures look like when patrols follow the truth (oracle) or ignore the data (random)."""
    return [Policy("oracle", lambda: TrueIntensityForecaster(world=world)), Policy("random", Uniform)]


# --- the loop -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimulationConfig:
    patrols: int = 60
    recording: Recording = Recording()
    warmup_shifts: int = 273  # 91 days at 3 shifts a day: enough for LightGBM's 8 weeks of rows
    window_shifts: int = 84  # trailing window of the cumulative measures (28 days)
    refit: Literal["monthly"] | int = "monthly"  # calendar months, or every N shifts
    seed: int = 0

    def validate(self, world: World) -> None:
        if not 0 < self.patrols < world.n_cells:
            raise ValueError(f"patrols must be in [1, {world.n_cells - 1}] for {world.n_cells} cells, got {self.patrols}")
        if not 0 < self.warmup_shifts < world.n_shifts:
            raise ValueError(f"warmup_shifts must be in [1, {world.n_shifts - 1}], got {self.warmup_shifts}")
        if self.window_shifts < 1:
            raise ValueError(f"window_shifts must be >= 1, got {self.window_shifts}")
        if self.refit != "monthly" and not (isinstance(self.refit, int) and self.refit > 0):
            raise ValueError(f"refit must be 'monthly' or a positive number of shifts, got {self.refit!r}")


def refit_shifts(calendar: ShiftCalendar, start: int, stop: int, refit: Literal["monthly"] | int) -> np.ndarray:
    """Shifts in [start, stop) at which the forecaster is refitted: the first, then each local month's first
    shift (or every ``refit`` shifts)."""
    if refit != "monthly":
        return np.arange(start, stop, int(refit), dtype=np.int64)
    per_day = calendar.per_day
    first_day, last_day = EPOCH + timedelta(days=start // per_day), EPOCH + timedelta(days=(stop - 1) // per_day)
    months, d = [], date(first_day.year, first_day.month, 1)
    while d <= last_day:
        d = date(d.year + (d.month == 12), d.month % 12 + 1, 1)
        months.append(calendar.local_day(d) * per_day)
    cuts = [start] + [m for m in months if start < m < stop]
    return np.asarray(cuts, dtype=np.int64)


class _Stream:
    """A policy's training stream as a growing :class:`CountPanel` (one category, append-only).

    Snapshots share one lineage: the recorded past never changes, so a forecaster's cached feature chunks of
    earlier shifts stay valid across refits (LightGBMForecaster keys its cache on the lineage)."""

    def __init__(self, world: World, category: str = "incident", capacity: int = 1 << 16):
        self.world, self.category = world, category
        self.lineage = f"feedback-{uuid.uuid4().hex}"
        self.shift = np.empty(capacity, np.int64)
        self.cell = np.empty(capacity, np.int32)
        self.count = np.empty(capacity, np.int32)
        self.size = 0
        self.end = world.first_shift

    def append(self, first: int, counts: np.ndarray) -> None:
        """Add the counts of shifts [first, first + len(counts)) (the next ones: the record is causal)."""
        if first != self.end:
            raise ValueError(f"stream ends at shift {self.end}, cannot append shift {first}")
        rows, cells = np.nonzero(np.atleast_2d(counts))  # row-major: sorted by shift, then cell
        m = rows.size
        while self.size + m > self.shift.size:
            for name in ("shift", "cell", "count"):
                old = getattr(self, name)
                setattr(self, name, np.concatenate([old, np.empty_like(old)]))
        self.shift[self.size : self.size + m] = first + rows
        self.cell[self.size : self.size + m] = cells
        self.count[self.size : self.size + m] = np.atleast_2d(counts)[rows, cells]
        self.size += m
        self.end = first + np.atleast_2d(counts).shape[0]

    def panel(self) -> CountPanel:
        """Everything recorded so far: shifts [world.first_shift, end)."""
        k = self.size
        frame = pl.DataFrame(
            {"shift": self.shift[:k], "cell": self.cell[:k], "category": np.zeros(k, np.int16), "count": self.count[:k]},
            schema=COUNTS_SCHEMA,
        )
        w = self.world
        return CountPanel(w.study_area, w.calendar, (self.category,), w.first_shift, self.end, frame,
                          {"stream": "feedback-simulator"}, lineage=self.lineage)


@dataclass
class PolicyRun:
    """One policy's simulated history over the world's shifts (warm-up included)."""

    policy: str
    patrolled: np.ndarray  # (n_shifts, n_cells) bool
    recorded: np.ndarray  # (n_shifts, n_cells) department's record: reported + discovered
    training: np.ndarray  # (n_shifts, n_cells) the stream the forecaster learns from
    refits: np.ndarray
    seconds: dict[str, float]


def _record(training: Training, reported: np.ndarray, discovered: np.ndarray, inclusion: np.ndarray | None,
            floor: float, rng: np.random.Generator) -> np.ndarray:
    """The policy's training counts for shifts with these reported/discovered counts."""
    if training == "recorded":
        return reported + discovered
    if training == "reported":
        return reported.copy()
    keep = np.divide(floor, inclusion, out=np.zeros_like(inclusion), where=inclusion > 0)
    return reported + rng.binomial(discovered, np.minimum(keep, 1.0)).astype(reported.dtype)


def run_policy(
    world: World, incidents: Incidents, policy: Policy, config: SimulationConfig,
    progress: Callable[[str], None] | None = None,
) -> PolicyRun:
    config.validate(world)
    T, n, k, W = world.n_shifts, world.n_cells, config.patrols, config.warmup_shifts
    k_top, k_explore = policy.split(k)
    explore_pi = k_explore / (n - k_top) if k_explore else 0.0
    floor = min(k / n, explore_pi) if policy.training == "ensign" else 0.0
    rng = np.random.default_rng([config.seed, 2, zlib.crc32(policy.name.encode())])
    patrolled = np.zeros((T, n), dtype=bool)
    recorded = np.zeros((T, n), dtype=np.int32)
    training = np.zeros((T, n), dtype=np.int32)
    stream = _Stream(world)
    seconds = {"fit": 0.0, "predict": 0.0, "total": 0.0}
    started = time.perf_counter()

    # warm-up: uniformly random patrols, the same for every policy (its own stream, common random numbers)
    warm = np.argpartition(np.random.default_rng([config.seed, 1]).random((W, n)), k - 1, axis=1)[:, :k]
    patrolled[np.arange(W)[:, None], warm] = True
    discovered = incidents.discoverable[:W] * patrolled[:W]
    recorded[:W] = incidents.reported[:W] + discovered
    training[:W] = _record(policy.training, incidents.reported[:W], discovered, np.full((W, n), k / n), floor, rng)
    stream.append(world.first_shift, training[:W])

    forecaster = policy.make_forecaster()
    refits = refit_shifts(world.calendar, world.first_shift + W, world.first_shift + T, config.refit)
    refit_set = set(refits.tolist())
    for t in range(W, T):
        shift = world.first_shift + t
        panel = stream.panel()  # shifts before this one only
        if shift in refit_set:
            t0 = time.perf_counter()
            forecaster.fit(panel, shift)
            seconds["fit"] += time.perf_counter() - t0
            if progress:
                progress(f"{policy.name}: refit at shift {shift} ({t - W}/{T - W} rounds, "
                         f"{time.perf_counter() - started:.0f} s)")
        t0 = time.perf_counter()
        forecast = forecaster.predict(panel, shift)[0]
        seconds["predict"] += time.perf_counter() - t0
        order = rank_cells(forecast, shift)[0]
        top = np.zeros(n, dtype=bool)
        top[order[:k_top]] = True
        mask = top.copy()
        if k_explore:
            rest = order[k_top:]
            if policy.exploration == "uniform":
                pick = rng.choice(rest, size=k_explore, replace=False)
            else:
                risk = np.clip(forecast[rest], 0, None)
                if np.count_nonzero(risk) < k_explore:  # too few cells with risk: fill in uniformly
                    risk = risk + max(risk.max(initial=0.0), 1.0) * 1e-9
                pick = rng.choice(rest, size=k_explore, replace=False, p=risk / risk.sum())
            mask[pick] = True
        patrolled[t] = mask
        discovered = incidents.discoverable[t] * mask
        recorded[t] = incidents.reported[t] + discovered
        inclusion = np.where(top, 1.0, explore_pi)[None]  # known patrol probability of every cell
        training[t] = _record(policy.training, incidents.reported[t][None], discovered[None], inclusion, floor, rng)[0]
        stream.append(shift, training[t][None])
    seconds["total"] = time.perf_counter() - started
    return PolicyRun(policy.name, patrolled, recorded, training, refits, seconds)


# --- measures -------------------------------------------------------------------------------------
def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance between the distributions of each row of two count arrays (nan if one is empty)."""
    p, q = np.atleast_2d(np.asarray(p, np.float64)), np.atleast_2d(np.asarray(q, np.float64))
    ps, qs = p.sum(axis=1, keepdims=True), q.sum(axis=1, keepdims=True)
    out = 0.5 * np.abs(p / np.where(ps > 0, ps, 1) - q / np.where(qs > 0, qs, 1)).sum(axis=1)
    return np.where((ps[:, 0] > 0) & (qs[:, 0] > 0), out, np.nan)


def trailing_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Sum over rows [t - window + 1, t] for every row t (fewer rows at the start)."""
    return window_sums(cumulative(x, np.int64), np.arange(1, x.shape[0] + 1), window)


def top_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each row's k largest entries."""
    idx = np.argpartition(-values, k - 1, axis=1)[:, :k]
    mask = np.zeros(values.shape, dtype=bool)
    mask[np.arange(values.shape[0])[:, None], idx] = True
    return mask


def compute_measures(run: PolicyRun, world: World, incidents: Incidents, config: SimulationConfig) -> pl.DataFrame:
    """One row per simulated round (the shifts after the warm-up), every measure vectorised over rounds."""
    W, k, win = config.warmup_shifts, config.patrols, config.window_shifts
    loop = slice(W, None)
    patrols_w = trailing_sum(run.patrolled, win)[loop]
    patrols_all = np.cumsum(run.patrolled, axis=0, dtype=np.int32)[loop]
    true_w = trailing_sum(incidents.true, win)[loop]
    recorded_w = trailing_sum(run.recorded, win)[loop]
    training_w = trailing_sum(run.training, win)[loop]
    patrolled = run.patrolled[loop]
    true = incidents.true[loop].astype(np.float64)
    expected = world.expected[loop]
    true_top = top_mask(expected, k)
    true_total = true.sum(axis=1)
    return pl.DataFrame({
        "policy": [run.policy] * patrolled.shape[0],
        "round": np.arange(patrolled.shape[0]),
        "shift": world.shifts[loop],
        "patrol_gini": gini(patrols_w),
        "patrol_gini_cumulative": gini(patrols_all),
        "recorded_topk_share": top_share(recorded_w, k=k),
        "tvd_recorded": total_variation(recorded_w, true_w),
        "tvd_training": total_variation(training_w, true_w),
        "outside_true_topk": (patrolled & ~true_top).sum(axis=1) / patrolled.sum(axis=1),
        "churn": 1 - jaccard(patrolled, run.patrolled[W - 1 : -1]),
        "captured": np.divide((true * patrolled).sum(axis=1), true_total, out=np.full(true_total.shape, np.nan),
                              where=true_total > 0),
        "captured_expected": (expected * patrolled).sum(axis=1) / expected.sum(axis=1),
    })


# --- a whole experiment ---------------------------------------------------------------------------
@dataclass
class SimulationResult:
    measures: pl.DataFrame  # policy, round, shift, one column per measure
    seconds: dict[str, dict[str, float]]
    refits: dict[str, list[int]]
    totals: dict[str, dict[str, int]]  # per policy: true, reported, recorded, training incidents over the loop
    config: SimulationConfig
    world: World


def simulate(
    world: World, policies: list[Policy], config: SimulationConfig = SimulationConfig(),
    progress: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Every policy against the same world and the same incidents (common random numbers)."""
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise ValueError(f"policy names must be unique, got {names}")
    config.validate(world)
    incidents = draw_incidents(world, config.recording, config.seed)
    frames, seconds, refits, totals = [], {}, {}, {}
    loop = slice(config.warmup_shifts, None)
    for policy in policies:
        run = run_policy(world, incidents, policy, config, progress)
        frames.append(compute_measures(run, world, incidents, config))
        seconds[policy.name] = run.seconds
        refits[policy.name] = run.refits.tolist()
        totals[policy.name] = {
            "true": int(incidents.true[loop].sum()), "reported": int(incidents.reported[loop].sum()),
            "recorded": int(run.recorded[loop].sum()), "training": int(run.training[loop].sum()),
        }
        if progress:
            progress(f"{policy.name}: done in {run.seconds['total']:.0f} s")
    return SimulationResult(pl.concat(frames), seconds, refits, totals, config, world)


def smoothed(measures: pl.DataFrame, window: int) -> pl.DataFrame:
    """Per-shift measures as a trailing rolling mean over ``window`` rounds (per policy)."""
    return measures.sort("policy", "round").with_columns(
        pl.col(m).rolling_mean(window, min_samples=1).over("policy") for m in PER_SHIFT
    )


def summarise(measures: pl.DataFrame, per_day: int, edge_days: int = 7) -> dict[str, dict[str, dict[str, float]]]:
    """Per policy and measure: mean over the first and the last ``edge_days`` of rounds, and the least-squares
    trend over all rounds (change per 30 days)."""
    edge = edge_days * per_day
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name,), frame in measures.sort("policy", "round").group_by("policy", maintain_order=True):
        rounds = frame["round"].to_numpy().astype(np.float64)
        out[name] = {}
        for m in MEASURES:
            y = frame[m].to_numpy()
            ok = np.isfinite(y)
            slope = np.polyfit(rounds[ok], y[ok], 1)[0] if ok.sum() > 1 else np.nan
            start, end = np.nanmean(y[:edge]), np.nanmean(y[-edge:])
            out[name][m] = {"start": float(start), "end": float(end), "change": float(end - start),
                            "trend_per_30_days": float(slope * 30 * per_day)}
    return out


LABELS = {
    "patrol_gini": "Gini of patrol counts (trailing window)",
    "patrol_gini_cumulative": "Gini of patrol counts (since start)",
    "recorded_topk_share": "top-k share of recorded incidents",
    "tvd_recorded": "TVD record vs truth",
    "tvd_training": "TVD training data vs truth",
    "outside_true_topk": "patrols outside the true top-k",
    "churn": "churn (1 - Jaccard, consecutive shifts)",
    "captured": "true incidents in patrolled cells",
    "captured_expected": "true expected count in patrolled cells",
}


REFERENCE_STYLE = {"oracle": {"color": "black", "linestyle": "--"}, "random": {"color": "0.5", "linestyle": ":"}}


def plot_measures(measures: pl.DataFrame, path: str | Path, per_day: int, title: str = "", smooth_days: int = 7) -> Path:
    """One png: each measure over simulated days, one line per policy (per-shift measures smoothed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = smoothed(measures, smooth_days * per_day)
    names = frame["policy"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(3, 3, figsize=(16, 12), sharex=True)
    colours = plt.get_cmap("tab10")
    for ax, m in zip(axes.ravel(), MEASURES):
        for i, name in enumerate(names):
            part = frame.filter(pl.col("policy") == name)
            style = REFERENCE_STYLE.get(name, {"color": colours(i)})
            ax.plot(part["round"].to_numpy() / per_day, part[m].to_numpy(), label=name, linewidth=1.2, **style)
        suffix = f" ({smooth_days}-day mean)" if m in PER_SHIFT else ""
        ax.set_title(LABELS[m] + suffix, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("simulated day")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
