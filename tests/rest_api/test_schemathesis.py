"""Property-based check of the REST API against its own OpenAPI document, with schemathesis.

A daemon with storage, collector, processor and the REST API serves ``/openapi.json``;
schemathesis loads that live document and, for every operation, sends generated requests
(valid and invalid ones) with an admin API key, then checks each answer: never a 5xx, only
documented status codes, and the declared content type and schema.

Bounded and deterministic: ``MAX_EXAMPLES`` per operation, a derandomized Hypothesis run, no
example database. ``pytest tests/rest_api/test_schemathesis.py`` runs it (~1 min).
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.conftest import Daemon

if os.environ.get("CI") == "true":  # nothing is skipped in CI: a missing extra fails
    import schemathesis
else:
    schemathesis = pytest.importorskip("schemathesis")  # a `test` extra
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.timeout(240)

MAX_EXAMPLES = 15
STREAM = "/v1/events/stream"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60,
             "decisions": {"min_samples": 50}}


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(builtins=["storage", "collector", "processor", "rest_api", "integrations"],
               extra={"processor": dict(PROCESSOR)})
    # generated requests come fast: the rate limit (429, documented) must not hide the rest
    d.doc["rest_api"].update({"rate_limit_per_s": 100_000.0, "rate_limit_burst": 100_000})
    d.write_config()
    try:
        d.start(timeout=60)
        result = d.ctl("api-key", "create", "--role", "admin", "--name", "schemathesis")
        assert result.returncode == 0, result.stderr
        d.admin_key = result.stdout.strip().splitlines()[-1]
        d.base = f"http://{d.doc['rest_api']['listen']}"
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def api_schema(daemon):
    schema = schemathesis.openapi.from_url(f"{daemon.base}/openapi.json", timeout=10)
    schema.config.generation.update(deterministic=True, max_examples=MAX_EXAMPLES,
                                    database="none")
    return schema


# The event stream never ends (it answers 200 then keeps the connection open), so a
# request/response check cannot read its answer; tests/rest_api/test_sse.py and
# test_endpoints.py cover its statuses (200, 400, 401, 422).
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path=STREAM)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, daemon):
    case.call_and_validate(headers={"Authorization": f"Bearer {daemon.admin_key}"},
                           checks=CHECKS, timeout=15)


def test_the_checked_document_is_the_live_one(daemon, api_schema):
    """The document the run above checks is the live one, with every operation."""
    paths = {op.ok().path for op in api_schema.get_all_operations()}
    assert {"/v1/config/{service}", "/v1/optimizations", STREAM} <= paths
