"""A saved backtest: the one writer and the one reader of a backtest folder's forecasts.

``predictions.npz`` (stored uncompressed since issue 15; older folders hold it compressed and read alike) keeps
every forecaster's forecast for every test shift with the observed counts and cell areas; ``backtest.json`` keeps
how it was made (source, resolution, shift starts, time zone), so commands that read it later (claim, diagnose,
audit) never guess the protocol from today's settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.panel import CountPanel

PREDICTIONS = "predictions.npz"
PROTOCOL = "backtest.json"
FORECASTS = "forecasts.parquet"


def protocol_of(panel: CountPanel, source: str, **extra: Any) -> dict[str, Any]:
    """What a backtest's figures depend on besides the forecasts: the grid, the shifts, the data."""
    return {"city": source, "resolution": panel.study_area.resolution, "shift_starts": ",".join(panel.calendar.labels),
            "timezone": panel.calendar.timezone, "per_day": panel.calendar.per_day, "n_cells": panel.n_cells,
            "data_fingerprint": panel.fingerprint(), **extra}


def save_backtest(out_dir: Path, origins: np.ndarray, observed: np.ndarray, areas: np.ndarray,
                  predictions: dict[str, np.ndarray], protocol: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # stored, not deflated: a city-year of forecasts deflates in ~40 s and stores in ~3 s (Toronto res 9: 490 MB
    # against 187 MB); np.load reads either, so folders saved compressed before stay readable
    np.savez(out_dir / PREDICTIONS, origins=origins, observed=observed, areas=areas,
             **{f"pred_{name}": pred for name, pred in predictions.items()})  # type: ignore[arg-type]  # numpy stubs: **arrays could fill allow_pickle
    (out_dir / PROTOCOL).write_text(json.dumps(protocol, indent=2, default=str))
    return out_dir


def write_forecasts(out_dir: Path, panel: CountPanel, origins: np.ndarray, observed: np.ndarray,
                    predictions: dict[str, np.ndarray]) -> Path:
    """Every forecaster's score for every cell and test shift, in a format any scorer reads: one row per
    (cell, shift, forecaster) with the H3 id, the shift's start in UTC, the score and the observed count.
    Written a forecaster at a time (one row group each), so memory stays at one forecaster's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_shifts, n_cells = observed.shape
    cells = pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(n_cells, dtype=np.int32), n_shifts)),
                                           pa.array(panel.study_area.h3_ids))
    starts = panel.calendar.bounds(origins)["start_utc"].to_numpy().astype("datetime64[us]")
    shift_start = pa.array(np.repeat(starts, n_cells), type=pa.timestamp("us", tz="UTC"))
    shift_id = pa.array(np.repeat(np.asarray(origins, dtype=np.int64), n_cells))
    obs = pa.array(observed.astype(np.int32).ravel())
    path = Path(out_dir) / FORECASTS
    schema = pa.schema([("cell", pa.dictionary(pa.int32(), pa.string())), ("shift_start_utc", pa.timestamp("us", tz="UTC")),
                        ("shift_id", pa.int64()), ("forecaster", pa.dictionary(pa.int32(), pa.string())),
                        ("score", pa.float64()), ("observed", pa.int32())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for name, pred in predictions.items():
            forecaster = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n_shifts * n_cells, dtype=np.int32)),
                                                        pa.array([name]))
            writer.write_table(pa.table([cells, shift_start, shift_id, forecaster,
                                         pa.array(np.asarray(pred, dtype=np.float64).ravel()), obs], schema=schema))
    return path


@dataclass
class SavedBacktest:
    """What a backtest folder keeps: every forecaster's forecast for every test shift, and the run it belongs to."""

    out_dir: Path
    origins: np.ndarray
    observed: np.ndarray
    areas: np.ndarray
    predictions: dict[str, np.ndarray]
    importance: dict[str, float] | None
    run_id: str | None
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def per_day(self) -> int:
        """Shifts per day of the panel the backtest was made on."""
        if "per_day" in self.protocol:
            return int(self.protocol["per_day"])
        starts = self.protocol.get("shift_starts")
        if not starts:
            raise ValueError(f"{self.out_dir} does not say which shifts it was made with: rerun the backtest")
        return len(str(starts).split(","))

    @property
    def resolution(self) -> int | None:
        value = self.protocol.get("resolution")
        return None if value is None else int(value)

    @classmethod
    def load(cls, out_dir: Path) -> SavedBacktest:
        out_dir = Path(out_dir)
        path = out_dir / PREDICTIONS
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `hotspots backtest` first (it saves every forecast there)")
        with np.load(path) as z:
            predictions = {k.removeprefix("pred_"): z[k] for k in z.files if k.startswith("pred_")}
            origins, observed, areas = z["origins"], z["observed"], z["areas"]
        imp, run = out_dir / "feature_importance.json", out_dir / "run.json"
        return cls(out_dir, origins, observed, areas, predictions,
                   json.loads(imp.read_text()) if imp.is_file() else None,
                   json.loads(run.read_text())["run_id"] if run.is_file() else None,
                   _protocol(out_dir))

    def check(self, panel: CountPanel) -> None:
        if self.areas.size != panel.n_cells:
            raise ValueError(f"the backtest in {self.out_dir} has {self.areas.size} cells, the panel {panel.n_cells}: "
                             "rebuild one of them so both use the same study area")

    def pair(self, model: str, baseline: str) -> dict[str, np.ndarray]:
        return forecaster_pair(self.predictions, model, baseline)

    @property
    def strongest_baseline(self) -> str | None:
        """The strongest baseline the backtest chose on its validation window (None in folders made before)."""
        return self.protocol.get("strongest_baseline")

    @property
    def winner(self) -> str | None:
        """The backtest's winner against the strongest baseline: backtest.json, else promotion.json."""
        if self.protocol.get("winner"):
            return str(self.protocol["winner"])
        promotion = self.out_dir / "promotion.json"
        return json.loads(promotion.read_text()).get("winner") if promotion.is_file() else None

    def assessed_pair(self, model: str | None = None, baseline: str | None = None) -> tuple[str, str | None]:
        """(model, baseline) a later assessment or claim compares, defaulting to the backtest's own choice: the
        winner (the learned candidate when the strongest baseline itself won) against the strongest baseline.
        A model named that is the strongest baseline itself has no default baseline (None: assessed alone).
        A ValueError names the option to give when the folder does not say."""
        strongest = self.strongest_baseline
        named = baseline is not None
        baseline = baseline or strongest
        if model is None:
            winner, candidate = self.winner, self.protocol.get("candidate")
            model = winner if winner is not None and winner != strongest else candidate or winner
        if model is None or baseline is None:
            raise ValueError(f"{self.out_dir} does not name its winner and strongest baseline (made before they were "
                             f"recorded): give the forecasters by name, or rerun the backtest; it has "
                             f"{sorted(self.predictions)}")
        return model, (baseline if named or baseline != model else None)

    def importance_of(self, model: str) -> dict[str, float] | None:
        """The saved feature importance when it belongs to ``model`` (the backtest's learned candidate)."""
        if "importance_of" in self.protocol:
            return self.importance if self.protocol["importance_of"] == model else None
        from forecasting import registry  # folders from before: the importance was the learned candidate's

        return self.importance if model in registry.names() and registry.is_learned(model) else None


def forecaster_pair(predictions: dict[str, np.ndarray], model: str, baseline: str | None) -> dict[str, np.ndarray]:
    """The forecasters an assessment compares (the model alone when ``baseline`` is None), or a KeyError naming
    what the backtest has."""
    names = [model] + ([baseline] if baseline is not None and baseline != model else [])
    missing = [name for name in names if name not in predictions]
    if missing:
        raise KeyError(f"the backtest has no forecasts of {missing}; it has {sorted(predictions)}")
    return {name: predictions[name] for name in names}


def _protocol(out_dir: Path) -> dict[str, Any]:
    """backtest.json, or the report's meta for folders written before it existed."""
    if (out_dir / PROTOCOL).is_file():
        return json.loads((out_dir / PROTOCOL).read_text())
    summary = out_dir / "summary.json"
    return json.loads(summary.read_text()).get("meta", {}) if summary.is_file() else {}
