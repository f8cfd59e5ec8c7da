"""OTLP ingest end to end: spans exported by the real OpenTelemetry SDK (HTTP protobuf and gRPC)
to optimizerd's collector, events read back from the log."""
from __future__ import annotations

import base64
import gzip
import json
import time
import urllib.error
import urllib.request

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from ipc import storage as s
from ipc.events import decode_event
from tests.collector.in_flight import STORAGE_NOT_RESTARTED, events_held_in_flight
from tests.conftest import http_get, wait_until
from workers.storage_client import SyncStorageClient

# The three naming styles found in the wild.
SEMCONV_136 = {"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
               "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o",
               "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300}
SEMCONV_137 = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
               "gen_ai.request.model": "claude-sonnet-4", "gen_ai.usage.input_tokens": 2000,
               "gen_ai.usage.output_tokens": 100, "gen_ai.usage.cache_read.input_tokens": 500}
OPENLLMETRY = {"llm.request.type": "chat", "gen_ai.system": "OpenAI",
               "gen_ai.request.model": "gpt-4o-mini",
               "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
               "gen_ai.usage.prompt_tokens": 70, "gen_ai.usage.completion_tokens": 30,
               "llm.usage.total_tokens": 100}
OPENLIT = {"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
           "gen_ai.request.model": "my-finetune", "gen_ai.usage.input_tokens": 10,
           "gen_ai.usage.output_tokens": 5, "gen_ai.usage.total_tokens": 15,
           "gen_ai.usage.cost": 0.0123}


@pytest.fixture
def collector(make_daemon):
    d = make_daemon(builtins=["storage", "collector"]).start()
    d.url = f"http://{d.doc['collector']['listen']}"
    d.grpc = d.doc["collector"]["otlp_grpc_listen"]
    return d


def read_log(runtime: str, log: str) -> list[bytes]:
    client = SyncStorageClient(runtime)
    try:
        return [r.payload for r in client.call(s.LogRead(log=log, offset=0,
                                                         max_records=10_000)).records]
    finally:
        client.close()


def events(collector) -> dict:
    return {e.event_id: e for e in map(decode_event, read_log(collector.runtime, "llm-events"))}


