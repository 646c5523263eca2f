"""`--param` reaches every forecaster: NAME.KEY=VALUE for NAME, a bare KEY=VALUE for LightGBM (or for the one
forecaster `hotspots train` fits), typed after the forecaster's own get_params; anything else is a one-line error."""

from __future__ import annotations

import pytest
import typer

from serving.cli.models import chosen_factories, params_by_forecaster


def test_dotted_params_go_to_their_forecaster_and_bare_ones_to_lightgbm():
    params = params_by_forecaster(["n_estimators=50", "sepp.max_iter=20", "kde.bandwidth_m=150",
                                   "last_year.window_days=180", "all_history.window_days=none"],
                                  ["lightgbm", "sepp", "kde", "last_year", "all_history"])
    assert params == {"lightgbm": {"n_estimators": 50}, "sepp": {"max_iter": 20}, "kde": {"bandwidth_m": 150.0},
                      "last_year": {"window_days": 180}, "all_history": {"window_days": None}}
    assert isinstance(params["kde"]["bandwidth_m"], float)


def test_the_factories_build_forecasters_with_those_params():
    factories = chosen_factories(["lightgbm", "sepp", "exp_weighted"],
                                 ["learning_rate=0.2", "sepp.tol=1e-4", "exp_weighted.half_life_days=91"])
    assert factories["lightgbm"]().get_params(deep=False)["learning_rate"] == 0.2
    assert factories["sepp"]().get_params(deep=False)["tol"] == 1e-4
    assert factories["sepp"]().get_params(deep=False)["warm_start"] is True  # the registry's own default kept
    assert factories["exp_weighted"]().get_params(deep=False)["half_life_days"] == 91


def test_train_sends_bare_params_to_the_forecaster_it_fits():
    assert params_by_forecaster(["window_days=14"], ["naive"], bare="naive") == {"naive": {"window_days": 14}}


@pytest.mark.parametrize("pairs, chosen, message", [
    (["sepp.depth=3"], ["sepp"], "sepp has no parameter 'depth'; it has fit_days, max_iter, tol, warm_start"),
    (["sepp.max_iter=many"], ["sepp"], "sepp's max_iter must be of type int"),
    (["kde.bandwidth_m=150"], ["lightgbm", "sepp"], "is for kde, which this run does not fit"),
    (["n_estimators=50"], ["sepp"], "is for lightgbm, which this run does not fit"),
    (["sepp.warm_start=maybe"], ["sepp"], "sepp's warm_start is true or false"),
    (["max_iter"], ["sepp"], "--param 'max_iter'"),
])
def test_bad_params_are_one_line_errors(pairs, chosen, message, capsys):
    with pytest.raises(typer.Exit) as exit_:
        params_by_forecaster(pairs, chosen)
    assert exit_.value.exit_code == 2
    out = " ".join(capsys.readouterr().out.split())
    assert message in out and "Traceback" not in out
