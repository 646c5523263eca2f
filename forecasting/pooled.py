"""A pooled LightGBM across cities, trained with ``lightgbm.dask`` on rows no single worker holds, next to the
per-city models (issue 13 part 4).

Rows are the per-city model's feature matrices (``features.matrix``, the same ``FeatureConfig``, so the row for
shift t sees only incidents before t), built per city and per chunk of shifts as Dask partitions on the workers:
each partition's task opens its city's saved panel from the shared data folder (or a scattered panel) and the
client never holds the rows. Cities differ in scale, so the rows are made scale-free: every count feature is
divided by the city's rate (incidents per cell and shift before the cutoff), ``city_log_rate`` is added, and the
per-category columns are dropped (each city has its own taxonomy). The Poisson target is ``y / rate`` with weight
``rate`` (the same likelihood as ``y`` with mean ``rate x mu``), and a forecast is ``rate x booster(x)``.

``lightgbm.dask`` has no early stopping; the number of trees is chosen afterwards on the held-out last
``valid_days`` before the cutoff (the per-city model's rule): the validation deviance is computed on the workers
at every ``checkpoint`` trees and only the sums travel. The trained booster becomes a local model (``to_local``)
and is wrapped per city as an ordinary :class:`Forecaster` (predict, pickle, get_params/set_params).

Determinism: each city's partitions are pinned to one worker (city i -> the i-th worker, sorted by address),
zeros are sampled with a seed per (city, chunk), and LightGBM runs with ``deterministic`` and one thread, so the
same data and seed give the same booster on the same cluster.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from features.matrix import FeatureConfig, build_features, build_targets
from features.panel import CountPanel
from forecasting.base import Forecaster, NotFittedError
from forecasting.cluster import INSTALL, connect
from forecasting.lgbm import BoosterAsText, lgb  # lightgbm as forecasting.lgbm loads it (OpenMP threads that sleep)

UNSCALED = ("cell_lat", "cell_lon")  # besides the calendar's cal_* columns: not counts, left as they are
RATE_COLUMN = "city_log_rate"
PER_CITY = "lightgbm"  # the per-city model the pooled one is compared with (a registry name)

_panels: dict[tuple[str, int], CountPanel] = {}  # per worker process: a city's panel is read once
KEEP_PANELS = 4  # panels kept per process (a worker holds the cities pinned to it; sparse counts are small)


@dataclass(frozen=True)
class City:
    """One city of the pool: its name and its saved panel's folder (the same path on every worker)."""

    name: str
    panel: str


def load_panel(folder: str | Path) -> CountPanel:
    """The saved panel of a folder, read once per process (re-read when ``panel.json`` changes)."""
    path = Path(folder).resolve()
    try:
        stamp = (path / "panel.json").stat().st_mtime_ns
    except OSError:
        raise ValueError(f"no saved panel in {path}: give a folder written by `hotspots panel` "
                         "(panel.json, counts.parquet, study_area.*)") from None
    key = (str(path), stamp)
    if key not in _panels:
        for old in [k for k in _panels if k[0] == key[0]] + list(_panels)[: max(0, len(_panels) - KEEP_PANELS + 1)]:
            _panels.pop(old, None)  # a rewritten panel, or the oldest beyond the few kept
        _panels[key] = CountPanel.load(path)
    return _panels[key]


def _panel(source: str | CountPanel) -> CountPanel:
    return source if isinstance(source, CountPanel) else load_panel(source)


def city_rate(panel: CountPanel, until: int) -> float:
    """Incidents per cell and shift over the panel's history before ``until``: the city's scale."""
    rows = panel.slice(panel.first_shift, until)
    shifts = max(until - panel.first_shift, 1)
    return max(float(rows["count"].sum()) / (shifts * panel.n_cells), 1e-6)


