"""The OTLP -> LLMEvent mapping as pure functions: no daemon."""
from __future__ import annotations

import base64
import json

import msgspec
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from workers.collector.otlp_mapping import (
    OtlpDecodeError,
    decode_json,
    decode_protobuf,
    map_request,
)

NOW = 1_790_000_000.0
START = int((NOW - 10) * 1e9)
TRACE, SPAN = bytes(range(1, 17)), bytes(range(1, 9))


def value(v) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    return AnyValue(string_value=v)


def request(*spans: dict, service: str | None = "svc") -> ExportTraceServiceRequest:
    r = ExportTraceServiceRequest()
    rs = r.resource_spans.add()
    if service:
        rs.resource.attributes.add(key="service.name", value=value(service))
    ss = rs.scope_spans.add()
    for i, spec in enumerate(spans):
        spec = dict(spec)
        span = ss.spans.add(trace_id=spec.pop("_trace", TRACE),
                            span_id=spec.pop("_span", SPAN[:-1] + bytes([i + 1])),
                            name="chat", start_time_unix_nano=spec.pop("_start", START),
                            end_time_unix_nano=spec.pop("_end", START + 250_000_000))
        if spec.pop("_error", False):
            span.status.code = Status.STATUS_CODE_ERROR
        for key, v in spec.items():
            span.attributes.add(key=key, value=value(v))
    return r


def one(**attrs):
    mapped = map_request(request(attrs), now=NOW)
    assert not mapped.rejected, mapped.rejected
    assert len(mapped.events) == 1
    return mapped.events[0]


def rejected(**attrs) -> tuple[str, str]:
    mapped = map_request(request(attrs), now=NOW)
    assert not mapped.events and len(mapped.rejected) == 1
    _, path, reason = mapped.rejected[0]
    return path.rsplit(".", 1)[1], reason


M = {"gen_ai.request.model": "gpt-4o"}


