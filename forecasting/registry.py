"""Every forecaster by name: the one list backtests, the CLI's ``--forecaster``, the strongest-baseline choice
and the promotion gate read. Names are lower-case letters and underscores (they prefix MLflow metric keys)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from forecasting.base import Forecaster
from forecasting.baselines import KDE, SEPP, ExpWeighted, HistoryCounts, Naive, ProspectiveHotspot
from forecasting.blend import Blend
from forecasting.lgbm import LightGBMForecaster

FORECASTERS: dict[str, Callable[..., Forecaster]] = {
    "lightgbm": LightGBMForecaster,
    "naive": partial(Naive, window_days=28),
    "kde": KDE,
    "prospective": ProspectiveHotspot,
    "sepp": partial(SEPP, warm_start=True),
    "all_history": partial(HistoryCounts, window_days=None),
    "last_year": partial(HistoryCounts, window_days=365),
    "exp_weighted": ExpWeighted,
    "blend": Blend,
}
# registered, but run only when asked for by name (a second LightGBM fit per refit; validation did not make it
# the default: experiments/accuracy_variants.py)
BY_REQUEST = frozenset({"blend"})


def names() -> list[str]:
    return list(FORECASTERS)


def default_names() -> list[str]:
    """What a backtest compares when no forecaster is named: every registered one but those run by request."""
    return [name for name in FORECASTERS if name not in BY_REQUEST]


def forecaster_type(name: str) -> type[Forecaster]:
    factory = _factory(name)
    return factory.func if isinstance(factory, partial) else factory  # type: ignore[return-value]


def is_learned(name: str) -> bool:
    return forecaster_type(name).learned


def baseline_names() -> list[str]:
    """The traditional (non-learned) forecasters: the pool the strongest baseline is chosen from."""
    return [name for name in FORECASTERS if not is_learned(name)]


def make(name: str, **params) -> Forecaster:
    """A new forecaster of that name with the registry's defaults, then ``params`` (set_params names)."""
    model = _factory(name)()
    model.name = name
    return model.set_params(**params) if params else model


def factories(chosen: list[str] | None = None, seed: int = 0,
              params: dict[str, dict] | None = None) -> dict[str, Callable[[], Forecaster]]:
    """Factories (a refit series builds its own instance) for ``chosen`` names (default: all); ``params`` per
    name; ``seed`` goes to every forecaster that has one."""
    params = params or {}
    out: dict[str, Callable[[], Forecaster]] = {}
    for name in chosen or default_names():
        extra = dict(params.get(name, {}))
        if "seed" in make(name).get_params(deep=False):
            extra.setdefault("seed", seed)
        out[name] = partial(make, name, **extra)
    return out


def _factory(name: str) -> Callable[..., Forecaster]:
    if name not in FORECASTERS:
        raise KeyError(f"unknown forecaster {name!r}; choose from {', '.join(FORECASTERS)}")
    return FORECASTERS[name]
