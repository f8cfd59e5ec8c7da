"""The event model: JSON validation with exact paths and reasons, the future-time rule against an
injected clock, and the event log's msgpack round trip."""
from __future__ import annotations

from typing import Any

import msgspec
import pytest

from ipc.events import (
    MAX_FUTURE_SECONDS,
    EventDecodeError,
    EventRejected,
    LLMEvent,
    decode_event,
    encode_event,
    parse_json_event,
    parse_time,
)

NOW = 1_750_000_000.0  # 2025-06-15T15:06:40Z
NS = 1_000_000_000


def minimal(**changes: Any) -> dict[str, Any]:
    event = {"event_id": "e-1", "time": NOW - 60, "service": "search", "model": "gpt-4o",
             "input_tokens": 1200, "output_tokens": 300, "latency_ms": 850.5}
    event.update(changes)
    return event


def full(**changes: Any) -> dict[str, Any]:
    event = minimal(provider="openai", operation="chat", cached_input_tokens=1000,
                    ttft_ms=120.0, cost_usd=0.004, status="error", error_type="rate_limit",
                    cache_hit=False, quality=0.75, prompt_fingerprint="sha256:" + "ab" * 32,
                    variant="B", tags={"team": "growth", "env": "prod"})
    event.update(changes)
    return event


def rejected(obj: Any, index: int = 3, now: float = NOW) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse_json_event(obj, index, now=now)
    assert str(info.value) == f"{info.value.path}: {info.value.reason}"
    return info.value


def test_minimal_event_takes_the_defaults() -> None:
    event = parse_json_event(minimal(), 0, now=NOW)
    assert event == LLMEvent(event_id="e-1", time_ns=int(NOW - 60) * NS, service="search",
                             model="gpt-4o", input_tokens=1200, output_tokens=300,
                             latency_ms=850.5)
    assert event.operation == "chat" and event.status == "ok" and event.tags == {}
    assert event.provider is None and event.cost_usd is None and event.quality is None
    assert event.time == NOW - 60


def test_full_event_keeps_every_field() -> None:
    event = parse_json_event(full(), 0, now=NOW)
    assert (event.provider, event.operation, event.cached_input_tokens, event.ttft_ms) == \
        ("openai", "chat", 1000, 120.0)
    assert (event.cost_usd, event.status, event.error_type, event.cache_hit) == \
        (0.004, "error", "rate_limit", False)
    assert (event.quality, event.variant) == (0.75, "B")
    assert event.prompt_fingerprint == "sha256:" + "ab" * 32
    assert event.tags == {"team": "growth", "env": "prod"}
    assert event.price_version is None


def test_nulls_are_the_same_as_absent_keys() -> None:
    nulls = {key: None for key in ("provider", "operation", "cached_input_tokens", "ttft_ms",
                                   "cost_usd", "status", "error_type", "cache_hit", "quality",
                                   "prompt_fingerprint", "variant", "tags")}
    assert parse_json_event(minimal(**nulls), 0, now=NOW) == \
        parse_json_event(minimal(), 0, now=NOW)


def test_an_error_type_without_a_status_means_error() -> None:
    assert parse_json_event(minimal(error_type="timeout"), 0, now=NOW).status == "error"
    assert parse_json_event(minimal(error_type="timeout", status="ok"), 0,
                            now=NOW).status == "ok"


def test_whole_floats_are_accepted_as_token_counts() -> None:
    assert parse_json_event(minimal(input_tokens=12.0), 0, now=NOW).input_tokens == 12


@pytest.mark.parametrize("text, expected_ns", [
    ("2025-06-15T15:06:40Z", 1_750_000_000 * NS),
    ("2025-06-15T15:06:40.5Z", 1_750_000_000 * NS + 500_000_000),
    ("2025-06-15T15:06:40.123456789Z", 1_750_000_000 * NS + 123_456_789),
    ("2025-06-15t15:06:40z", 1_750_000_000 * NS),
    ("2025-06-15 15:06:40Z", 1_750_000_000 * NS),
    ("2025-06-15T17:06:40+02:00", 1_750_000_000 * NS),
    ("2025-06-15T10:36:40.000001-04:30", 1_750_000_000 * NS + 1_000),
    ("1970-01-01T00:00:00Z", 0),
])
def test_rfc3339_times_keep_nanoseconds(text: str, expected_ns: int) -> None:
    assert parse_time(text) == expected_ns
    assert parse_json_event(minimal(time=text), 0, now=NOW).time_ns == expected_ns


def test_unix_seconds_int_and_float() -> None:
    assert parse_time(1_750_000_000) == 1_750_000_000 * NS
    assert parse_time(1_750_000_000.25) == 1_750_000_000 * NS + 250_000_000
    assert abs(parse_time(1_750_000_000.123456) - (1_750_000_000 * NS + 123_456_000)) < 1_000


