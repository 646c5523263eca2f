"""Property test of the whole OpenAPI spec with schemathesis: every operation, generated requests (valid and
invalid) with an admin key, checked for no 5xx and for responses that match the documented schema.

Generated city names are mostly unknown ones (404), so the city (query or path) is drawn from the two real
ones as well, and the shift from real shift starts as well as generated text, so that forecasts are really
computed. Bounded: a fixed number of examples per operation, derandomised.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance
from service_support import BARE, CITY, isolated_mlflow_env, served_city

from serving.app import create_app
from serving.keys import Role

# generated requests per operation (30 made this the suite's costliest test, 39 CPU-s). Profiled (2026-11-30): the
# cost is per example and even across the 38 (operation, mode) runs, about half drawing the case and half the
# request, plus the PNG renders; no start-up or single endpoint dominates. Valid input (where forecasts, maps and
# patrol doses are computed, so where a 5xx can hide) keeps 15; invalid input was 15 too and is now 8: nearly
# every such request is refused by the one validation layer before a handler runs, and 8 derandomised mutations
# still reach each operation's parameters and body (19 runs x 7 fewer requests, about 5 CPU-s)
EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 8}
STATUSES: Counter = Counter()  # (operation, status) of every generated request, to show the run was not vacuous
SHIFTS = ("next", "2020-02-10T14:00:00-05:00", "2020-03-01T06:00:00-05:00", "2019-01-05T22:00")


@pytest.fixture(scope="module")
def service(toronto_incidents, tmp_path_factory):
    with isolated_mlflow_env():
        city = served_city(toronto_incidents, tmp_path_factory.mktemp("schemathesis"))
        app = create_app(city.settings.model_copy(update=dict(model_refresh_seconds=3600)))
        admin = app.state.keys.create_key(Role.admin, "schemathesis")
        with TestClient(app):  # runs the lifespan: models loaded once
            yield SimpleNamespace(app=app, admin=admin, cells=list(city.panel.study_area.h3_ids[:50]))


@pytest.fixture(scope="module")
def api(service):
    loaded = schemathesis.openapi.from_asgi("/openapi.json", service.app)

    @loaded.hook
    def flatmap_query(context, query):
        if not isinstance(query, dict):
            return st.just(query)
        draws = {}
        if "city" in query:
            draws["city"] = st.sampled_from([CITY, BARE, query["city"]])
        if isinstance(query.get("shift"), str):
            draws["shift"] = st.sampled_from([*SHIFTS, query["shift"]])
        return st.fixed_dictionaries(draws).map(lambda drawn: {**query, **drawn})

    @loaded.hook
    def flatmap_body(context, body):
        if not isinstance(body, dict) or not isinstance(body.get("patrols"), list):
            return st.just(body)
        entry = lambda e: (st.fixed_dictionaries({"h3": st.sampled_from([*service.cells, e.get("h3")]),  # noqa: E731
                                                   "dose_minutes": st.sampled_from([30.0, e.get("dose_minutes")])})
                           if isinstance(e, dict) else st.just(e))
        return st.fixed_dictionaries({
            "city": st.sampled_from([CITY, body.get("city")]), "shift": st.sampled_from([*SHIFTS[1:], body.get("shift")]),
            "patrols": st.tuples(*map(entry, body["patrols"])).map(list),
        }).map(lambda drawn: {**body, **drawn})

    @loaded.hook
    def flatmap_path_parameters(context, path_parameters):
        if not isinstance(path_parameters, dict) or "city" not in path_parameters:
            return st.just(path_parameters)
        return st.sampled_from([CITY, BARE, path_parameters["city"]]).map(lambda c: {**path_parameters, "city": c})

    return loaded


def _city(case) -> str | None:
    return (case.query or {}).get("city") or (case.path_parameters or {}).get("city")


@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, except the one documented 503: a city with a panel but no champion model, whose
    message tells the operator what to run (issue 4, 'no champion model 503')."""
    STATUSES[(case.operation.label, response.status_code)] += 1
    if response.status_code == 503 and _city(case) == BARE and f"hotspots backtest {BARE}" in response.text:
        return True
    return not_a_server_error(ctx, response, case)


def operations(api) -> list:
    found = [result.ok() for result in api.get_all_operations()]  # raises on an operation the spec gets wrong
    return sorted(found, key=lambda op: op.label)


def exercise(operation, mode: GenerationMode, admin: str) -> None:
    """Bounded, derandomised generated requests for one operation; raises the first (shrunk) failure."""

    @settings(max_examples=EXAMPLES[mode], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        case.call_and_validate(headers={"X-API-Key": admin}, checks=[no_server_error, response_schema_conformance])

    check()


def test_openapi_no_5xx_and_responses_match_the_schema(api, service):
    """Every operation of the spec, with valid and with invalid generated input. (schemathesis' own pytest
    loader, ``schemathesis.pytest.from_fixture``, sets ``Function._nodeid``, which pytest 9 no longer has, so
    the operations are driven through ``as_strategy`` and Hypothesis here.)"""
    ops = operations(api)
    documented = {(method.upper(), path) for path, item in service.app.openapi()["paths"].items() for method in item}
    assert {(op.method.upper(), op.path) for op in ops} == documented  # nothing left out
    failures = []
    for operation in ops:
        has_input = bool(list(operation.iter_parameters())) or bool(list(operation.body))
        # with no parameter and no body there is no invalid request to make (the key is sent as given)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,):
            try:
                exercise(operation, mode, service.admin)
            except (Exception, FailureGroup) as exc:  # noqa: BLE001 - collect every operation's failures, report all
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
    served = {label for (label, status) in STATUSES if status in (200, 201)}
    assert {op.label for op in ops} <= {label for label, _ in STATUSES}  # every operation was called
    assert {"GET /v1/hotspots", "GET /v1/hotspots.geojson", "GET /v1/forecast", "GET /v1/models/{city}",
            "POST /v1/patrols"} <= served
    assert any(status == 422 for _, status in STATUSES) and any(status == 404 for _, status in STATUSES)