def make_spans(specs: list[tuple[str, dict, float]], service: str = "support-bot") -> list:
    """Finished SDK spans (name, attributes, duration in seconds), made by the real SDK."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    now = time.time_ns()
    for name, attrs, seconds in specs:
        span = tracer.start_span(name, start_time=now - int(seconds * 1e9),
                                 attributes=attrs)
        if attrs.get("error.type"):
            span.set_status(Status(StatusCode.ERROR))
        if "quality" in name:
            span.add_event("gen_ai.evaluation.result",
                           {"gen_ai.evaluation.name": "relevance",
                            "gen_ai.evaluation.score.value": 0.75})
            span.add_event("gen_ai.evaluation.result",
                           {"gen_ai.evaluation.name": "correctness",
                            "gen_ai.evaluation.score.value": 0.25})
            span.add_event("gen_ai.evaluation.result",  # no known scale: ignored
                           {"gen_ai.evaluation.name": "stars",
                            "gen_ai.evaluation.score.value": 4.0})
        span.end(end_time=now)
    provider.shutdown()
    return list(memory.get_finished_spans())


def event_id(span) -> str:
    return f"{span.context.trace_id:032x}-{span.context.span_id:016x}"


def post(url: str, body: bytes, content_type: str, **headers: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_sdk_http_export_in_every_naming_style(collector):
    spans = make_spans([("chat gpt-4o", SEMCONV_136, 0.85),
                        ("chat claude", SEMCONV_137, 1.5),
                        ("openai.chat", OPENLLMETRY, 0.25),
                        ("openlit chat", OPENLIT, 0.1),
                        ("chat quality", dict(SEMCONV_136, **{"error.type": "rate_limit"}), 2),
                        ("GET /health", {"http.request.method": "GET"}, 0.01),
                        ("execute_tool", {"gen_ai.operation.name": "execute_tool",
                                          "gen_ai.request.model": "gpt-4o"}, 0.3)])
    exporter = HttpSpanExporter(endpoint=collector.url + "/v1/traces")
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    exporter.shutdown()

    stored = events(collector)
    assert set(stored) == {event_id(sp) for sp in spans[:5]}   # the last two are ignored
    e136, e137, ellm, elit, eq = (stored[event_id(sp)] for sp in spans[:5])
    assert (e136.service, e136.model, e136.provider, e136.operation) == (
        "support-bot", "gpt-4o", "openai", "chat")
    assert (e136.input_tokens, e136.output_tokens) == (1200, 300)
    assert e136.latency_ms == pytest.approx(850, abs=0.01)
    assert e136.time_ns == spans[0].start_time
    assert e136.cost_usd == pytest.approx(1200 * 2.5e-6 + 300 * 1e-5)  # shipped price table
    assert e136.price_version and e136.status == "ok"
    assert (e137.provider, e137.model, e137.input_tokens, e137.output_tokens,
            e137.cached_input_tokens) == ("anthropic", "claude-sonnet-4", 2000, 100, 500)
    assert e137.latency_ms == pytest.approx(1500, abs=0.01)
    assert (ellm.model, ellm.provider, ellm.input_tokens, ellm.output_tokens) == (
        "gpt-4o-mini-2024-07-18", "OpenAI", 70, 30)
    assert ellm.tags == {"request_model": "gpt-4o-mini"}
    assert ellm.cost_usd is not None and ellm.cost_usd > 0
    assert (elit.model, elit.cost_usd, elit.price_version) == ("my-finetune", 0.0123, None)
    assert (eq.status, eq.error_type) == ("error", "rate_limit")
    assert eq.quality == pytest.approx(0.5)   # mean of the scores in 0..1

    # A re-sent export carries the same ids: the same event_ids, for downstream dedup.
    exporter = HttpSpanExporter(endpoint=collector.url + "/v1/traces",
                                compression=Compression.Gzip)
    assert exporter.export(spans[:1]) == SpanExportResult.SUCCESS
    exporter.shutdown()
    records = [decode_event(p) for p in read_log(collector.runtime, "llm-events")]
    assert [r.event_id for r in records].count(event_id(spans[0])) == 2

    def metrics() -> str:
        return http_get(collector.admin_url("/metrics"))[1].decode()

    wait_until(lambda: 'collector_events_accepted_total{source="otlp_http"} 6.0' in metrics(),
               10)
    assert 'collector_otlp_spans_ignored_total{source="otlp_http"} 2.0' in metrics()


def test_sdk_grpc_export(collector):
    spans = make_spans([("chat", SEMCONV_137, 0.5), ("chat", OPENLLMETRY, 0.2),
                        ("db query", {"db.system": "postgresql"}, 0.01)], service="grpc-svc")
    exporter = GrpcSpanExporter(endpoint=collector.grpc, insecure=True)
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    exporter.shutdown()
    stored = events(collector)
    assert set(stored) == {event_id(spans[0]), event_id(spans[1])}
    first = stored[event_id(spans[0])]
    assert (first.service, first.model, first.provider, first.input_tokens) == (
        "grpc-svc", "claude-sonnet-4", "anthropic", 2000)
    assert first.latency_ms == pytest.approx(500, abs=0.01)
    assert stored[event_id(spans[1])].cost_usd > 0

    # Invalid gen_ai spans: partial_success, and the dead-letter log.
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
    bad = make_spans([("chat", dict(SEMCONV_136, **{"gen_ai.usage.output_tokens": -3}), 0.1)])
    request = ExportTraceServiceRequest.FromString(encode_spans(bad))
    with grpc.insecure_channel(collector.grpc) as channel:
        answer = trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)
    assert answer.partial_success.rejected_spans == 1
    assert "output_tokens" in answer.partial_success.error_message
    dead = [json.loads(p) for p in read_log(collector.runtime, "collector.dead-letters")]
    assert [(d["source"], d["path"]) for d in dead] == [
        ("otlp_grpc", "resourceSpans[0].scopeSpans[0].spans[0].output_tokens")]


def encode_spans(spans) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
        encode_spans as enc,
    )
    return enc(spans).SerializeToString()


def to_otlp_json(spans) -> dict:
    """OTLP/JSON as the spec writes it: camelCase, ids in hex."""
    doc = json_format.MessageToDict(ExportTraceServiceRequest.FromString(encode_spans(spans)))
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return doc


def test_otlp_json_and_gzip_bodies(collector):
    spans = make_spans([("chat", SEMCONV_136, 0.3), ("chat", SEMCONV_137, 0.4),
                        ("other", {"rpc.system": "grpc"}, 0.1)])
    body = json.dumps(to_otlp_json(spans[:2])).encode()
    code, headers, answer = post(collector.url + "/v1/traces", body, "application/json")
    assert code == 200, answer
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(answer) == {}   # full success: an empty ExportTraceServiceResponse
    body = gzip.compress(json.dumps(to_otlp_json(spans[2:])).encode())
    code, _, answer = post(collector.url + "/v1/traces", body, "application/json",
                           **{"Content-Encoding": "gzip"})
    assert code == 200 and json.loads(answer) == {}
    # gzipped protobuf, with an unknown JSON-only detail absent: same mapping
    again = make_spans([("chat", OPENLIT, 0.2)])
    code, headers, answer = post(collector.url + "/v1/traces",
                                 gzip.compress(encode_spans(again)), "application/x-protobuf",
                                 **{"Content-Encoding": "gzip"})
    assert code == 200 and headers["Content-Type"] == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(answer).HasField("partial_success")
    assert set(events(collector)) == {event_id(spans[0]), event_id(spans[1]),
                                      event_id(again[0])}


def test_partial_success_for_invalid_gen_ai_spans(collector):
    good = make_spans([("chat", SEMCONV_136, 0.2)])
    no_model = make_spans([("chat", {"gen_ai.operation.name": "chat",
                                     "gen_ai.usage.input_tokens": 5}, 0.2)])
    negative = make_spans([("chat", dict(SEMCONV_136, **{"gen_ai.usage.input_tokens": -1}),
                            0.2)])
    body = encode_spans(good + no_model + negative)
    code, _, answer = post(collector.url + "/v1/traces", body, "application/x-protobuf")
    assert code == 200
    partial = ExportTraceServiceResponse.FromString(answer).partial_success
    assert partial.rejected_spans == 2
    assert "model" in partial.error_message
    # JSON request: JSON answer
    code, _, answer = post(collector.url + "/v1/traces",
                           json.dumps(to_otlp_json(negative)).encode(), "application/json")
    assert code == 200
    partial = json.loads(answer)["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 1 and "input_tokens" in partial["errorMessage"]

    assert set(events(collector)) == {event_id(good[0])}
    dead = [json.loads(p) for p in read_log(collector.runtime, "collector.dead-letters")]
    assert [(d["source"], d["path"].rsplit(".", 1)[1], d["original"]["span_id"])
            for d in dead] == [
        ("otlp_http", "model", f"{no_model[0].context.span_id:016x}"),
        ("otlp_http", "input_tokens", f"{negative[0].context.span_id:016x}"),
        ("otlp_http", "input_tokens", f"{negative[0].context.span_id:016x}")]
    metrics = http_get(collector.admin_url("/metrics"))[1].decode()
    assert 'collector_events_rejected_total{reason="input_tokens",source="otlp_http"} 2.0' \
        in metrics


@pytest.mark.parametrize("body, content_type, encoding, status", [
    (b"\xff\xff\xff\xff", "application/x-protobuf", None, 400),
    (b"{not json", "application/json", None, 400),
    (b'{"resourceSpans": 5}', "application/json", None, 400),
    (b"\x0a\x00", "text/plain", None, 415),
    (b"not gzip at all", "application/x-protobuf", "gzip", 400),
    (gzip.compress(b"\0" * (17 << 20)), "application/x-protobuf", "gzip", 413),
])
def test_bad_bodies_get_problem_details(collector, body, content_type, encoding, status):
    headers = {"Content-Encoding": encoding} if encoding else {}
    code, answer_headers, answer = post(collector.url + "/v1/traces", body, content_type,
                                        **headers)
    assert code == status, answer
    assert answer_headers["Content-Type"].startswith("application/problem+json")
    assert json.loads(answer)["status"] == status
    assert collector.services()["collector"]["restarts"] == 0


def test_overloaded_collector_asks_exporters_to_retry(make_daemon):
    import grpc
    from google.rpc import error_details_pb2, status_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
    d = make_daemon(builtins=["storage", "collector"],
                    extra={"collector": {"max_in_flight": 2},
                           "storage": STORAGE_NOT_RESTARTED}).start()
    spans = make_spans([("chat", SEMCONV_136, 0.1), ("chat", SEMCONV_137, 0.1)])
    body = encode_spans(spans)   # two events: no room while another one is in flight
    with events_held_in_flight(d, 1):
        code, headers, _ = post(f"http://{d.doc['collector']['listen']}/v1/traces", body,
                                "application/x-protobuf")
        assert code == 503 and int(headers["Retry-After"]) >= 1
        with grpc.insecure_channel(d.doc["collector"]["otlp_grpc_listen"]) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Export(ExportTraceServiceRequest.FromString(body), timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    retry = error_details_pb2.RetryInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
    assert retry.retry_delay.seconds >= 1
    assert [decode_event(p).event_id for p in read_log(d.runtime, "llm-events")] == ["held-0"]
