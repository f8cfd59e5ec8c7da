"""OTLP traces -> LLMEvents: pure functions that both OTLP paths (HTTP and gRPC) share.

``decode_protobuf``/``decode_json`` turn a body into an ``ExportTraceServiceRequest`` (OTLP/JSON
goes through ``google.protobuf.json_format`` after its hex trace and span ids are rewritten to
the base64 that the protobuf JSON mapping expects), and ``map_request`` turns that message into
events, rejections and a count of ignored spans. One mapping serves every encoding.

Which spans become events
    A span is an LLM call when it names a model (``gen_ai.request.model``,
    ``gen_ai.response.model``), reports token usage (any attribute listed below) or has a
    ``gen_ai.operation.name`` / ``llm.request.type`` of an inference operation (chat,
    text_completion, completion, generate_content, embeddings, embedding). Spans of agent and
    tool operations (invoke_agent, create_agent, execute_tool, invoke_workflow) are ignored
    even when they carry a model or usage: their usage aggregates their child calls', which
    are events of their own. Every other span is ignored and counted.

Attributes accepted (first one present wins), across semconv <= 1.36, >= 1.37, OpenLLMetry
and OpenLIT:

==================  =========================================================================
model               gen_ai.response.model, else gen_ai.request.model (the model that answered
                    is the one billed); a differing request model is kept as tag
                    ``request_model``
provider            gen_ai.provider.name (semconv >= 1.37), gen_ai.system (<= 1.36, OpenLIT,
                    OpenLLMetry)
operation           gen_ai.operation.name, llm.request.type; default "chat"
input_tokens        gen_ai.usage.input_tokens, gen_ai.usage.prompt_tokens
output_tokens       gen_ai.usage.output_tokens, gen_ai.usage.completion_tokens
(total)             llm.usage.total_tokens, gen_ai.usage.total_tokens: when only one of
                    input/output is reported, the other is total minus it; when neither is,
                    all of the total counts as input and the event is tagged
                    ``usage=total_only``. No usage at all: 0 and 0.
cached_input_tok.   gen_ai.usage.cache_read.input_tokens, gen_ai.usage.cache_read_input_tokens
                    (part of input_tokens, as semconv defines it)
cost_usd            gen_ai.usage.cost (OpenLIT); absent: the collector's price table
ttft_ms             gen_ai.server.time_to_first_token (seconds; OpenLIT); ignored when longer
                    than the span
error_type          error.type; a span with status ERROR is an error even without it
service             resource attribute service.name; default "unknown_service"
time, latency_ms    the span's start time, and its end minus its start
event_id            "<trace id hex>-<span id hex>": a re-sent export has the same ids
quality             span events named ``gen_ai.evaluation.result`` (or anything starting with
                    ``gen_ai.evaluation``) with a numeric ``gen_ai.evaluation.score.value`` (or
                    ``gen_ai.evaluation.score``) in 0..1; several: their mean. Scores outside
                    0..1 have no known scale and are ignored, as are label-only results.
prompt_fingerprint  a hash of the prompt content when the span carries it
                    (gen_ai.input.messages, gen_ai.prompt.N.content, gen_ai.prompt; see
                    ``prompt_fingerprint``); the text itself is never kept, and is redacted
                    from rejected spans in the dead-letter log
==================  =========================================================================

A span that is an LLM call but cannot become a valid event (no model, negative tokens, no
start time, an end before its start, ...) is rejected with a path like
``resourceSpans[0].scopeSpans[1].spans[2].input_tokens`` and the reason, naming the attribute.
"""
from __future__ import annotations

import base64
import json
import math
import time as _time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ipc.events import EventRejected, LLMEvent, parse_json_event
from workers.collector.prompt_fingerprint import PROMPT_EVENT, fingerprint, redact_content

MODEL_KEYS = ("gen_ai.response.model", "gen_ai.request.model")
PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system")
OPERATION_KEYS = ("gen_ai.operation.name", "llm.request.type")
INPUT_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_KEYS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
TOTAL_KEYS = ("llm.usage.total_tokens", "gen_ai.usage.total_tokens")
CACHED_KEYS = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")
COST_KEYS = ("gen_ai.usage.cost",)
TTFT_KEYS = ("gen_ai.server.time_to_first_token",)
ERROR_KEYS = ("error.type",)
SCORE_KEYS = ("gen_ai.evaluation.score.value", "gen_ai.evaluation.score")
EVALUATION_EVENT_PREFIX = "gen_ai.evaluation"
USAGE_KEYS = INPUT_KEYS + OUTPUT_KEYS + TOTAL_KEYS + CACHED_KEYS + COST_KEYS
INFERENCE_OPERATIONS = frozenset({"chat", "text_completion", "completion", "generate_content",
                                  "embeddings", "embedding"})
AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent", "execute_tool",
                              "invoke_workflow"})
DEFAULT_SERVICE = "unknown_service"
_NS = 1_000_000_000


class OtlpDecodeError(ValueError):
    """A body that is not an ExportTraceServiceRequest in the encoding it claims."""


@dataclass
class Mapped:
    events: list[LLMEvent] = field(default_factory=list)
    # (original span summary, path, reason), as IngestPipeline.dead_letter takes them
    rejected: list[tuple[dict[str, Any], str, str]] = field(default_factory=list)
    ignored: int = 0

    @property
    def llm_spans(self) -> int:
        """The spans that are LLM calls, valid or not: what a client's rate limit counts."""
        return len(self.events) + len(self.rejected)

    def response(self) -> ExportTraceServiceResponse:
        """The ExportTraceServiceResponse: partial_success when spans were rejected."""
        answer = ExportTraceServiceResponse()
        if self.rejected:
            _, path, reason = self.rejected[0]
            more = len(self.rejected) - 1
            answer.partial_success.rejected_spans = len(self.rejected)
            answer.partial_success.error_message = (
                f"{len(self.rejected)} gen_ai span(s) are not valid LLM calls; first: "
                f"{path}: {reason}" + (f" (and {more} more)" if more else ""))
        return answer


# --- decoding ----------------------------------------------------------------------------------

