"""The event model: one ``LLMEvent`` per LLM call, as the collector accepts and logs it.

JSON ingest (``parse_json_event``) validates one decoded JSON object and raises
``EventRejected(path, reason)`` for the first problem, ``path`` naming the offending key as in
``events[3].input_tokens``. Unknown keys are rejected, not ignored, so that a misspelt key
cannot silently lose data.

Accepted keys (required: event_id, time, service, model, input_tokens, output_tokens,
latency_ms; every other key may be absent or null):

=======================  ===================================================================
event_id                 string, 1-256 characters, unique per call (the dedup key)
time                     RFC 3339 with an offset ("2025-01-02T03:04:05.678Z") or Unix seconds
                         (int or float); at most 5 minutes in the future, any time in the past
service, model           strings, 1-256 characters
provider                 string (e.g. "openai")
operation                string, default "chat"
input_tokens             int >= 0, all prompt tokens, cached ones included
cached_input_tokens      int >= 0, the part of input_tokens read from the provider's prompt
                         cache (billed at the cached-input price); at most input_tokens
output_tokens            int >= 0
latency_ms, ttft_ms      numbers >= 0; ttft_ms (time to first token) at most latency_ms
cost_usd                 number >= 0; absent: computed from the price table (ipc.prices)
status                   "ok" or "error"; absent: "error" if error_type is set, else "ok"
error_type               string (e.g. "rate_limit")
cache_hit                bool (a response cache in front of the model)
quality                  number in 0..1 (may also arrive later, as feedback)
prompt_fingerprint       a hash of the prompt: 1-128 printable ASCII characters without
                         spaces. Never the prompt text.
variant                  string (the experiment arm)
tags                     object of string -> string, at most 64 entries
=======================  ===================================================================

Time is stored as ``time_ns``: int nanoseconds since the Unix epoch, UTC. RFC 3339 fractions
are kept to the nanosecond; float Unix seconds to the precision a float has (about 0.2 us today).

In the event log an event is msgpack, array-like (field values in declaration order, no keys):
``encode_event``/``decode_event``. Fields are only ever appended, with a default, so that old
records stay readable.
"""
from __future__ import annotations

import math
import re
import time as _time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import msgspec
from msgspec import Struct, field

MAX_FUTURE_SECONDS = 300.0
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_SHORT_CHARS = 128
MAX_TAGS = 64
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 1024
MAX_TOKENS = 10 ** 12
_NS = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$")
_FINGERPRINT = re.compile(r"^[\x21-\x7e]{1,128}$")

Status = Literal["ok", "error"]


class LLMEvent(Struct, array_like=True, kw_only=True):
    """One LLM call. Field order is the log's wire format: append only, with defaults."""

    event_id: str
    time_ns: int
    service: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_ms: float
    provider: str | None = None
    operation: str = "chat"
    ttft_ms: float | None = None
    cost_usd: float | None = None
    status: Status = "ok"
    error_type: str | None = None
    cache_hit: bool | None = None
    quality: float | None = None
    prompt_fingerprint: str | None = None
    variant: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    cached_input_tokens: int | None = None
    # The version of the price table that computed cost_usd; None when the caller reported it.
    price_version: str | None = None

    @property
    def time(self) -> float:
        """Unix seconds, UTC."""
        return self.time_ns / _NS


class EventRejected(ValueError):
    """An event that is not valid: ``path`` like ``events[3].input_tokens``, and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class EventDecodeError(ValueError):
    """A log record that is not an encoded LLMEvent."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LLMEvent)


def encode_event(event: LLMEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> LLMEvent:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"not an encoded LLMEvent: {exc}") from None


# --- JSON ingest ------------------------------------------------------------------------------

REQUIRED = ("event_id", "time", "service", "model", "input_tokens", "output_tokens",
            "latency_ms")
OPTIONAL = ("provider", "operation", "cached_input_tokens", "ttft_ms", "cost_usd", "status",
            "error_type", "cache_hit", "quality", "prompt_fingerprint", "variant", "tags")
