"""LightGBM hotspot forecaster: Poisson regression of the next shift's count on the feature matrices.

Training rows are (origin, cell) pairs over ``train_days`` before the cutoff; the last ``valid_days`` of them
are held out for early stopping, so model selection never touches the period being forecast. Most cell-shifts
are zero: all non-zero rows are kept and zeros are sampled, each with weight 1/p for its keep probability p, which
keeps the Poisson likelihood unbiased while the training set fits in memory. By default (``zero_sampling=
"by_rate"``) p is proportional to the cell's count before the rows' chunk, mean ``zero_rate`` (2%), clipped to
[0.5%, 30%]: a zero row's Poisson gradient is the predicted rate, so the zeros of busy cells, where the top of the
map is decided, are kept more often and those of quiet cells less (importance sampling). ``zero_sampling=
"uniform"`` keeps every zero at ``zero_rate`` (5% before 2026-11-30). On the validation window (Toronto, fit at
2020-09-01, every shift of Sep-Dec 2020 scored, seeds 0-4, each fit in its own process) by_rate at 2% kept 316 k
rows instead of 683 k, and a fit took a median 10.4 CPU-s instead of 18.9 (7.2 s instead of 12.5 s wall), with
mean hit rates 0.1550 at 1% of the area (uniform 5%: 0.1551) and 0.3835 at 5% (0.3828), and Poisson deviance
0.03864 (0.03872; lower at every seed). A floor of 1% gave 0.1552, 0.3836 and 0.03864 for 12.1 CPU-s
(``python -m experiments.bench_lgbm_speed``, ``experiments/results/bench_lgbm_speed_zero_sampling.json``).

Options: ``objective="lambdarank"`` or ``"rank_xendcg"`` learns to order the cells of one
origin shift (one query per origin, integer relevance = the count, capped). Zero sampling and ranking interact:
a ranker's loss is over pairs within a query and takes no row weights, so a ranker always samples its zeros
uniformly at ``zero_rate``: sampled zeros then thin every query alike (the pairwise loss stays unbiased up to
scale), which sampling by past count would not; queries without any incident carry no pair and
are dropped. A ranker's score is a log-scale relevance, served as ``exp(score)``: the order is what it learned, not
a count. ``train_days=None`` trains on the whole history, and ``recency_half_life_days`` weights each origin's rows
by 0.5 ** (age / half-life) so older years count less instead of not at all.

Speed (issue 15): the training rows are chosen first (every positive cell-shift and the zeros sampled with the
chunk's own seed) and features are built for those rows only (``build_features(rows=)``, the same values as the
full matrix's rows), so feature building no longer grows with the ~95-98% of cell-shifts that are dropped zeros. What
is left of a fit is mostly boosting: rows x rounds x features. ``learning_rate`` 0.1 with
``early_stopping_rounds`` 30 (now 20, below) needs fewer rounds than 0.05 with 50, ``max_bin`` 63 cuts histogram work, and
LightGBM's OpenMP threads sleep rather than spin while they wait (see below), which matters whenever the two
cores are shared. Building LightGBM's binned Dataset is about 1.6 CPU-s (the validation set reuses the
training set's bins), so it is rebuilt per fit: reusing one refit's bins in the next would chain the refits.
Tried on the validation window (Sep-Dec 2020) and not taken, each losing hit rate or deviance for little time:
a uniform zero rate of 0.02 (sampling by past count at a mean of 0.02, above, did not lose), learning rate 0.15,
``max_bin`` 31, ``num_leaves`` 15, ``feature_fraction`` 0.5,
``bagging_fraction`` 0.5, GOSS (``experiments/bench_lgbm_speed.py`` prints the figures).

Second round (the figures are means over seeds 0-4, because one seed's hit rate at 1% moves by about 0.001):
``early_stopping_rounds`` 20 instead of 30 keeps the same best iteration, hence the same model, at six cutoffs
from 2019-09 to 2020-12, and runs 10 fewer rounds per fit. A patience of 15, 10 or 5 would stop earlier at three
of those six cutoffs. ``quiet_zero_rate`` is importance sampling of the zeros: in cells with no incident before
the chunk's first origin (``quiet_days=None``) or in the ``quiet_days`` before it, zeros are kept at their own
rate with weight 1/rate. At 0.01 it drops 19% of the rows and about a fifth of a fit's CPU. Its validation figures
(1% 0.1549, 5% 0.3834, deviance 0.03873) are within seed noise of the then default's (uniform 5%: 0.1551, 0.3828, 0.03872), but
its 1% figure is not higher, so it stays an option. Zeros quiet for 365 days kept at 0.005 (-29% rows) lost 0.0007
at 1% over three seeds. Leaving out the eight features with the least gain (the five category counts, shift hours,
weekend, month) lost 0.0014 at 1% over three seeds. Building the row chunks on two threads took more CPU and
more wall time, with the second core shared.

Third round (2026-11-30, seeds 0-2, cutoff 2020-09-01, scored to 2021-01-01): LightGBM's Poisson hessian is
exp(score + ``poisson_max_delta_step``), 0.7 by default, so a smaller value takes larger steps. At 0.35 the fits
stopped after 73 instead of 107 rounds on average (18.4 instead of 22.2 CPU-s, under load), with a mean hit rate of
0.1545 instead of 0.1554 at 1% of the area, 0.3825 instead of 0.3816 at 5%, and deviance 0.03870 against 0.03868.
At 0.1: 66 rounds and 15.7 CPU-s, but 0.1532 at 1%. At 1.5 the seed-0 fit took twice the rounds (233). This acts
like a larger learning rate, and it loses at 1% as 0.15 did, so the default stays. Quantized gradients
(``use_quantized_grad``, 4 or 16 bins, leaves renewed with the true gradients), the lever LightGBM 4 offers for
histogram work, stop the seed-0 fit with ``Check failed: (best_split_info.left_count) > (0)`` (LightGBM issue
#5994), row-wise or column-wise; without stochastic rounding the fit runs 386 rounds (27 CPU-s instead of 18) to
0.1502 at 1% and 0.3704 at 5% (2026-11-30, LightGBM 4.7.0). Not taken.

After the by-count sampling (2026-11-30, cutoff 2020-09-01): a quiet fit at the 2021 cutoff is rows 1.7 s
(single-threaded numpy), Dataset 0.55 s and boosting 4.8 s (163 rounds of 315 k rows x 33 features). Over seeds
0-4, a mean ``zero_rate`` of 1% (floor 0.25%, 190 k rows) took a median 7.6 instead of 10.9 CPU-s but lost 0.0008
at 1% of the area (0.1543 against 0.1550); no bagging (``bagging_fraction`` 1.0) took no less time (11.4 CPU-s,
0.1546; ``experiments/results/bench_lgbm_speed_round4.json``). Over seeds
0-2, a learning rate of 0.2 for the first 20 or 40 rounds, then 0.1 (``lgb.reset_parameter``), ran 10-30% fewer
rounds but lost 0.0010-0.0020 at 1% at every seed. Not taken.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

# LightGBM's OpenMP threads spin while they wait for each other at every barrier (GNU libgomp's default). With
# both cores shared (another fit, a second backtest process, the service), a spinning thread holds a core the
# other needs: a fit at load 4.5 on 2 cores took 145 s (81 CPU-s) spinning and 32 s (18.5 CPU-s) sleeping, and
# one thread is no faster than two that sleep. libgomp reads the policy once, when LightGBM loads it; a value
# set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightgbm as lgb  # noqa: E402  (after the wait policy is set)
import numpy as np
import pandas as pd

from features.matrix import FeatureConfig, build_features, build_targets
from features.origin_features import features_at
from features.panel import CountPanel
from forecasting.base import Explanation, Forecaster, NotFittedError

RANKING_OBJECTIVES = ("lambdarank", "rank_xendcg")
MAX_RELEVANCE = 30  # LightGBM's default label_gain covers relevance 0..30

# A LightGBM prediction re-initialises state of its booster (iteration count, tree depths for pred_contrib), so
# calls on one booster must not overlap. Explanations run on a copy of the booster with a lock of its own, made once
# per fitted booster: explaining a long list of cells never waits for, or holds up, a forecast on the same model.
_explainers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_explainers_guard = threading.Lock()


def _explainer(booster: lgb.Booster, iteration: int | None) -> tuple[lgb.Booster, threading.Lock]:
    with _explainers_guard:
        found = _explainers.get(booster)
        if found is None:
            found = (lgb.Booster(model_str=booster.model_to_string(num_iteration=iteration)), threading.Lock())
            _explainers[booster] = found
        return found


class BoosterAsText:
    """Pickling of a forecaster holding a LightGBM ``booster_``: the booster travels as LightGBM's own text model
    (portable across versions, inspectable); the rest as the Forecaster contract pickles it (no training caches)."""

    booster_: lgb.Booster | None

    def __getstate__(self) -> dict:
        state: dict = super().__getstate__()  # type: ignore[assignment]  # the Forecaster's, next in the MRO
        if self.booster_ is not None:
            state["booster_"] = self.booster_.model_to_string()
        return state

    def __setstate__(self, state: dict) -> None:
        booster = state.get("booster_")
        if isinstance(booster, str):
            state = {**state, "booster_": lgb.Booster(model_str=booster)}
        super().__setstate__(state)  # type: ignore[misc]


@dataclass
class LightGBMForecaster(BoosterAsText, Forecaster):
    objective: str = "poisson"  # or "tweedie", or a ranking objective (RANKING_OBJECTIVES)
    train_days: int | None = 730  # None: the whole history
    valid_days: int = 56
    zero_rate: float = 0.02  # the mean keep probability of a zero row (module docstring)
    zero_sampling: str = "by_rate"  # or "uniform": every zero row kept at zero_rate
    zero_rate_floor: float = 0.005  # by_rate: the keep probability of the quietest cells' zeros (weight 1/floor)
    zero_rate_ceiling: float = 0.3  # by_rate: of the busiest cells' zeros
    quiet_zero_rate: float | None = None  # zeros of quiet cells (below) kept at this rate instead; None: as above
    quiet_days: int | None = None  # quiet: no incident in the N days before the chunk's first origin (None: ever)
    n_estimators: int = 2000
    learning_rate: float = 0.1
    max_bin: int = 63
    num_leaves: int = 31
    min_child_samples: int = 100
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    early_stopping_rounds: int = 20
    chunk_shifts: int = 360
    seed: int = 0
    num_threads: int = 2
    recency_half_life_days: float | None = None  # rows weighted 0.5 ** (age / half-life); None: equal weights
    features: FeatureConfig = field(default_factory=FeatureConfig)
    name: str = field(default="lightgbm", init=False, repr=False)
    booster_: lgb.Booster | None = field(default=None, init=False, repr=False)
    columns_: list[str] = field(default_factory=list, init=False, repr=False)
    best_iteration_: int = field(default=0, init=False, repr=False)
    train_rows_: int = field(default=0, init=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    learned: ClassVar[bool] = True
    transient: ClassVar[tuple[str, ...]] = ("_cache",)

    def _chunk(self, panel: CountPanel, lo: int, hi: int, sample: bool):
        """Rows for origins [lo, hi). Chunks only depend on data before ``hi``, so they are cached per panel
        lineage (a panel and its ``until`` views) and reused by the next monthly refit, under the parameters the
        rows depend on: after ``set_params`` they are built again."""
        key = (panel.lineage, lo, hi, sample, self._rows_depend_on())
        if key in self._cache:
            return self._cache[key]
        origins = np.arange(lo, hi)
        y = build_targets(panel, origins, self.category)
        if sample:  # the rows kept are chosen first, and only their features are built
            rng = np.random.default_rng([self.seed, lo, hi])
            rate = np.tile(self._zero_rates(panel, lo), hi - lo)  # per row (origin-major), known before lo
            keep = np.flatnonzero((y > 0) | (rng.random(y.size) < rate))
            matrix = build_features(panel, origins, self.features, rows=keep)
            rows = (matrix.X, y[keep], np.where(y[keep] > 0, 1.0, 1.0 / rate[keep]), matrix.origin)
        else:
            matrix = build_features(panel, origins, self.features)
            rows = (matrix.X, y, np.ones(y.size), matrix.origin)
        self.columns_ = matrix.columns
        self._cache[key] = rows
        return rows

    def _rows_depend_on(self) -> str:
        """The parameters that decide a chunk's rows and weights, as one hashable value."""
        return repr((self.features, self.category, self.seed, self.ranking, self.zero_sampling, self.zero_rate,
                     self.zero_rate_floor, self.zero_rate_ceiling, self.quiet_zero_rate, self.quiet_days))

    def _zero_rates(self, panel: CountPanel, lo: int) -> np.ndarray:
        """Each cell's keep probability for a zero row of origins from ``lo`` on (module docstring), and
        ``quiet_zero_rate`` in cells without an incident in the ``quiet_days`` before ``lo``. Only shifts before
        every origin of the chunk count, so the choice leaks nothing and the 1/p weights keep the likelihood
        unbiased."""
        if not 0 < self.zero_rate_floor <= self.zero_rate_ceiling <= 1 or not 0 < self.zero_rate <= 1:
            raise ValueError(f"zero rates must satisfy 0 < zero_rate <= 1 and 0 < zero_rate_floor <= zero_rate_ceiling "
                             f"<= 1, not {self.zero_rate}, {self.zero_rate_floor}, {self.zero_rate_ceiling}")
        if self.zero_sampling not in ("by_rate", "uniform"):
            raise ValueError(f"zero_sampling must be 'by_rate' or 'uniform', not {self.zero_sampling!r}")
        if self.zero_sampling == "by_rate" and not self.ranking:  # a ranker takes no weights (module docstring)
            rates = self._rates_by_history(panel, lo)
        else:
            rates = np.full(panel.n_cells, self.zero_rate)
        if self.quiet_zero_rate is not None:
            days = self.quiet_days
            start = panel.first_shift if days is None else max(panel.first_shift, lo - days * panel.calendar.per_day)
            rates[panel.cell_totals(start, lo, self.category) == 0] = self.quiet_zero_rate
        return rates

    def _rates_by_history(self, panel: CountPanel, lo: int) -> np.ndarray:
        """Keep probabilities proportional to each cell's mean count per shift before ``lo`` (cells without any
        incident count as the quietest one with), scaled to mean ``zero_rate`` before clipping to
        [``zero_rate_floor``, ``zero_rate_ceiling``]: a zero row's Poisson gradient is the predicted rate, so the
        zeros of busy cells carry the information and those of quiet cells little (importance sampling)."""
        past = panel.cell_totals(panel.first_shift, lo, self.category)
        if not (past > 0).any():
            return np.full(panel.n_cells, self.zero_rate)
        past = np.maximum(past, past[past > 0].min())
        return np.clip(past / past.mean() * self.zero_rate, self.zero_rate_floor, self.zero_rate_ceiling)

    def _rows(self, panel: CountPanel, start: int, stop: int, sample: bool):
        """Features and targets for origins [start, stop), from chunks on a fixed grid of ``chunk_shifts``."""
        current = (panel.lineage, self._rows_depend_on())
        self._cache = {k: v for k, v in self._cache.items() if (k[0], k[4]) == current and k[2] > start - self.chunk_shifts}
        edges = sorted({start, stop, *range((start // self.chunk_shifts + 1) * self.chunk_shifts, stop, self.chunk_shifts)})
        parts = [self._chunk(panel, lo, hi, sample) for lo, hi in zip(edges[:-1], edges[1:])]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))

    @property
    def ranking(self) -> bool:
        return self.objective in RANKING_OBJECTIVES

    def lgb_params(self) -> dict:
        extra = {"metric": "ndcg", "eval_at": [50]} if self.ranking else {}
        return extra | {
            "objective": self.objective,
            "learning_rate": self.learning_rate,
            "max_bin": self.max_bin,
            "num_leaves": self.num_leaves,
            "min_child_samples": self.min_child_samples,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }

    def _fit(self, panel: CountPanel, until: int) -> None:
        per_day = panel.calendar.per_day
        valid_start = until - self.valid_days * per_day
        days = self.train_days
        train_start = panel.first_shift + 1 if days is None else max(panel.first_shift + 1, until - days * per_day)
        if valid_start - train_start < per_day:
            raise ValueError(
                f"not enough history before shift {until}: need more than valid_days={self.valid_days} days"
            )
        X, y, w, o = self._rows(panel, train_start, valid_start, sample=True)
        Xv, yv, wv, ov = self._rows(panel, valid_start, until, sample=True)
        recency = np.ones(o.size) if self.recency_half_life_days is None else \
            0.5 ** ((until - o) / (self.recency_half_life_days * per_day))
        if self.ranking:
            train, valid = self._ranking_sets(X, y, recency, o, Xv, yv, ov)
        else:
            train = lgb.Dataset(X, y, weight=w * recency, feature_name=self.columns_, free_raw_data=True)
            valid = lgb.Dataset(Xv, yv, weight=wv, reference=train)
        self.booster_ = lgb.train(
            self.lgb_params(),
            train,
            num_boost_round=self.n_estimators,
            valid_sets=[valid],
            callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
        )
        self.best_iteration_ = self.booster_.best_iteration or self.n_estimators
        self.train_rows_ = int(y.size)

    def _ranking_sets(self, X, y, recency, o, Xv, yv, ov) -> tuple[lgb.Dataset, lgb.Dataset]:
        """One query per origin (rows are origin-major), relevance = the capped count; queries without an
        incident are dropped (no pair to learn from). Recency is constant within a query: a query weight."""
        def queries(y, o):
            origins, sizes = np.unique(o, return_counts=True)  # o is sorted: origin-major rows
            positive = np.bincount(np.repeat(np.arange(origins.size), sizes), weights=y, minlength=origins.size) > 0
            return np.repeat(positive, sizes), sizes[positive]

        keep, groups = queries(y, o)
        keep_v, groups_v = queries(yv, ov)
        label = np.minimum(y[keep], MAX_RELEVANCE).astype(np.int32)
        label_v = np.minimum(yv[keep_v], MAX_RELEVANCE).astype(np.int32)
        train = lgb.Dataset(X[keep], label, weight=recency[keep], group=groups, feature_name=self.columns_,
                            free_raw_data=True)
        valid = lgb.Dataset(Xv[keep_v], label_v, group=groups_v, reference=train)
        return train, valid

    def _output(self, raw: np.ndarray) -> np.ndarray:
        """Forecast from the booster's output: a ranker's log-scale score becomes a positive relevance."""
        return np.exp(raw) if self.ranking else raw

    def _fitted_booster(self) -> lgb.Booster:
        if self.booster_ is None:
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        return self.booster_

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        matrix = build_features(panel, origins, self.features)
        return self._output(np.asarray(self._fitted_booster().predict(matrix.X, num_iteration=self.best_iteration_)))

    def predict_explained(self, panel: CountPanel, origin: int) -> tuple[np.ndarray, Explanation]:
        """The forecast and its ``pred_contrib`` explanation from one feature matrix: the booster predicts every
        cell now, the contributions run later on the cells a response shows."""
        if self.booster_ is None:
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        X = features_at(panel, origin, self.features).X  # shared by model versions (read-only)
        booster, iteration = self.booster_, self.best_iteration_
        expected = self._output(np.asarray(booster.predict(X, num_iteration=iteration), dtype=np.float64).reshape(-1))

        def rows(cells: np.ndarray) -> np.ndarray:
            explainer, lock = _explainer(booster, iteration)
            with lock:
                return np.asarray(explainer.predict(X[np.asarray(cells)], num_iteration=iteration, pred_contrib=True))

        return expected, Explanation(list(self.columns_) + ["bias"], rows)

    def input_columns(self) -> list[str]:
        return list(self.columns_)

    def model_inputs(self, panel: CountPanel, origin: int) -> pd.DataFrame:
        return features_at(panel, origin, self.features).frame().drop("origin", "cell").to_pandas()

    def predict_inputs(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns_ if c not in frame.columns]
        if missing:
            raise ValueError(f"model input lacks feature columns {missing}")
        X = frame[self.columns_].to_numpy(dtype=np.float32)
        return self._output(np.asarray(self._fitted_booster().predict(X, num_iteration=self.best_iteration_)))

    def fit_summary(self) -> dict[str, float]:
        score = self.booster_.best_score.get("valid_0", {}) if self.booster_ is not None else {}
        if self.ranking:
            return {"best_iteration": float(self.best_iteration_), "train_rows": float(self.train_rows_),
                    "valid_ndcg": float(score.get("ndcg@50", np.nan))}
        return {"best_iteration": float(self.best_iteration_), "train_rows": float(self.train_rows_),
                "valid_poisson": float(score.get("poisson", np.nan))}

    def contributions(self, panel: CountPanel, origin: int) -> tuple[np.ndarray, list[str]]:
        """Per-cell feature contributions (LightGBM pred_contrib, log scale) for explaining a forecast."""
        matrix = features_at(panel, origin, self.features)
        contrib = np.asarray(self._fitted_booster().predict(matrix.X, num_iteration=self.best_iteration_, pred_contrib=True))
        return contrib, self.columns_ + ["bias"]

    def feature_importance(self) -> dict[str, float]:
        gains = self._fitted_booster().feature_importance("gain", iteration=self.best_iteration_)
        return dict(sorted(zip(self.columns_, gains.tolist()), key=lambda kv: -kv[1]))