def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError) as exc:
        raise OtlpDecodeError(f"not an ExportTraceServiceRequest protobuf: {exc}") from None
    return request


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(obj: dict[str, Any]) -> None:
    """OTLP/JSON writes ids as hex; the protobuf JSON mapping wants base64 for bytes."""
    for key in _ID_KEYS:
        value = obj.get(key)
        if isinstance(value, str) and value and len(value) % 2 == 0:
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                pass  # not hex: let the JSON mapping judge it (as base64)


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OtlpDecodeError(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpDecodeError("expected an ExportTraceServiceRequest object")
    for rs in _list(doc, "resourceSpans", "resource_spans"):
        for ss in _list(rs, "scopeSpans", "scope_spans"):
            for span in _list(ss, "spans"):
                if isinstance(span, dict):
                    _hex_ids_to_base64(span)
                    for link in _list(span, "links"):
                        if isinstance(link, dict):
                            _hex_ids_to_base64(link)
    request = ExportTraceServiceRequest()
    try:  # OTLP receivers must ignore unknown fields
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise OtlpDecodeError(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return request


def _list(obj: Any, *keys: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return value
    return []


def response_json(answer: ExportTraceServiceResponse) -> bytes:
    return json_format.MessageToJson(answer, indent=None).encode()


# --- mapping -----------------------------------------------------------------------------------

def any_value(value: Any) -> Any:
    """An OTLP AnyValue as Python: str, bool, int, float, bytes, list or dict; None if unset."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _first(attrs: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        value = attrs.get(key)
        if value is not None:
            return key, value
    return None, None


def is_llm_call(attrs: dict[str, Any]) -> bool:
    _, operation = _first(attrs, OPERATION_KEYS)
    if isinstance(operation, str) and operation in AGENT_OPERATIONS:
        return False
    if any(attrs.get(k) is not None for k in MODEL_KEYS + USAGE_KEYS):
        return True
    return isinstance(operation, str) and operation in INFERENCE_OPERATIONS


def span_summary(span: Span, service: str, attrs: dict[str, Any]) -> dict[str, Any]:
    """What the dead-letter log keeps of a rejected span (ids in hex, as OTLP/JSON has them)."""
    return {"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(), "name": span.name,
            "service": service, "start_time_unix_nano": span.start_time_unix_nano,
            "end_time_unix_nano": span.end_time_unix_nano,
            "attributes": {k: (v.hex() if isinstance(v, bytes) else v)
                           for k, v in redact_content(attrs).items()}}


def quality(span: Span) -> float | None:
    scores = []
    for event in span.events:
        if not event.name.startswith(EVALUATION_EVENT_PREFIX):
            continue
        _, score = _first(attributes(event.attributes), SCORE_KEYS)
        if (isinstance(score, (int, float)) and not isinstance(score, bool)
                and math.isfinite(score) and 0.0 <= score <= 1.0):
            scores.append(float(score))
    return sum(scores) / len(scores) if scores else None


def map_span(span: Span, service: str, path: str, *, now: float | None = None,
             attrs: dict[str, Any] | None = None) -> LLMEvent:
    """One LLM-call span -> LLMEvent, or EventRejected with ``path.field`` and the reason.
    ``attrs``: the span's attributes if the caller has them already."""
    if attrs is None:
        attrs = attributes(span.attributes)
    sources: dict[str, str] = {}   # event field -> the attribute it came from, for reasons
    obj: dict[str, Any] = {}

    def take(name: str, keys: tuple[str, ...]) -> Any:
        key, value = _first(attrs, keys)
        if key is not None:
            sources[name] = key
            obj[name] = value
        return value

    if len(span.trace_id) != 16 or not any(span.trace_id):
        raise EventRejected(f"{path}.trace_id", "missing or not 16 bytes: no event_id")
    if len(span.span_id) != 8 or not any(span.span_id):
        raise EventRejected(f"{path}.span_id", "missing or not 8 bytes: no event_id")
    obj["event_id"] = f"{span.trace_id.hex()}-{span.span_id.hex()}"
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start == 0:
        raise EventRejected(f"{path}.time", "the span has no start_time_unix_nano")
    if end < start:
        raise EventRejected(f"{path}.latency_ms",
                            "the span ends before it starts (end_time_unix_nano < "
                            "start_time_unix_nano)")
    obj["time"] = start / _NS          # validated as for JSON; exact nanoseconds kept below
    obj["latency_ms"] = (end - start) / 1e6
    obj["service"] = service

    model = take("model", MODEL_KEYS)
    request_model = attrs.get("gen_ai.request.model")
    take("provider", PROVIDER_KEYS)
    take("operation", OPERATION_KEYS)
    take("cached_input_tokens", CACHED_KEYS)
    take("cost_usd", COST_KEYS)
    take("error_type", ERROR_KEYS)
    tags: dict[str, str] = {}
    if isinstance(request_model, str) and request_model and request_model != model:
        tags["request_model"] = request_model[:1024]

    inputs = take("input_tokens", INPUT_KEYS)
    outputs = take("output_tokens", OUTPUT_KEYS)
    total_key, total = _first(attrs, TOTAL_KEYS)
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        if inputs is None and isinstance(outputs, int) and 0 <= outputs <= total:
            obj["input_tokens"], sources["input_tokens"] = total - outputs, total_key
        elif outputs is None and isinstance(inputs, int) and 0 <= inputs <= total:
            obj["output_tokens"], sources["output_tokens"] = total - inputs, total_key
        elif inputs is None and outputs is None:
            obj["input_tokens"], sources["input_tokens"] = total, total_key
            obj["output_tokens"] = 0
            tags["usage"] = "total_only"
    obj.setdefault("input_tokens", 0)
    obj.setdefault("output_tokens", 0)

    ttft = attrs.get(TTFT_KEYS[0])
    if (isinstance(ttft, (int, float)) and not isinstance(ttft, bool) and math.isfinite(ttft)
            and 0 <= ttft * 1000 <= obj["latency_ms"]):
        obj["ttft_ms"] = ttft * 1000
    if span.status.code == Status.STATUS_CODE_ERROR:
        obj["status"] = "error"
    if (score := quality(span)) is not None:
        obj["quality"] = score
    prompt = fingerprint(attrs, ((e.name, attributes(e.attributes)) for e in span.events
                                 if e.name == PROMPT_EVENT))
    if prompt is not None:
        obj["prompt_fingerprint"] = prompt
    if tags:
        obj["tags"] = tags
    if obj.get("model") is None:
        raise EventRejected(f"{path}.model", "no model: neither gen_ai.response.model nor "
                                             "gen_ai.request.model is set")
    try:
        event = parse_json_event(obj, 0, now=now)
    except EventRejected as exc:
        name = exc.path.rsplit(".", 1)[-1].split("[", 1)[0]
        source = sources.get(name)
        reason = f"{exc.reason} (attribute {source})" if source else exc.reason
        raise EventRejected(f"{path}.{name}", reason) from None
    return msgspec.structs.replace(event, time_ns=start)


def map_request(request: ExportTraceServiceRequest, *, now: float | None = None) -> Mapped:
    """Every span of the request: an event, a rejection, or ignored (not an LLM call)."""
    mapped = Mapped()
    now = _time.time() if now is None else now
    for i, resource_spans in enumerate(request.resource_spans):
        resource = attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        if not isinstance(service, str) or not service:
            service = DEFAULT_SERVICE
        for j, scope_spans in enumerate(resource_spans.scope_spans):
            for k, span in enumerate(scope_spans.spans):
                attrs = attributes(span.attributes)
                if not is_llm_call(attrs):
                    mapped.ignored += 1
                    continue
                path = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                try:
                    mapped.events.append(map_span(span, service, path, now=now, attrs=attrs))
                except EventRejected as exc:
                    mapped.rejected.append((span_summary(span, service, attrs), exc.path,
                                            exc.reason))
    return mapped