def test_basic_fields():
    e = one(**M, **{"gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 4})
    assert e.event_id == TRACE.hex() + "-" + (SPAN[:-1] + b"\x01").hex()
    assert (e.time_ns, e.latency_ms, e.service, e.operation) == (START, 250.0, "svc", "chat")
    assert (e.input_tokens, e.output_tokens, e.status, e.quality) == (3, 4, "ok", None)
    assert map_request(request(M, service=None), now=NOW).events[0].service == \
        "unknown_service"


@pytest.mark.parametrize("attrs, tokens, tags", [
    ({"llm.usage.total_tokens": 10, "gen_ai.usage.prompt_tokens": 7}, (7, 3), {}),
    ({"gen_ai.usage.total_tokens": 10, "gen_ai.usage.completion_tokens": 4}, (6, 4), {}),
    ({"llm.usage.total_tokens": 10}, (10, 0), {"usage": "total_only"}),
    ({}, (0, 0), {}),
])
def test_token_variants(attrs, tokens, tags):
    e = one(**M, **attrs)
    assert (e.input_tokens, e.output_tokens) == tokens and e.tags == tags


def test_provider_precedence_and_extras():
    e = one(**{"gen_ai.provider.name": "aws.bedrock", "gen_ai.system": "old",
               "gen_ai.response.model": "m-2", "gen_ai.request.model": "m",
               "gen_ai.server.time_to_first_token": 0.1, "gen_ai.usage.input_tokens": 5,
               "gen_ai.usage.cache_read_input_tokens": 2, "error.type": "timeout"})
    assert (e.provider, e.model, e.tags) == ("aws.bedrock", "m-2", {"request_model": "m"})
    assert e.ttft_ms == pytest.approx(100) and e.cached_input_tokens == 2
    assert (e.status, e.error_type) == ("error", "timeout")
    assert one(**M, _error=True).status == "error"
    assert one(**M, **{"gen_ai.server.time_to_first_token": 5.0}).ttft_ms is None


def test_which_spans_are_calls():
    mapped = map_request(request(
        {"http.method": "GET"},
        {"gen_ai.operation.name": "execute_tool", "gen_ai.request.model": "gpt-4o"},
        {"gen_ai.operation.name": "invoke_agent", "gen_ai.usage.input_tokens": 9},
        {"gen_ai.tool.name": "search"},
        {"gen_ai.operation.name": "embeddings", "gen_ai.request.model": "e"},
    ), now=NOW)
    assert mapped.ignored == 4 and [e.operation for e in mapped.events] == ["embeddings"]
    # an inference operation without a model is a call that cannot be an event
    assert rejected(**{"gen_ai.operation.name": "chat"})[0] == "model"


@pytest.mark.parametrize("attrs, field, words", [
    ({"gen_ai.usage.input_tokens": -1}, "input_tokens", "gen_ai.usage.input_tokens"),
    ({"gen_ai.usage.completion_tokens": "12"}, "output_tokens", "whole number"),
    ({"gen_ai.usage.input_tokens": 1, "gen_ai.usage.cache_read.input_tokens": 2},
     "cached_input_tokens", "must not exceed"),
    ({"gen_ai.usage.cost": -0.5}, "cost_usd", "negative"),
    ({"_end": START - 1}, "latency_ms", "ends before"),
    ({"_start": 0, "_end": 5}, "time", "no start"),
    ({"_start": int((NOW + 3600) * 1e9), "_end": int((NOW + 3601) * 1e9)}, "time", "future"),
    ({"_trace": b"\0" * 16}, "trace_id", "event_id"),
])
def test_invalid_calls_are_rejected_with_field_and_reason(attrs, field, words):
    got_field, reason = rejected(**M, **attrs)
    assert got_field == field and words in reason


def test_quality_from_evaluation_events():
    r = request(M)
    span = r.resource_spans[0].scope_spans[0].spans[0]
    for name, score in [("gen_ai.evaluation.result", 0.9), ("gen_ai.evaluation.result", 0.7),
                        ("gen_ai.evaluation.result", 7.0), ("exception", 0.1)]:
        span.events.add(name=name).attributes.add(key="gen_ai.evaluation.score.value",
                                                  value=value(score))
    assert map_request(r, now=NOW).events[0].quality == pytest.approx(0.8)


HELLO = [{"role": "user", "parts": [{"type": "text", "content": "What is our refund policy?"}]}]


def test_prompt_fingerprint_from_content_in_every_style_and_never_the_text():
    semconv = one(**M, **{"gen_ai.input.messages": json.dumps(HELLO)})
    spaced = one(**M, **{"gen_ai.input.messages": json.dumps(HELLO, indent=2)})
    assert semconv.prompt_fingerprint.startswith("p1:")
    assert semconv.prompt_fingerprint == spaced.prompt_fingerprint  # the same prompt
    other = one(**M, **{"gen_ai.input.messages": json.dumps(HELLO).replace("refund", "return")})
    assert other.prompt_fingerprint != semconv.prompt_fingerprint
    openllmetry = one(**M, **{"gen_ai.prompt.0.role": "user",
                              "gen_ai.prompt.0.content": "What is our  refund policy?"})
    same_words = one(**M, **{"gen_ai.prompt.0.role": "user",
                             "gen_ai.prompt.0.content": "What is our refund policy?\n"})
    assert openllmetry.prompt_fingerprint == same_words.prompt_fingerprint
    openlit = one(**M, **{"gen_ai.prompt": "What is our refund policy?"})
    assert openlit.prompt_fingerprint.startswith("p1:")
    assert one(**M).prompt_fingerprint is None  # no content captured: no fingerprint

    r = request(M)
    r.resource_spans[0].scope_spans[0].spans[0].events.add(
        name="gen_ai.content.prompt").attributes.add(key="gen_ai.prompt",
                                                     value=value("What is our refund policy?"))
    assert map_request(r, now=NOW).events[0].prompt_fingerprint == openlit.prompt_fingerprint
    for event in (semconv, openllmetry, openlit):
        assert b"refund" not in msgspec.json.encode(event)


def test_a_rejected_span_is_kept_without_its_prompt_text():
    mapped = map_request(request({**M, "gen_ai.usage.input_tokens": -1,
                                  "gen_ai.prompt.0.content": "secret plans",
                                  "gen_ai.completion.0.content": "more secrets"}), now=NOW)
    kept, path, _ = mapped.rejected[0]
    assert path.endswith("input_tokens")
    assert "secret" not in json.dumps(kept)
    assert kept["attributes"]["gen_ai.prompt.0.content"] == "[redacted]"


def test_json_with_hex_ids_decodes_to_the_same_message():
    r = request(M, {"gen_ai.request.model": "x", "gen_ai.usage.input_tokens": 5})
    doc = json_format.MessageToDict(r)
    for span in doc["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        span["traceId"] = base64.b64decode(span["traceId"]).hex()
        span["spanId"] = base64.b64decode(span["spanId"]).hex()
        span["futureField"] = 1   # unknown fields are ignored
    assert decode_json(json.dumps(doc).encode()) == r
    assert decode_protobuf(r.SerializeToString()) == r
    for bad in (b"[]", b"{x", b'{"resourceSpans": [{"scopeSpans": [{"spans": [1]}]}]}'):
        with pytest.raises(OtlpDecodeError):
            decode_json(bad)
    with pytest.raises(OtlpDecodeError):
        decode_protobuf(b"\xff\xff")
