"""Between the service layer's plain values and protobuf messages, by the conventions written at
the top of protos/llm_optimizer/v1/common.proto: ``*_ns``/``*_ms`` integers are Timestamps (0 is
unset), free-form objects are Structs, enums map to lowercase strings, page tokens are the
REST cursors."""
from __future__ import annotations

import re
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

NS = 1_000_000_000
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def timestamp_ns(ns: int | None) -> timestamp_pb2.Timestamp | None:
    if not ns:
        return None
    return timestamp_pb2.Timestamp(seconds=ns // NS, nanos=ns % NS)


def timestamp_ms(ms: int | None) -> timestamp_pb2.Timestamp | None:
    return timestamp_ns(ms * 1_000_000) if ms else None


def ns_of(stamp: timestamp_pb2.Timestamp, present: bool = True) -> int | None:
    """Nanoseconds of a request's Timestamp; None when it is unset (``present`` False)."""
    if not present:
        return None
    return stamp.seconds * NS + stamp.nanos


def ms_of(stamp: timestamp_pb2.Timestamp, present: bool = True) -> int | None:
    ns = ns_of(stamp, present)
    return None if ns is None else ns // 1_000_000


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(value)
    return out


def plain(message: Message) -> Any:
    """A Struct, Value or any message as plain JSON values (field names as in the proto).
    Struct numbers are doubles: integral ones become the JSON integers the REST API keeps
    (``max_tokens: 512``, not ``512.0``)."""
    return _integers(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integers(item) for item in value]
    return value


def _prefix(enum: Any) -> str:
    return _CAMEL.sub("_", enum.DESCRIPTOR.name).upper() + "_"


def enum_value(enum: Any, text: str | None) -> int:
    """``"rolled_back"`` as OPTIMIZATION_STATUS_ROLLED_BACK; unknown or empty: UNSPECIFIED."""
    if not text:
        return 0
    try:
        return int(enum.Value(_prefix(enum) + text.upper()))
    except ValueError:
        return 0


def enum_text(enum: Any, value: int) -> str | None:
    """OPTIMIZATION_STATUS_ROLLED_BACK as ``"rolled_back"``; UNSPECIFIED (0) as None."""
    if not value:
        return None
    return str(enum.Name(value)).removeprefix(_prefix(enum)).lower()
