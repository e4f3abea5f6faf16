"""Schema-driven fuzzing of the real server: schemathesis reads GET /openapi.json (the request
bodies and limits written out in lorakit/server/openapi.py) and sends what it generates from it,
valid and invalid, over loopback HTTP to the tiny-model server.

Every answer must be below 500; every 4xx must be JSON in OpenAI's error shape with a one-line
message; every event stream must end with ``data: [DONE]``. max_tokens is capped by the schema
at the server's limit (16 on the tiny server), so a generating case takes milliseconds.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from server_setup import API_KEY, REPORT

AUTH = {"Authorization": f"Bearer {API_KEY}"}
COUNTS: dict[str, Counter] = {}
SLOWEST: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("no_server_errors")


def openai_error_shape(ctx, response, case):
    """A 4xx is JSON {"error": {"message", "type", "param", "code"}} with a one-line message."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), f"{response.status_code} answered as {content_type!r}"
    body = json.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message, body
    return None


def complete_streams(ctx, response, case):
    """A 200 event stream ends with the [DONE] event (no stream is cut short)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code == 200 and content_type.startswith("text/event-stream") and not response.stream_cut_short:
        assert response.content.rstrip().endswith(b"data: [DONE]"), response.content[-200:]
    return None


def _load(url: str, phases: list[str]):
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {"phases": {phase: {"enabled": phase in phases} for phase in ["examples", "coverage", "fuzzing", "stateful"]}})
    return schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH, config=config)


@pytest.fixture(scope="module")
def fast_schema(tiny_server):
    return _load(tiny_server.url, ["examples", "fuzzing"])


@pytest.fixture(scope="module")
def long_schema(tiny_server):
    return _load(tiny_server.url, ["examples", "coverage", "fuzzing"])  # coverage: every boundary the schema names


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    # schemathesis 4.32's lazy schema reads Function._nodeid, which pytest 9 no longer has
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _run(case, tier: str) -> None:
    counts = COUNTS.setdefault(tier, Counter())
    if not counts:
        counts["start"] = time.monotonic()
    start = time.monotonic()
    response = case.call(headers=AUTH, timeout=60)
    counts["end"] = time.monotonic()
    counts["cases"] += 1
    counts[f"{response.status_code // 100}xx"] += 1
    SLOWEST[tier] = max(SLOWEST.get(tier, 0.0), counts["end"] - start)
    case.validate_response(response, checks=[not_a_server_error, openai_error_shape, complete_streams], headers=AUTH)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for tier, counts in COUNTS.items():
        seconds = counts.pop("end", 0) - counts.pop("start", 0)
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "cases")
        REPORT.append(f"schemathesis ({tier}): {counts['cases']} cases in {seconds:.1f} s ({statuses}); "
                      f"slowest case {SLOWEST[tier]:.2f} s")


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@schemathesis.pytest.from_fixture("fast_schema").parametrize()
def test_no_server_errors_for_generated_requests(case):
    """About 150-200 cases over the 6 operations: the schema's examples and up to 40 fuzzed each."""
    _run(case, "fast")


@pytest.mark.long
@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@schemathesis.pytest.from_fixture("long_schema").parametrize()
def test_no_server_errors_for_generated_requests_long(case):
    """Thousands of cases: every coverage case (boundaries, wrong types, missing fields) and up to
    1,500 fuzzed per operation."""
    _run(case, "long")
