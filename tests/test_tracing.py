"""Tracing of optimizerd itself: a real daemon exporting its spans over OTLP/HTTP to a receiver in
this process, and the same daemon with tracing off exporting nothing and importing nothing of
OpenTelemetry.

The receiver decodes each ``ExportTraceServiceRequest`` into flat span records; the tests then
follow trace ids and parent ids across the services' processes (REST or gRPC -> storage, REST ->
supervisor -> processor, collector -> storage, processor -> storage).
"""
from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from ipc.config_loader import ConfigError, config_from_document
from protos.llm_optimizer.v1 import config_pb2, config_pb2_grpc
from tests.conftest import PROBE, Daemon, free_port, stays_true, wait_until

T0 = 1_795_600_800
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60, "checkpoint_interval_s": 0.2}
SERVICES = ["storage", "collector", "processor", "rest_api", "grpc_api"]
# Spans leave a worker 100 ms after they end rather than 5 s (the SDK's default batch delay).
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP traces endpoint on a free port, served from a thread of its own."""

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{free_port()}/v1/traces"
        self.spans: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the OTLP receiver did not start"

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self.export)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        port = int(self.url.split(":")[2].split("/")[0])
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    async def export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        found = []
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                found += [{"service": resource["service.name"], "resource": resource,
                           "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                           "parent": span.parent_span_id.hex(), "name": span.name,
                           "kind": span.kind, "status": span.status.code,
                           "attributes": {a.key: _value(a.value) for a in span.attributes}}
                          for span in scope_spans.spans]
        with self.lock:
            self.spans += found
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def find(self, **match: Any) -> list[dict[str, Any]]:
        """Spans whose fields (``attributes`` compared key by key) equal ``match``."""
        attributes = match.pop("attributes", {})
        with self.lock:
            spans = list(self.spans)
        return [s for s in spans if all(s[k] == v for k, v in match.items())
                and all(s["attributes"].get(k) == v for k, v in attributes.items())]

    def wait(self, timeout: float = 15.0, **match: Any) -> list[dict[str, Any]]:
        return wait_until(lambda: self.find(**dict(match)), timeout,
                          message=lambda: f"no span {match}; got {self.summary()}")

    def summary(self) -> str:
        with self.lock:
            return json.dumps([(s["service"], s["name"], s["trace_id"][:8])
                               for s in self.spans][-60:])

    def ancestors(self, span: dict[str, Any]) -> list[dict[str, Any]]:
        """The span's parent, grandparent, ... as far as they were exported."""
        by_id = {s["span_id"]: s for s in self.find(trace_id=span["trace_id"])}
        chain = []
        while span["parent"] in by_id:
            span = by_id[span["parent"]]
            chain.append(span)
        return chain

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def new_trace() -> tuple[str, str, str]:
    """(trace id, span id, traceparent) of a sampled client span."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def create_key(daemon: Daemon, role: str) -> str:
    result = daemon.ctl("api-key", "create", "--role", role)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, headers={
        "Content-Type": "application/json", **(headers or {})},
        data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def events(service: str, count: int, start: float, spacing_s: float) -> list[dict[str, Any]]:
    return [{"event_id": f"{service}-{i}", "time": start + i * spacing_s, "service": service,
             "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 100,
             "latency_ms": 400.0 + i % 7, "quality": 0.8} for i in range(count)]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def traced(receiver):
    d = Daemon(builtins=SERVICES, env=FAST_EXPORT, extra={"processor": dict(PROCESSOR)})
    headers = Path(d.dir) / "otlp.headers"
    headers.write_text("# sent with every export\nX-Test-Token: sesame\n")
    d.doc["observability"] = {"otlp_endpoint": receiver.url,
                              "otlp_headers_file": str(headers)}
    d.write_config()
    try:
        d.start(timeout=60)
        d.rest_base = f"http://{d.doc['rest_api']['listen']}"
        d.collector = f"http://{d.doc['collector']['listen']}/v1/events"
        d.key = create_key(d, "admin")
        yield d
    finally:
        d.cleanup()


def test_rest_request_continues_the_client_trace_into_storage_and_the_processor(
        traced, receiver):
    trace_id, client_span, header = new_trace()
    status, _ = http("PUT", f"{traced.rest_base}/v1/config/trace-svc",
                     {"expected_version": 0, "config": {"model": "gpt-4o"}},
                     {"Authorization": f"Bearer {traced.key}", "traceparent": header})
    assert status < 300
    [rest] = receiver.wait(trace_id=trace_id, service="optimizerd.rest_api")
    assert rest["parent"] == client_span and rest["kind"] == 2  # SERVER
    assert rest["name"] == "PUT /v1/config/{service}"
    assert rest["attributes"]["http.request.method"] == "PUT"
    assert rest["attributes"]["http.route"] == "/v1/config/{service}"
    assert rest["attributes"]["http.response.status_code"] == status
    assert rest["resource"]["service.instance.id"].endswith("/rest_api#0")
    # The context crossed storage.sock: the config's new version is a span of the storage
    # process, below the REST span.
    [put] = receiver.wait(trace_id=trace_id, service="optimizerd.storage",
                          name="storage.doc_put", attributes={"storage.ns": "configs"})
    assert rest in receiver.ancestors(put)
    assert put["attributes"]["storage.op"] == "doc_put"
    assert put["attributes"]["storage.write_group"] >= 1
    # ... and control.sock: the API asked the processor for its rollouts, via the supervisor.
    [admin] = receiver.wait(trace_id=trace_id, service="optimizerd.processor",
                            name="admin rollouts")
    assert admin["parent"] == rest["span_id"]
    assert admin["attributes"] == {"admin.service": "processor", "admin.command": "rollouts"}
    assert any(h.get("x-test-token") == "sesame" for h in receiver.headers)


def test_grpc_call_continues_the_client_trace(traced, receiver):
    trace_id, client_span, header = new_trace()
    with grpc.insecure_channel(traced.doc["grpc_api"]["listen"]) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        metadata = (("authorization", f"Bearer {traced.key}"), ("traceparent", header))
        stub.ListConfigs(config_pb2.ListConfigsRequest(), metadata=metadata, timeout=10)
        missing_trace, _, missing_header = new_trace()
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetConfig(config_pb2.GetConfigRequest(service="no-such-svc"), timeout=10,
                           metadata=(metadata[0], ("traceparent", missing_header)))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    [call] = receiver.wait(trace_id=trace_id, service="optimizerd.grpc_api")
    assert call["parent"] == client_span and call["kind"] == 2
    assert call["name"] == "llm_optimizer.v1.ConfigService/ListConfigs"
    assert call["attributes"] == {"rpc.system": "grpc",
                                  "rpc.service": "llm_optimizer.v1.ConfigService",
                                  "rpc.method": "ListConfigs", "rpc.grpc.status_code": 0}
    listed = receiver.wait(trace_id=trace_id, service="optimizerd.storage",
                           name="storage.doc_list")
    assert all(call in receiver.ancestors(s) for s in listed)
    # A caller's mistake is noted on the span but does not fail it (only server faults do).
    [failed] = receiver.wait(trace_id=missing_trace, service="optimizerd.grpc_api")
    assert failed["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed["status"] == 0  # unset


def test_ingest_batch_and_processor_steps_are_traced_down_to_storage(traced, receiver):
    batch = events("trace-ingest", 240, T0, 1.0)  # 4 minutes of event time: analyses are due
    status, answer = http("POST", traced.collector, {"events": batch})
    assert status == 200 and answer["accepted"] == len(batch)
    [ingest] = receiver.wait(service="optimizerd.collector", name="collector.ingest",
                             attributes={"ingest.events": len(batch)})
    assert ingest["attributes"]["ingest.source"] == "json"
    [append] = receiver.wait(trace_id=ingest["trace_id"], service="optimizerd.storage",
                             name="storage.log_append")
    assert append["parent"] == ingest["span_id"]
    assert append["attributes"]["storage.log"] == traced.doc.get("event_log", {}).get(
        "log", "llm-events")

    steps = receiver.wait(service="optimizerd.processor", name="processor.step")
    assert sum(s["attributes"]["processor.records"] for s in steps) >= 1
    step_ids = {s["span_id"] for s in steps}
    analysis = receiver.wait(service="optimizerd.processor", name="processor.analysis")
    assert all(a["parent"] in step_ids for a in analysis)
    assert all("processor.findings" in a["attributes"] for a in analysis)

    def checkpointed() -> list[dict[str, Any]]:
        return [c for c in receiver.find(service="optimizerd.processor",
                                         name="processor.checkpoint")
                if c["parent"] in {s["span_id"] for s in receiver.find(name="processor.step")}]
    [checkpoint, *_] = wait_until(checkpointed, 15, message=receiver.summary)
    assert checkpoint["attributes"]["processor.checkpoint_bytes"] > 0
    # The checkpoint's storage requests are its children in the storage process.
    children = receiver.wait(trace_id=checkpoint["trace_id"], service="optimizerd.storage",
                             parent=checkpoint["span_id"])
    assert {c["name"] for c in children} & {"storage.put", "storage.batch", "storage.doc_put",
                                            "storage.log_commit"}


# --- tracing off ---------------------------------------------------------------------------------

def test_tracing_off_exports_nothing_and_imports_nothing_of_opentelemetry(make_daemon):
    idle = Receiver()
    try:
        # The SDK's own environment pointing at the receiver must not turn tracing on.
        d = make_daemon(builtins=SERVICES, services={"probe": {"entrypoint": PROBE}},
                        env={**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": idle.url[:-10],
                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": idle.url},
                        extra={"processor": dict(PROCESSOR)}).start(timeout=60)
        key = create_key(d, "admin")
        _, _, header = new_trace()
        status, _ = http("PUT", f"http://{d.doc['rest_api']['listen']}/v1/config/off-svc",
                         {"expected_version": 0, "config": {"model": "gpt-4o"}},
                         {"Authorization": f"Bearer {key}", "traceparent": header})
        assert status < 300
        batch = events("off-ingest", 240, T0, 1.0)
        status, _ = http("POST", f"http://{d.doc['collector']['listen']}/v1/events",
                         {"events": batch})
        assert status == 200

        def processor_read_it() -> bool:
            reply = d.request("call", {"service": "processor", "command": "info"})
            return reply.ok and reply.result["status"].get("positions", {}).get(0) == len(batch)
        wait_until(processor_read_it, 30, message="the processor did not read the batch")
        reply = d.request("call", {"service": "probe", "command": "modules",
                                   "args": {"prefix": "opentelemetry"}})
        assert reply.ok, reply.error
        # A worker on the shared runtime (forked from the same preloaded fork server as the
        # built-in services) has imported nothing of OpenTelemetry.
        assert reply.result == [], reply.result
        stays_true(lambda: not idle.spans, 1.5, message=lambda: idle.summary())
    finally:
        idle.close()


def test_tracing_off_adds_no_import_to_the_services_code():
    """Every service's modules imported, then tracing set up off and its helpers used: nothing
    more is imported, and nothing of the tracing SDK or exporter at all. (redis-py 8 imports
    OpenTelemetry's metrics SDK by itself when that is installed; that is not tracing's doing.)"""
    script = """
