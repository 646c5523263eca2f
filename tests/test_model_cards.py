"""The model card, the models overview and /v1/diagnostics read what the backtest and the assessments logged
into the champion's MLflow run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from service_support import BARE, CITY, asgi_service

from forecasting.reporting.templating import figure_png
from forecasting.reporting.tracking import assessment_run_id, log_assessment
from serving.keys import Role

BACKTEST_METRICS = {
    "lightgbm.hit_rate.1pct": 0.169, "lightgbm.hit_rate_low.1pct": 0.164, "lightgbm.hit_rate_high.1pct": 0.173,
    "lightgbm.pai.1pct": 16.7, "naive.hit_rate.1pct": 0.146, "naive.pai.1pct": 14.5,
    "lightgbm.hit_rate.5pct": 0.30, "naive.hit_rate.5pct": 0.33, "claim.ratio.1pct": 1.15,
    "all_history.hit_rate.1pct": 0.160, "all_history.hit_rate.5pct": 0.32,
    # references and headroom shares are logged apart from the forecasters: never read as a forecaster's score
    "reference.shift_of_day_clairvoyant.hit_rate.1pct": 0.176, "headroom.lightgbm.1pct": 0.56,
}


def log_backtest_record(city) -> None:
    """What a backtest and the assessments leave in the champion's run."""
    client = MlflowClient(tracking_uri=city.settings.tracking_uri, registry_uri=city.settings.tracking_uri)
    city.run_id = assessment_run_id(client, CITY, city.version)
    mlflow.set_tracking_uri(city.settings.tracking_uri)
    with mlflow.start_run(run_id=city.run_id):
        mlflow.log_metrics(BACKTEST_METRICS)
        mlflow.set_tags({"claim.verdict.1pct": "refuted", "champion_forecaster": "lightgbm",
                         "strongest_baseline": "all_history"})
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        log_assessment("diagnostics", {"gini": 0.8, "per_shift": [0.1, 0.2]}, {"gini": 0.8, "jaccard_mean": 0.6},
                       html="<section>diag</section>", png=figure_png(fig))
        log_assessment("bias_audit", {"groups": [{"group": "a", "exposure_ratio": 1.2}]}, {"exposure_ratio.a": 1.2})
        plt.close(fig)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def svc(toronto_incidents, tmp_path_factory):
    with asgi_service(toronto_incidents, tmp_path_factory.mktemp("cards"), log_backtest_record) as service:
        yield service


def get(svc, path, role=Role.analyst):
    return svc.client.get(path, headers={"X-API-Key": svc.keys[role]})


def test_model_card_has_backtest_claim_and_assessments(svc):
    body = get(svc, f"/v1/models/{CITY}").json()
    card = body["card"]
    assert card["version"] == svc.version and card["run_id"] == svc.run_id
    scores = {(s["forecaster"], s["coverage"]): s for s in card["backtest"]["scores"]}
    assert scores[("lightgbm", 0.01)]["hit_rate"] == pytest.approx(0.169)
    assert scores[("lightgbm", 0.01)]["hit_rate_low"] == pytest.approx(0.164)
    assert scores[("naive", 0.05)]["hit_rate"] == pytest.approx(0.33)
    assert {f for f, _ in scores} == {"lightgbm", "naive", "all_history"}  # every forecaster, no reference
    assert card["backtest"]["champion_forecaster"] == "lightgbm"
    assert card["backtest"]["strongest_baseline"] == "all_history"
    # a baseline that wins is shown as the winner, never hidden
    assert card["backtest"]["best_by_coverage"] == {"0.01": "lightgbm", "0.05": "naive"}
    assert card["backtest"]["claims"] == [{"coverage": 0.01, "ratio": pytest.approx(1.15), "verdict": "refuted"}]
    names = {a["name"]: a for a in card["assessments"]}
    assert names["diagnostics"]["metrics"] == {"gini": pytest.approx(0.8), "jaccard_mean": pytest.approx(0.6)}
    assert names["diagnostics"]["detail"]["per_shift"] == [0.1, 0.2] and names["diagnostics"]["updated_at"]
    assert names["bias_audit"]["detail"]["groups"][0]["exposure_ratio"] == 1.2


def test_models_overview_and_no_champion(svc):
    body = get(svc, "/v1/models").json()
    cities = {c["city"]: c for c in body["cities"]}
    assert cities[CITY]["champion_version"] == svc.version
    # the champion against the strongest baseline the backtest chose, not a fixed "naive"
    assert [(h["forecaster"], h["coverage"]) for h in cities[CITY]["headline"]] == [
        ("lightgbm", 0.01), ("lightgbm", 0.05), ("all_history", 0.01), ("all_history", 0.05)]
    assert cities[BARE]["champion_version"] is None and cities[BARE]["headline"] == []
    assert get(svc, "/v1/models", Role.planner).status_code == 403


def test_diagnostics_endpoint(svc):
    body = get(svc, f"/v1/diagnostics/{CITY}").json()
    assert body["model_version"] == svc.version
    assert body["diagnostics"]["metrics"]["gini"] == pytest.approx(0.8)
    assert body["bias_audit"]["metrics"] == {"exposure_ratio.a": pytest.approx(1.2)}
    assert body["patrol_diagnostics"] is None
    assert get(svc, f"/v1/diagnostics/{CITY}", Role.planner).status_code == 403
    assert svc.client.get(f"/v1/diagnostics/{CITY}").status_code == 401
    assert get(svc, "/v1/diagnostics/atlantis").status_code == 404
    bare = get(svc, f"/v1/diagnostics/{BARE}")
    assert bare.status_code == 503 and f"hotspots backtest {BARE}" in bare.json()["detail"]