@pytest.mark.parametrize("time_value, reason_part", [
    ("2025-06-15T15:06:40", "expected RFC 3339 with an offset"),
    ("2025-06-15", "expected RFC 3339 with an offset"),
    ("yesterday", "expected RFC 3339 with an offset, e.g. 2025-01-02T03:04:05Z, got 'yesterday'"),
    ("2025-13-01T00:00:00Z", "invalid date or time in '2025-13-01T00:00:00Z'"),
    ("2025-06-15T23:59:60Z", "invalid date or time"),
    ("2025-06-15T00:00:00+24:00", "invalid UTC offset '+24:00'"),
    ("2025-06-15T00:00:00.1234567891Z", "expected RFC 3339 with an offset"),
    (True, "expected an RFC 3339 string or Unix seconds, got boolean"),
    ([1], "expected an RFC 3339 string or Unix seconds, got array"),
    (float("nan"), "must be a finite number, got nan"),
    (float("inf"), "must be a finite number, got inf"),
    (-1, "before 1970-01-01T00:00:00Z"),
    ("1969-12-31T23:59:59Z", "before 1970-01-01T00:00:00Z"),
])
def test_bad_times(time_value: Any, reason_part: str) -> None:
    error = rejected(minimal(time=time_value))
    assert error.path == "events[3].time"
    assert reason_part in error.reason


def test_future_times_beyond_five_minutes_are_rejected() -> None:
    assert MAX_FUTURE_SECONDS == 300
    assert parse_json_event(minimal(time=NOW + 300), 0, now=NOW).time_ns == int(NOW + 300) * NS
    error = rejected(minimal(time=NOW + 301), index=0)
    assert error.path == "events[0].time"
    assert error.reason == "301 s in the future; at most 300 s of clock skew is accepted"
    error = rejected(minimal(time="2025-06-15T16:06:40Z"))  # an hour ahead of NOW
    assert error.reason.startswith("3600 s in the future")
    # The same event is fine once the clock has moved on; past times are never too old.
    assert parse_json_event(minimal(time=NOW + 301), 0, now=NOW + 2)
    assert parse_json_event(minimal(time="2001-01-01T00:00:00Z"), 0, now=NOW)


def test_the_clock_defaults_to_now() -> None:
    import time

    assert parse_json_event(minimal(time=time.time()), 0)
    with pytest.raises(EventRejected):
        parse_json_event(minimal(time=time.time() + 3600), 0)


@pytest.mark.parametrize("key", ["event_id", "time", "service", "model", "input_tokens",
                                 "output_tokens", "latency_ms"])
def test_required_fields(key: str) -> None:
    event = minimal()
    del event[key]
    error = rejected(event)
    assert (error.path, error.reason) == (f"events[3].{key}", "required")
    error = rejected(minimal(**{key: None}))
    assert (error.path, error.reason) == (f"events[3].{key}", "required, must not be null")