ACCEPTED = frozenset(REQUIRED + OPTIONAL)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Fields:
    """Typed access to one event object's keys, each failure an EventRejected at its path."""

    def __init__(self, obj: dict[str, Any], path: str):
        self.obj, self.path = obj, path

    def fail(self, key: str, reason: str) -> EventRejected:
        return EventRejected(f"{self.path}.{key}", reason)

    def string(self, key: str, max_chars: int, default: str | None = None) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {_type_name(value)}")
        if not value:
            raise self.fail(key, "must not be empty")
        if len(value) > max_chars:
            raise self.fail(key, f"longer than {max_chars} characters")
        return value

    def tokens(self, key: str) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 12.0 from a JSON encoder that only has floats
            else:
                raise self.fail(key, f"expected a whole number, got {_type_name(value)}"
                                     + (f" {value!r}" if isinstance(value, float) else ""))
        if value < 0:
            raise self.fail(key, f"must not be negative, got {value}")
        if value > MAX_TOKENS:
            raise self.fail(key, f"implausibly large (more than {MAX_TOKENS})")
        return value

    def number(self, key: str, low: float = 0.0, high: float | None = None) -> float | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {_type_name(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {value}")
        if value < low:
            raise self.fail(key, f"must not be negative, got {value:g}" if low == 0 else
                            f"must be at least {low:g}, got {value:g}")
        if high is not None and value > high:
            raise self.fail(key, f"must be between {low:g} and {high:g}, got {value:g}")
        return value


def parse_time(value: Any) -> int:
    """RFC 3339 text (with an offset) or Unix seconds -> int nanoseconds since the epoch, UTC.
    Raises ValueError with the reason."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        got = _type_name(value)  # a ValueError, as for every other bad time: callers catch that
        raise ValueError(f"expected an RFC 3339 string or Unix seconds, got {got}")  # noqa: TRY004
    if isinstance(value, str):
        m = _RFC3339.match(value)
        if m is None:
            raise ValueError("expected RFC 3339 with an offset, e.g. 2025-01-02T03:04:05Z, "
                             f"got {value[:64]!r}")
        year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
        offset = m.group(8)
        if offset in ("Z", "z"):
            tz = UTC
        else:
            sign = -1 if offset[0] == "-" else 1
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(f"invalid UTC offset {offset!r}")
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        try:
            moment = datetime(year, month, day, hour, minute, second, tzinfo=tz)
        except ValueError as exc:  # month 13, second 60, ...
            raise ValueError(f"invalid date or time in {value[:64]!r}: {exc}") from None
        fraction = int((m.group(7) or "0").ljust(9, "0"))
        return (moment - _EPOCH) // timedelta(seconds=1) * _NS + fraction
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if isinstance(value, int):
        return value * _NS
    whole = math.floor(value)
    return whole * _NS + round((value - whole) * _NS)


def parse_json_event(obj: Any, index: int, *, now: float | None = None) -> LLMEvent:
    """One decoded JSON event -> LLMEvent, or EventRejected naming ``events[index].key``.

    ``now`` is the current Unix time (default: the clock), against which times more than
    MAX_FUTURE_SECONDS ahead are rejected."""
    path = f"events[{index}]"
    if not isinstance(obj, dict):
        raise EventRejected(path, f"expected an object, got {_type_name(obj)}")
    for key in obj:
        if key not in ACCEPTED:
            raise EventRejected(f"{path}.{key}" if isinstance(key, str) else path,
                                f"unknown field {key!r}")
    for key in REQUIRED:
        if obj.get(key) is None:
            raise EventRejected(f"{path}.{key}", "required" if key not in obj else
                                "required, must not be null")
    f = _Fields(obj, path)

    try:
        time_ns = parse_time(obj["time"])
    except ValueError as exc:
        raise f.fail("time", str(exc)) from None
    if time_ns < 0:
        raise f.fail("time", "before 1970-01-01T00:00:00Z")
    current = _time.time() if now is None else now
    if time_ns > (current + MAX_FUTURE_SECONDS) * _NS:
        ahead = time_ns / _NS - current
        raise f.fail("time", f"{ahead:.0f} s in the future; at most {MAX_FUTURE_SECONDS:.0f} s "
                             "of clock skew is accepted")

    input_tokens = f.tokens("input_tokens")
    cached = f.tokens("cached_input_tokens")
    if cached is not None and cached > input_tokens:
        raise f.fail("cached_input_tokens", f"must not exceed input_tokens ({input_tokens}), "
                                            f"got {cached}")
    latency = f.number("latency_ms")
    ttft = f.number("ttft_ms")
    if ttft is not None and ttft > latency:
        raise f.fail("ttft_ms", f"must not exceed latency_ms ({latency:g}), got {ttft:g}")

    error_type = f.string("error_type", MAX_SHORT_CHARS)
    status = obj.get("status")
    if status is None:
        status = "error" if error_type is not None else "ok"
    elif status not in ("ok", "error"):
        raise f.fail("status", 'expected "ok" or "error", got '
                     + (repr(status) if isinstance(status, str) else _type_name(status)))

    cache_hit = obj.get("cache_hit")
    if cache_hit is not None and not isinstance(cache_hit, bool):
        raise f.fail("cache_hit", f"expected true or false, got {_type_name(cache_hit)}")

    fingerprint = obj.get("prompt_fingerprint")
    if fingerprint is not None:
        if not isinstance(fingerprint, str):
            raise f.fail("prompt_fingerprint",
                         f"expected a string, got {_type_name(fingerprint)}")
        if not _FINGERPRINT.match(fingerprint):
            raise f.fail("prompt_fingerprint", "expected a hash of the prompt (1-128 printable "
                                               "characters, no spaces), never the prompt text")

    return LLMEvent(
        event_id=f.string("event_id", MAX_ID_CHARS),
        time_ns=time_ns,
        service=f.string("service", MAX_NAME_CHARS),
        model=f.string("model", MAX_NAME_CHARS),
        input_tokens=input_tokens,
        output_tokens=f.tokens("output_tokens"),
        latency_ms=latency,
        provider=f.string("provider", MAX_SHORT_CHARS),
        operation=f.string("operation", MAX_SHORT_CHARS, default="chat"),
        ttft_ms=ttft,
        cost_usd=f.number("cost_usd"),
        status=status,
        error_type=error_type,
        cache_hit=cache_hit,
        quality=f.number("quality", 0.0, 1.0),
        prompt_fingerprint=fingerprint,
        variant=f.string("variant", MAX_SHORT_CHARS),
        tags=_tags(obj.get("tags"), f"{path}.tags"),
        cached_input_tokens=cached,
    )


def _tags(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventRejected(path, f"expected an object of strings, got {_type_name(value)}")
    if len(value) > MAX_TAGS:
        raise EventRejected(path, f"at most {MAX_TAGS} tags, got {len(value)}")
    for key, item in value.items():
        where = f"{path}[{msgspec.json.encode(key).decode()}]" if isinstance(key, str) else path
        if not isinstance(key, str) or not key:
            raise EventRejected(where, "tag names must be non-empty strings")
        if len(key) > MAX_TAG_KEY_CHARS:
            raise EventRejected(where, f"tag name longer than {MAX_TAG_KEY_CHARS} characters")
        if not isinstance(item, str):
            raise EventRejected(where, f"expected a string, got {_type_name(item)}")
        if len(item) > MAX_TAG_VALUE_CHARS:
            raise EventRejected(where, f"longer than {MAX_TAG_VALUE_CHARS} characters")
    return dict(value)


# --- feedback ---------------------------------------------------------------------------------

class Feedback(Struct, array_like=True, kw_only=True):
    """A quality score that arrives after its event (POST /v1/feedback), joined by event_id."""

    event_id: str
    quality: float
    received_ns: int


FEEDBACK_KEYS = frozenset({"event_id", "quality"})
_feedback_decoder = msgspec.msgpack.Decoder(Feedback)


def parse_feedback(obj: Any, index: int, received_ns: int) -> Feedback:
    """One ``{"event_id", "quality"}`` item, or EventRejected at ``feedback[i].key``."""
    path = f"feedback[{index}]"
    if not isinstance(obj, dict):
        raise EventRejected(path, f"expected an object, got {_type_name(obj)}")
    for key in obj:
        if key not in FEEDBACK_KEYS:
            raise EventRejected(f"{path}.{key}" if isinstance(key, str) else path,
                                f"unknown field {key!r}")
    for key in sorted(FEEDBACK_KEYS):
        if obj.get(key) is None:
            raise EventRejected(f"{path}.{key}", "required")
    fields = _Fields(obj, path)
    return Feedback(event_id=fields.string("event_id", MAX_ID_CHARS),
                    quality=fields.number("quality", 0.0, 1.0), received_ns=received_ns)


def encode_feedback(feedback: Feedback) -> bytes:
    return _encoder.encode(feedback)


def decode_feedback(data: bytes) -> Feedback:
    try:
        return _feedback_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"not an encoded Feedback: {exc}") from None