import sys
from ipc import storage as s
from ipc.config import Config
import workers.collector, workers.grpc_api, workers.integrations, workers.processor.worker
import workers.rest_api.endpoints.server, workers.storage, workers.runtime
from workers import tracing
before = set(sys.modules)
tracing.setup(Config(), "rest_api", 0)
with tracing.span("x", {"a": 1}) as span:
    span.set_attribute("b", 2)
    s.encode(s.StorageRequest(id=1, op=s.Stats(), trace=tracing.traceparent()))
with tracing.server_span("y", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}):
    pass
tracing.shutdown()
print(sorted(set(sys.modules) - before))
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace",
      "opentelemetry.exporter", "opentelemetry.trace.propagation.tracecontext"))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]"]


def test_tracing_needs_its_packages_named_by_the_key(monkeypatch):
    import ipc.config_loader as loader
    monkeypatch.setattr(loader, "TRACING_MODULES", {"opentelemetry.not_installed": "otel-x"})
    with pytest.raises(ConfigError) as refused:
        config_from_document({"observability": {"otlp_endpoint": "http://h:4318/v1/traces"}},
                             environ={})
    assert refused.value.key == "observability.otlp_endpoint" and "otel-x" in str(refused.value)
    assert config_from_document({}, environ={}).observability.otlp_endpoint == ""
