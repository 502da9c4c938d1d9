"""Schemathesis against the served API: every operation of the committed OpenAPI document (which
test_openapi.py keeps equal to the app's), with valid and invalid inputs, over real HTTP to a real
server. No answer is a 5xx, every 4xx is `{"error": "<message>"}`, and every answer matches the
status codes, content types, headers and schemas the document declares.

The example budget is bounded (`EXAMPLES` per operation and mode, derandomized) so that the suite
stays a few seconds long and gives the same cases on every run; raise it locally with
`DREAMSERVE_TEST_SCHEMA_EXAMPLES=500 pytest tests/blackbox/test_schemathesis.py` to look harder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import allow_header_conformance, positive_data_acceptance
from servers import DREAMSERVE_SERVE, Server
from support import free_port

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("DREAMSERVE_TEST_SCHEMA_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`dreamserve serve` on a free port in a fresh data dir."""
    api = Server(
        tmp_path_factory.mktemp("schemathesis"),
        free_port(),
        extra={"DREAMSERVE_ACCESS_LOG": "false"},
        command=DREAMSERVE_SERVE,
    )
    assert api.token is not None, api.output
    yield api
    api.stop()
    assert " 500 " not in api.output


# Above the longest answer the document allows: GET /images/<jobid>?wait=60 may hold 60 s (a
# job still running under the load of the rest of the suite), and a client timeout there is no
# fault of the server's.
REQUEST_TIMEOUT = 75
schema = schemathesis.openapi.from_dict(json.loads((ROOT / "openapi.json").read_text()))
schema.config.update(request_timeout=REQUEST_TIMEOUT)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES,
    deterministic=True,
    database="none",
)


# The flows send valid requests only (invalid ones end a flow at its first step).
flows_schema = schemathesis.openapi.from_dict(json.loads((ROOT / "openapi.json").read_text()))
flows_schema.config.update(request_timeout=REQUEST_TIMEOUT)
flows_schema.config.generation.update(modes=[GenerationMode.POSITIVE], database="none")


@schemathesis.check
def errors_are_error_objects(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx body is a JSON object holding one non-empty `error` string."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
        f"{response.status_code} is not JSON: {response.text[:200]!r}"
    )
    body: Any = json.loads(response.text)
    assert isinstance(body, dict), f"not an error object: {body!r}"
    assert set(body) == {"error"}, f"not an error object: {body!r}"
    assert isinstance(body["error"], str), f"not a message: {body!r}"
    assert body["error"], f"empty error: {body!r}"
    return True


# Checks that do not apply, and why:
# - positive_data_acceptance wants every schema-valid request accepted, but many of the contract's
#   rules are not in the document's schemas (a known engine, a model's prompt rule, a job id that
#   exists): those requests are 400s or 404s by the contract (each has its own test).
# - allow_header_conformance on paths that two documented paths match: `/assets/{x}` is an
#   account's assets (GET, POST) and an asset (DELETE); `/images/upscale` is also a job id's
#   path (GET). A 405 there allows every method served at the path, more than one document
#   path lists (test_images_api.py tests those headers).
EXCLUDED = [positive_data_acceptance]
SHARED_PATHS = {
    "/v1/dreamina/assets/{account}",
    "/v1/dreamina/assets/{assetId}",
    "/v1/dreamina/images/upscale",
}


@schema.parametrize()
def test_every_operation_answers_as_its_schema_says(case: Case, served: Server) -> None:
    excluded = EXCLUDED
    if case.operation.path in SHARED_PATHS:
        excluded = [*EXCLUDED, allow_header_conformance]
    authorize(case, served)
    case.call_and_validate(
        base_url=served.url,
        additional_checks=[errors_are_error_objects],
        excluded_checks=excluded,
    )


def authorize(case: Case, served: Server) -> None:
    """The server's token in the case's own headers, unless the case was made to break them (a
    missing or malformed Authorization must be refused: sent as generated). A token added on top
    of a case whose headers were negated would make it a valid request that the negative-data
    check still judges by the headers the case holds (one such case, with an unknown query
    parameter too, was answered 200 and failed the check)."""
    meta = case.meta
    header = None if meta is None else meta.components.get(ParameterLocation.HEADER)
    if header is None or not header.mode.is_negative:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {served.token}"}


def test_job_flows_that_follow_the_documents_links(served: Server) -> None:
    """Sequences of calls along the document's links (create a job, then get, cancel, upscale
    it or list and redeliver its webhooks; create an account, then get or delete it), each
    answer checked as above."""
    auth = {"Authorization": f"Bearer {served.token}"}
    answered: set[tuple[str, str, int]] = set()
    failures: list[str] = []  # what failed, as it happened

    class Flows(flows_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"base_url": served.url, "headers": auth}

        def before_call(self, case: Case) -> None:
            # The flows start from resources that exist: a job or an account the contract
            # accepts (the stateless test above sends these operations every kind of body).
            # Generated bodies were mostly 400s by rules the schemas cannot say (a catalogue
            # model, a prompt, an asset that exists), and whether a run made any job at all
            # changed with the document. A 1024x1024 image: seedream's default 2048x2048 (and its
            # upscales) took the server's CPU from the flows' requests.
            if case.operation.path == "/v1/dreamina/images":
                case.body = {"prompt": "a lighthouse at dusk", "model": "nano-banana", "count": 1}
            if case.operation.path == "/v1/dreamina/accounts":
                case.body = {"account": "LOCAL:flows", "engine": "procedural", "maxJobs": 2}

        def step(self, input: Any) -> Any:
            try:
                return super().step(input)
            except Exception as failure:
                failures.append(f"{type(failure).__name__}: {failure}")
                raise

        def after_call(self, response: Response, case: Case) -> None:
            answered.add((case.method, case.operation.path, response.status_code))

        def validate_response(
            self, response: Response, case: Case, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            excluded = EXCLUDED
            if case.operation.path in SHARED_PATHS:
                excluded = [*EXCLUDED, allow_header_conformance]
            try:
                case.validate_response(
                    response,
                    additional_checks=[errors_are_error_objects],
                    excluded_checks=excluded,
                    transport_kwargs=kwargs,
                )
            except Exception as failure:
                # Kept: the flows run against a live server, so Hypothesis's replay of a failing
                # sequence can meet another state and end in FlakyStrategyDefinition, losing
                # the failure itself; the test then reports this one.
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code} "
                    f"{response.text[:300]!r}: {failure}"
                )
                raise

    try:
        run_flows(Flows)
    except FlakyStrategyDefinition:
        if not failures:
            raise
        raise AssertionError(
            "a flow failed (its replay met another state):\n" + failures[0]
        ) from None
    # The flows reached real jobs: created, then read along a link.
    assert ("POST", "/v1/dreamina/images", 200) in answered, sorted(answered)
    assert ("GET", "/v1/dreamina/images/{jobid}", 200) in answered, sorted(answered)
    assert ("POST", "/v1/dreamina/accounts", 200) in answered, sorted(answered)


def run_flows(machine: Any) -> None:
    machine.run(
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