def pooled_matrix(panel: CountPanel, origins: np.ndarray, config: FeatureConfig, rate: float) -> tuple[np.ndarray, list[str]]:
    """The per-city feature rows made comparable across cities: counts / rate, + log rate, no category columns."""
    matrix = build_features(panel, origins, config)
    keep = [j for j, name in enumerate(matrix.columns) if not name.startswith("cat_")]
    columns = [matrix.columns[j] for j in keep]
    X = matrix.X[:, keep]
    scaled = np.array([not (c.startswith("cal_") or c in UNSCALED) for c in columns])
    X[:, scaled] /= np.float32(rate)
    X = np.hstack([X, np.full((X.shape[0], 1), np.log(rate), dtype=np.float32)])
    return X, columns + [RATE_COLUMN]


def build_part(source: str | CountPanel, until: int, lo: int, hi: int, city_index: int, seed: int, zero_rate: float,
               config: FeatureConfig, category: str | list[str] | None) -> pd.DataFrame:
    """One partition on a worker: rows for origins [lo, hi) of one city, from history before ``until`` only,
    zeros sampled at ``zero_rate`` (weight 1/zero_rate) with a seed of their own."""
    panel = _panel(source).until(until)
    rate = city_rate(panel, until)
    origins = np.arange(lo, hi)
    X, columns = pooled_matrix(panel, origins, config, rate)
    y = build_targets(panel, origins, category).astype(np.float64)
    keep = (y > 0) | (np.random.default_rng([seed, city_index, lo, hi]).random(y.size) < zero_rate)
    frame = pd.DataFrame(X[keep], columns=columns)
    frame["label"] = y[keep] / rate
    frame["weight"] = np.where(y > 0, 1.0, 1.0 / zero_rate)[keep] * rate
    return frame


def deviance_curve(model: str, part: pd.DataFrame, columns: list[str], checkpoints: list[int]) -> np.ndarray:
    """Weighted Poisson deviance of a partition at each checkpoint (number of trees), without the constant."""
    booster = lgb.Booster(model_str=model)
    X = part[columns].to_numpy(dtype=np.float32)
    y, w = part["label"].to_numpy(), part["weight"].to_numpy()
    out = np.zeros(len(checkpoints))
    for i, n in enumerate(checkpoints):
        mu = np.maximum(booster.predict(X, num_iteration=n), 1e-12)
        out[i] = float(np.sum(w * (mu - y * np.log(mu))))
    return out


@contextmanager
def local_client(cluster: Any, workers: int = 2) -> Iterator[Any]:
    """A Client for ``cluster`` (address or Client), or a LocalCluster of one-thread workers without one."""
    if cluster is not None:
        with connect(cluster) as client:
            yield client
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ValueError(f"the pooled model trains with lightgbm.dask, which needs Dask's `distributed` ({exc}); "
                         f"{INSTALL}") from None
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        yield client


