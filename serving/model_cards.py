"""Model cards from the MLflow record: a version's backtest scores against every baseline, the claim verdicts,
and the latest assessments (diagnostics, bias audit, patrol analysis) logged into its run.

Cards are read through the model store's own client (never MLflow's process-wide URIs) and cached per
(city, version) for the store's refresh interval, so a busy service does not query the registry per request.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from forecasting.reporting.tracking import ASSESSMENTS, assessment_run_id
from serving.card_schemas import Assessment, BacktestRecord, ClaimVerdict, ForecasterScore, ModelCard
from serving.models_store import ModelStore

SCORE = re.compile(r"^(?P<forecaster>[a-z_]+)\.(?P<metric>hit_rate|hit_rate_low|hit_rate_high|pai|pei)\.(?P<pct>[\d.]+)pct$")
CLAIM = re.compile(r"^claim\.ratio\.(?P<pct>[\d.]+)pct$")


def _scores(metrics: dict[str, float]) -> list[ForecasterScore]:
    rows: dict[tuple[str, float], dict] = {}
    for key, value in metrics.items():
        m = SCORE.match(key)
        if m:
            cov = round(float(m["pct"]) / 100, 6)
            rows.setdefault((m["forecaster"], cov), {})[m["metric"]] = value
    return [ForecasterScore(forecaster=f, coverage=c, **v)
            for (f, c), v in sorted(rows.items(), key=lambda r: (r[0][1], r[0][0]))]


def backtest_record(run_id: str, metrics: dict[str, float], tags: dict[str, str],
                    params: dict[str, str]) -> BacktestRecord | None:
    scores = _scores(metrics)
    if not scores:
        return None
    claims = []
    for key, value in metrics.items():
        m = CLAIM.match(key)
        if m:
            claims.append(ClaimVerdict(coverage=round(float(m["pct"]) / 100, 6), ratio=value,
                                       verdict=tags.get(f"claim.verdict.{m['pct']}pct")))
    best: dict[str, str] = {}
    for cov in sorted({s.coverage for s in scores}):
        ranked = [s for s in scores if s.coverage == cov and s.hit_rate is not None]
        if ranked:
            best[f"{cov:g}"] = max(ranked, key=lambda s: cast(float, s.hit_rate)).forecaster  # None filtered out above
    n_cells = params.get("n_cells")
    return BacktestRecord(run_id=run_id, test_start=params.get("test_start"), test_end=params.get("test_end"),
                          n_cells=int(n_cells) if n_cells else None, scores=scores,
                          claims=sorted(claims, key=lambda c: c.coverage), best_by_coverage=best,
                          champion_forecaster=tags.get("champion_forecaster"),
                          strongest_baseline=tags.get("strongest_baseline") or tags.get("claim.baseline"))


@dataclass(frozen=True)
class _Cached:
    card: ModelCard
    at: float


class ModelCards:
    def __init__(self, models: ModelStore, ttl_seconds: float = 60.0):
        self.models = models
        self.ttl = ttl_seconds
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._lock = threading.Lock()

    def card(self, city: str, version: str) -> ModelCard:
        """The version's card (raises RegistryUnreachable-like MLflow errors to the caller)."""
        key = (city, version)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit.at < self.ttl:
            return hit.card
        card = self._read(city, version)
        with self._lock:
            self._cache[key] = _Cached(card, time.monotonic())
        return card

    def _read(self, city: str, version: str) -> ModelCard:
        client = self.models.client()
        run_id = assessment_run_id(client, city, version)
        if run_id is None:
            return ModelCard(city=city, version=version, run_id=None, backtest=None, assessments=[],
                             hint="this version has no MLflow run")
        run = client.get_run(run_id)
        metrics, tags, params = dict(run.data.metrics), dict(run.data.tags), dict(run.data.params)
        assessments = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in ASSESSMENTS:
                if not any(a.path == f"{name}/{name}.json" for a in client.list_artifacts(run_id, name)):
                    continue
                local = Path(client.download_artifacts(run_id, f"{name}/{name}.json", tmp))
                prefix = f"{name}."
                assessments.append(Assessment(
                    name=name, updated_at=tags.get(f"assessment.{name}"),
                    metrics={k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)},
                    detail=json.loads(local.read_text())))
        backtest = backtest_record(run_id, metrics, tags, params)
        hints = []
        if backtest is None:
            hints.append(f"no backtest record: run `hotspots backtest {city}`")
        missing = [n for n in ASSESSMENTS[:2] if n not in {a.name for a in assessments}]
        if missing:
            hints.append(f"no {' or '.join(missing)} yet: run `hotspots diagnose {city}` / `hotspots audit {city}`")
        return ModelCard(city=city, version=version, run_id=run_id, backtest=backtest, assessments=assessments,
                         hint="; ".join(hints) or None)
