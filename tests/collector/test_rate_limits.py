"""Per-client rate limits on the push ingest paths: 429 / RESOURCE_EXHAUSTED with the wait,
budgets per API key (or peer address), nothing acknowledged from a refused request."""
from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from ipc.config import CollectorSection
from ipc.events import decode_event
from tests.collector.in_flight import EVENT
from tests.collector.test_json_ingest import read_log
from tests.collector.test_otlp import SEMCONV_136, encode_spans, make_spans, post
from tests.conftest import http_get
from workers.collector.admission import ClientLimits, OverBudget

BURST = 10  # at 1 event/s: a test's few seconds refill a few tokens at most


def events(prefix: str, count: int) -> bytes:
    return json.dumps({"events": [dict(EVENT, event_id=f"{prefix}-{i}")
                                  for i in range(count)]}).encode()


def test_clients_are_told_apart_by_key_header_kept_only_as_a_digest():
    limits = ClientLimits.from_section(CollectorSection(rate_limit_events_per_s=1.0,
                                                        rate_limit_burst=BURST))
    secret = "sk-live-0123456789"
    alice = limits.client_of({"x-api-key": secret}, "10.0.0.1")
    assert secret not in alice and alice == limits.client_of({"x-api-key": secret}, "10.0.0.9")
    assert limits.client_of({}, "10.0.0.1") == "peer:10.0.0.1"
    limits.admit("json", alice, BURST)
    with pytest.raises(OverBudget) as refused:
        limits.admit("json", alice, 1)
    assert 0 < refused.value.retry_after <= 1.0
    limits.admit("json", limits.client_of({"x-api-key": "other"}, None), 3 * BURST)  # a debt
    assert ClientLimits.from_section(CollectorSection()) is None  # off by default


def test_over_budget_clients_get_429_or_resource_exhausted_and_others_go_on(make_daemon):
    d = make_daemon(builtins=["storage", "collector"], extra={"collector": {
        "rate_limit_events_per_s": 1.0, "rate_limit_burst": BURST}}).start()
    base = f"http://{d.doc['collector']['listen']}"
    alice, bob = {"X-API-Key": "alice-key"}, {"X-API-Key": "bob-key"}

    code, _, _ = post(base + "/v1/events", events("a", BURST), "application/json", **alice)
    assert code == 200
    code, headers, body = post(base + "/v1/events", events("a2", 5), "application/json", **alice)
    problem = json.loads(body)
    assert code == 429 and int(headers["Retry-After"]) >= 1, problem
    assert problem["status"] == 429 and "rate limit" in problem["detail"]
    code, _, _ = post(base + "/v1/events", events("b", BURST), "application/json", **bob)
    assert code == 200

    spans = encode_spans(make_spans([("chat", SEMCONV_136, 0.1)] * 3))
    code, headers, _ = post(base + "/v1/traces", spans, "application/x-protobuf", **alice)
    assert code == 429 and int(headers["Retry-After"]) >= 1
    with grpc.insecure_channel(d.doc["collector"]["otlp_grpc_listen"]) as channel:
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Export(ExportTraceServiceRequest.FromString(spans), timeout=10,
                        metadata=(("x-api-key", "bob-key"),))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = dict(caught.value.trailing_metadata())["grpc-status-details-bin"]
        retry = error_details_pb2.RetryInfo()
        assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
        stub.Export(ExportTraceServiceRequest.FromString(spans), timeout=10,
                    metadata=(("x-api-key", "carol-key"),))  # a fresh budget

    stored = {decode_event(p).event_id for p in read_log(d.runtime, "llm-events")}
    assert {e for e in stored if e.startswith(("a-", "a2-", "b-"))} == \
        {f"a-{i}" for i in range(BURST)} | {f"b-{i}" for i in range(BURST)}
    assert len(stored) == 2 * BURST + 3
    code, metrics = http_get(f"http://{d.doc['admin']['listen']}/metrics")
    assert code == 200
    text = metrics.decode()
    assert 'collector_rate_limited_total{source="json"} 5.0' in text
    assert 'collector_rate_limited_total{source="otlp_http"} 3.0' in text
    assert 'collector_rate_limited_total{source="otlp_grpc"} 3.0' in text