class _PinnedClient:
    """The Client handed to ``lightgbm.dask``, answering two questions in a fixed way so a pooled fit is the same
    on every run: the training partitions are computed on the workers that built them (``pins``, in partition
    order), and ``who_has`` lists them in partition order (distributed answers in the order of a set of keys,
    which decides each worker's row order and which worker is LightGBM's rank 0)."""

    def __init__(self, client: Any, pins: list[str]):
        self._client, self._pins = client, pins
        self._order: dict[Any, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def compute(self, collections: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(collections, list) or len(collections) != len(self._pins):
            return self._client.compute(collections, *args, **kwargs)
        futures = [self._client.compute(c, workers=[w], allow_other_workers=False) for c, w in zip(collections, self._pins)]
        self._order = {f.key: i for i, f in enumerate(futures)}
        return futures

    def who_has(self, futures: Any = None, **kwargs: Any) -> dict:
        found = self._client.who_has(futures, **kwargs)
        return dict(sorted(found.items(), key=lambda kv: self._order.get(kv[0], len(self._order))))


@dataclass
class PooledLightGBM(BoosterAsText, Forecaster):  # the booster pickled as text, as the per-city model's
    """The pooled model as one city's forecaster. ``fit(panel, until)`` trains on this panel together with the
    saved panels in ``others`` (on ``cluster``, else a local 2-worker cluster); :func:`train_pooled` trains once
    for many cities and hands each its own instance (same booster, the city's own rate)."""

    others: tuple[str, ...] = ()  # panel folders of the other cities of the pool
    train_days: int | None = 730
    valid_days: int = 56
    zero_rate: float = 0.05  # uniform: the per-city LightGBM samples zeros by past count (lgbm.py), this does not yet
    n_estimators: int = 300  # no early stopping in lightgbm.dask: the best count <= this is chosen on validation
    checkpoint: int = 10
    learning_rate: float = 0.1
    max_bin: int = 63
    num_leaves: int = 31
    min_child_samples: int = 100
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    chunk_shifts: int = 360
    seed: int = 0
    cluster: str | None = None
    features: FeatureConfig = field(default_factory=FeatureConfig)
    name: str = field(default="pooled", init=False, repr=False)
    booster_: lgb.Booster | None = field(default=None, init=False, repr=False)
    columns_: list[str] = field(default_factory=list, init=False, repr=False)
    rate_: float = field(default=0.0, init=False, repr=False)
    best_iteration_: int = field(default=0, init=False, repr=False)
    train_rows_: int = field(default=0, init=False, repr=False)
    cities_: int = field(default=0, init=False, repr=False)
    learned: ClassVar[bool] = True

    def lgb_params(self) -> dict[str, Any]:
        """DaskLGBMRegressor arguments: the per-city model's Poisson settings, one thread per worker."""
        return {"objective": "poisson", "n_estimators": self.n_estimators, "learning_rate": self.learning_rate,
                "max_bin": self.max_bin, "num_leaves": self.num_leaves, "min_child_samples": self.min_child_samples,
                "colsample_bytree": self.feature_fraction, "subsample": self.bagging_fraction, "subsample_freq": 1,
                "reg_lambda": self.lambda_l2, "random_state": self.seed, "deterministic": True,
                "force_row_wise": True, "verbosity": -1}  # threads: lightgbm.dask uses each worker's

    def _fit(self, panel: CountPanel, until: int) -> None:
        with local_client(self.cluster) as client:
            fitted = train_pooled(client, [panel, *self.others], [until] + [None] * len(self.others), self)[0]
        self.__dict__.update({k: getattr(fitted, k) for k in
                              ("booster_", "columns_", "rate_", "best_iteration_", "train_rows_", "cities_")})

    def _predict(self, panel: CountPanel, origins: np.ndarray) -> np.ndarray:
        if self.booster_ is None:
            raise NotFittedError(f"{type(self).__name__} must be fitted before predict")
        X, columns = pooled_matrix(panel, origins, self.features, self.rate_)
        if columns != self.columns_:
            raise ValueError(f"the panel gives feature columns {columns}, the pooled model was trained on {self.columns_}")
        return self.rate_ * np.asarray(self.booster_.predict(X, num_iteration=self.best_iteration_))

    def fit_summary(self) -> dict[str, float]:
        return {"best_iteration": float(self.best_iteration_), "train_rows": float(self.train_rows_),
                "cities": float(self.cities_), "city_rate": float(self.rate_)}

    def feature_importance(self) -> dict[str, float]:
        if self.booster_ is None:
            raise NotFittedError(f"{type(self).__name__} must be fitted first")
        gains = self.booster_.feature_importance("gain", iteration=self.best_iteration_)
        return dict(sorted(zip(self.columns_, gains.tolist()), key=lambda kv: -kv[1]))


def _windows(panel: CountPanel, until: int, model: PooledLightGBM) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training and validation chunks of origins before ``until``, on the per-city model's grid of chunks."""
    per_day = panel.calendar.per_day
    valid_start = until - model.valid_days * per_day
    days = model.train_days
    start = panel.first_shift + 1 if days is None else max(panel.first_shift + 1, until - days * per_day)
    if valid_start - start < per_day:
        raise ValueError(f"not enough history before shift {until}: need more than valid_days={model.valid_days} days")
    step = model.chunk_shifts

    def chunks(a: int, b: int) -> list[tuple[int, int]]:
        edges = sorted({a, b, *range((a // step + 1) * step, b, step)})
        return list(zip(edges[:-1], edges[1:]))

    return chunks(start, valid_start), chunks(valid_start, until)


def train_pooled(client: Any, sources: Sequence[Any], cutoffs: Sequence[int | None], model: PooledLightGBM,
                 category: str | list[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> list[PooledLightGBM]:
    """Train one pooled booster on every city's rows before its cutoff and return one fitted forecaster per city.

    ``sources`` are panel folders (the same path on every worker; workers read them) or in-memory panels (sent
    once to their city's worker); ``cutoffs`` the first shift each city must not learn from (None: its end)."""
    from dask import dataframe as dd

    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise ValueError("the Dask cluster has no workers; start some with `dask worker ADDRESS`")
    run = uuid.uuid4().hex[:10]
    train_parts: list[Any] = []
    valid_parts: list[Any] = []
    rates, panels, scattered, pins = [], [], [], []
    for i, (source, cutoff) in enumerate(zip(sources, cutoffs)):
        # the city's calendar and span come from the sparse panel (the client builds no rows)
        panel = source if isinstance(source, CountPanel) else load_panel(source)
        until = panel.end_shift if cutoff is None else int(cutoff)
        train, valid = _windows(panel, until, model)
        pin = {"workers": [workers[i % len(workers)]], "allow_other_workers": False, "pure": False}
        arg = source
        if isinstance(source, CountPanel):
            arg = client.scatter(source, hash=False, workers=pin["workers"])
            scattered.append(arg)
        pins += [workers[i % len(workers)]] * len(train)
        for chunks, parts in ((train, train_parts), (valid, valid_parts)):
            parts += [client.submit(build_part, arg, until, lo, hi, i, model.seed, model.zero_rate, model.features,
                                    category, key=f"pooled-rows-{run}-{i}-{lo}", **pin) for lo, hi in chunks]
        rates.append(city_rate(panel, until))
        panels.append((panel, until))
    meta = client.submit(lambda frame: frame.iloc[:0], train_parts[0], pure=False).result()
    columns = [c for c in meta.columns if c not in ("label", "weight")]
    rows = dd.from_delayed(train_parts, meta=meta, verify_meta=False)
    if progress:
        progress(f"pooled rows: {len(train_parts)} training and {len(valid_parts)} validation partitions of "
                 f"{len(sources)} cities on {len(workers)} workers")
    regressor = lgb.DaskLGBMRegressor(client=_PinnedClient(client, pins), **model.lgb_params())  # type: ignore[arg-type]
    regressor.fit(rows[columns], rows["label"], sample_weight=rows["weight"])
    booster = regressor.to_local().booster_
    text = booster.model_to_string()
    checkpoints = sorted({*range(model.checkpoint, booster.current_iteration() + 1, model.checkpoint),
                          booster.current_iteration()})
    curves = [client.submit(deviance_curve, text, part, columns, checkpoints, pure=False) for part in valid_parts]
    total = np.sum([f.result() for f in curves], axis=0)
    best = checkpoints[int(np.argmin(total))]
    n_rows = int(sum(client.submit(len, p, pure=False).result() for p in train_parts))
    client.cancel(train_parts + valid_parts + scattered)
    out = []
    for (_, until), rate in zip(panels, rates):
        fitted = copy.copy(model)
        fitted.booster_, fitted.columns_, fitted.rate_ = lgb.Booster(model_str=text), list(columns), rate
        fitted.best_iteration_, fitted.train_rows_, fitted.cities_ = best, n_rows, len(sources)
        fitted.fitted_until_ = until
        out.append(fitted)
    return out
