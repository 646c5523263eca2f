"""A saved backtest's forecasts are stored uncompressed (deflating a city-year took ~40 s), and folders saved
compressed before still load the same through the one reader."""

from __future__ import annotations

import json
import zipfile

import numpy as np

from forecasting.saved import PREDICTIONS, SavedBacktest, save_backtest


def arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    origins = np.arange(100, 130, dtype=np.int64)
    observed = rng.poisson(0.3, (30, 50)).astype(np.float64)
    predictions = {"lightgbm": rng.gamma(1.0, 0.3, (30, 50)), "sepp": rng.gamma(1.0, 0.3, (30, 50))}
    return origins, observed, rng.uniform(0.05, 0.1, 50), predictions


def test_saved_uncompressed_and_read_back_exactly(tmp_path):
    origins, observed, areas, predictions = arrays()
    save_backtest(tmp_path, origins, observed, areas, predictions, {"per_day": 3, "strongest_baseline": "sepp"})
    with zipfile.ZipFile(tmp_path / PREDICTIONS) as z:
        assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_STORED}
    saved = SavedBacktest.load(tmp_path)
    assert np.array_equal(saved.origins, origins) and saved.origins.dtype == np.int64
    assert np.array_equal(saved.observed, observed) and np.array_equal(saved.areas, areas)
    assert list(saved.predictions) == ["lightgbm", "sepp"]
    assert all(np.array_equal(saved.predictions[k], v) for k, v in predictions.items())
    assert saved.per_day == 3 and saved.strongest_baseline == "sepp"


def test_folders_saved_compressed_before_still_load(tmp_path):
    origins, observed, areas, predictions = arrays(1)
    np.savez_compressed(tmp_path / PREDICTIONS, origins=origins, observed=observed, areas=areas,
                        **{f"pred_{name}": pred for name, pred in predictions.items()})  # as written before
    (tmp_path / "backtest.json").write_text(json.dumps({"per_day": 3}))
    with zipfile.ZipFile(tmp_path / PREDICTIONS) as z:
        assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_DEFLATED}
    saved = SavedBacktest.load(tmp_path)
    assert np.array_equal(saved.observed, observed) and np.array_equal(saved.origins, origins)
    assert all(np.array_equal(saved.predictions[k], v) for k, v in predictions.items())