@pytest.mark.parametrize("changes, path, reason", [
    ({"input_tokens": -1}, "input_tokens", "must not be negative, got -1"),
    ({"output_tokens": -5}, "output_tokens", "must not be negative, got -5"),
    ({"input_tokens": "12"}, "input_tokens", "expected a whole number, got string"),
    ({"input_tokens": 1.5}, "input_tokens", "expected a whole number, got number 1.5"),
    ({"input_tokens": True}, "input_tokens", "expected a whole number, got boolean"),
    ({"output_tokens": 10 ** 13}, "output_tokens",
     "implausibly large (more than 1000000000000)"),
    ({"cached_input_tokens": 1201}, "cached_input_tokens",
     "must not exceed input_tokens (1200), got 1201"),
    ({"cached_input_tokens": -1}, "cached_input_tokens", "must not be negative, got -1"),
    ({"latency_ms": -0.5}, "latency_ms", "must not be negative, got -0.5"),
    ({"latency_ms": "fast"}, "latency_ms", "expected a number, got string"),
    ({"latency_ms": float("inf")}, "latency_ms", "must be a finite number, got inf"),
    ({"ttft_ms": 900}, "ttft_ms", "must not exceed latency_ms (850.5), got 900"),
    ({"cost_usd": -0.01}, "cost_usd", "must not be negative, got -0.01"),
    ({"cost_usd": float("nan")}, "cost_usd", "must be a finite number, got nan"),
    ({"quality": 1.5}, "quality", "must be between 0 and 1, got 1.5"),
    ({"quality": -0.1}, "quality", "must not be negative, got -0.1"),
    ({"quality": "good"}, "quality", "expected a number, got string"),
    ({"status": "failed"}, "status", "expected \"ok\" or \"error\", got 'failed'"),
    ({"status": 1}, "status", "expected \"ok\" or \"error\", got number"),
    ({"cache_hit": "yes"}, "cache_hit", "expected true or false, got string"),
    ({"cache_hit": 1}, "cache_hit", "expected true or false, got number"),
    ({"event_id": ""}, "event_id", "must not be empty"),
    ({"event_id": 42}, "event_id", "expected a string, got number"),
    ({"event_id": "x" * 257}, "event_id", "longer than 256 characters"),
    ({"service": ["a"]}, "service", "expected a string, got array"),
    ({"model": {"name": "gpt-4o"}}, "model", "expected a string, got object"),
    ({"provider": ""}, "provider", "must not be empty"),
    ({"operation": 7}, "operation", "expected a string, got number"),
    ({"variant": "v" * 129}, "variant", "longer than 128 characters"),
    ({"prompt_fingerprint": "Summarise this document for me"}, "prompt_fingerprint",
     ("expected a hash of the prompt (1-128 printable characters, no spaces), "
      "never the prompt text")),
    ({"prompt_fingerprint": "a" * 129}, "prompt_fingerprint",
     ("expected a hash of the prompt (1-128 printable characters, no spaces), "
      "never the prompt text")),
    ({"prompt_fingerprint": 123}, "prompt_fingerprint", "expected a string, got number"),
    ({"tags": ["a"]}, "tags", "expected an object of strings, got array"),
    ({"tags": {"team": 5}}, 'tags["team"]', "expected a string, got number"),
    ({"tags": {"": "x"}}, 'tags[""]', "tag names must be non-empty strings"),
    ({"tags": {"k": "v" * 1025}}, 'tags["k"]', "longer than 1024 characters"),
    ({"tags": {f"k{i}": "v" for i in range(65)}}, "tags", "at most 64 tags, got 65"),
])
def test_invalid_values(changes: dict[str, Any], path: str, reason: str) -> None:
    error = rejected(minimal(**changes))
    assert (error.path, error.reason) == (f"events[3].{path}", reason)


def test_unknown_fields_are_rejected_by_name() -> None:
    error = rejected(minimal(prompt="the whole prompt text"), index=7)
    assert (error.path, error.reason) == ("events[7].prompt", "unknown field 'prompt'")
    error = rejected(minimal(inputTokens=5))
    assert (error.path, error.reason) == ("events[3].inputTokens", "unknown field 'inputTokens'")


@pytest.mark.parametrize("obj, kind", [([], "array"), ("e", "string"), (None, "null"),
                                       (5, "number")])
def test_an_event_must_be_an_object(obj: Any, kind: str) -> None:
    error = rejected(obj, index=0)
    assert (error.path, error.reason) == ("events[0]", f"expected an object, got {kind}")


def test_a_rejection_is_a_value_error_with_a_readable_message() -> None:
    error = rejected(minimal(input_tokens=-1))
    assert isinstance(error, ValueError)
    assert str(error) == "events[3].input_tokens: must not be negative, got -1"


def test_events_decoded_by_msgspec_json_are_accepted() -> None:
    body = msgspec.json.encode({"events": [full(), minimal(event_id="e-2")]})
    events = [parse_json_event(obj, i, now=NOW)
              for i, obj in enumerate(msgspec.json.decode(body)["events"])]
    assert [e.event_id for e in events] == ["e-1", "e-2"]


def test_round_trip_through_the_log_encoding() -> None:
    for obj in (minimal(), full(), full(time="2025-06-15T15:06:40.123456789Z")):
        event = parse_json_event(obj, 0, now=NOW)
        data = encode_event(event)
        assert decode_event(data) == event
    event = msgspec.structs.replace(parse_json_event(full(), 0, now=NOW),
                                    price_version="2025-11-01")
    assert decode_event(encode_event(event)) == event


def test_log_encoding_is_compact_and_keyless() -> None:
    data = encode_event(parse_json_event(full(), 0, now=NOW))
    assert b"input_tokens" not in data and b"event_id" not in data
    assert len(data) < 0.6 * len(msgspec.json.encode(full()))
    assert isinstance(msgspec.msgpack.decode(data), list)


def test_records_written_before_fields_were_appended_still_decode() -> None:
    old = msgspec.msgpack.encode(["e-1", 5 * NS, "search", "gpt-4o", 10, 20, 30.0])
    event = decode_event(old)
    assert (event.event_id, event.time_ns, event.latency_ms) == ("e-1", 5 * NS, 30.0)
    assert event.operation == "chat" and event.tags == {} and event.cached_input_tokens is None


@pytest.mark.parametrize("data", [b"", b"\xc1", msgspec.msgpack.encode({"event_id": "x"}),
                                  msgspec.msgpack.encode(["e-1", "not a time"])])
def test_corrupt_records_raise_a_decode_error(data: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(data)
