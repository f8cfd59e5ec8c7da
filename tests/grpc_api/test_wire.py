"""The event stream's hand-written wire bytes parse to the messages the protobuf runtime builds:
a Struct from ``wire.struct_bytes`` equals ``Struct.update``'s for every kind of JSON value and
length, and ``_event`` gives the OptimizerEvent the fields describe, skipping what it must."""
from __future__ import annotations

import json
import random
from collections import OrderedDict
from typing import Any

import pytest
from google.protobuf import struct_pb2

from ipc import storage as s
from protos.llm_optimizer.v1 import common_pb2, optimization_pb2
from workers.grpc_api import wire
from workers.grpc_api.convert import struct, timestamp_ns
from workers.grpc_api.services.optimization import _event, _events_message

CASES = [
    {},
    {"s": "", "n": 0, "f": -0.0, "t": True, "b": False, "z": None, "e": {}, "l": []},
    {"int": 2**53 + 1, "neg": -7, "big": 10**30, "small": 1e-300, "float": 0.1},
    {"ü-ключ": "värde ✓ 😀", "": "empty key"},
    {"long": "x" * 127, "longer": "y" * 128, "2-byte": "z" * 16_383, "3-byte": "w" * 16_384},
    {"k" * 200: 1, "k" * 121: "ab", "k" * 122: "a"},  # entry lengths around one byte's limit
    {"nested": {"a": {"b": {"c": [1, [2, [3, {"d": None}]], {}]}}}},
    {"list": [None, True, 1.5, "s", {"x": [{}]}, [[], [None]]] * 30},
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice("sniftzdl" if depth < 4 else "snift")
    if kind == "s":
        return "".join(rng.choice("aé😀\n\"\\") for _ in range(rng.choice([0, 3, 130])))
    if kind == "n":
        return rng.randint(-(10**18), 10**18)
    if kind == "i":
        return rng.randint(-5, 5)
    if kind == "f":
        return rng.uniform(-1e6, 1e6)
    if kind == "t":
        return rng.random() < 0.5
    if kind == "z":
        return None
    if kind == "d":
        return {f"k{rng.randint(0, 99)}": random_json(rng, depth + 1)
                for _ in range(rng.randint(0, 6))}
    return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))]


@pytest.mark.parametrize("obj", CASES + [
    {"root": random_json(random.Random(seed))} for seed in range(200)])
def test_struct_bytes_parse_to_the_struct_update_builds(obj):
    got = struct_pb2.Struct.FromString(wire.struct_bytes(obj))
    want = struct(obj)
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def test_what_a_value_cannot_hold_is_refused():
    with pytest.raises(ValueError):
        wire.struct_bytes({"a": [10**400]})
    with pytest.raises(ValueError):
        wire.struct_bytes({"a": "\ud800"})  # a lone surrogate is not Unicode text
    with pytest.raises(TypeError):
        wire.value_bytes({1, 2})


def record(offset: int, event: Any) -> s.LogRecord:
    return s.LogRecord(offset, 0, json.dumps(event).encode())


def parsed(element: bytes) -> common_pb2.OptimizerEvent:
    [event] = response(_events_message([element])).events
    return event


def response(data: bytes) -> optimization_pb2.SubscribeOptimizationEventsResponse:
    return optimization_pb2.SubscribeOptimizationEventsResponse.FromString(data)


def test_event_is_the_optimizer_event_of_the_record():
    body = {"service": "svc", "impact": {"cost_pct": -12.5}, "tags": ["a", 1]}
    for time_ns in (1_795_600_800_123_456_789, 1_795_600_800_000_000_000, 1):
        element = _event(record(1234, {"type": "proposal", "id": "p:1", "time_ns": time_ns,
                                       "body": body}), set(), "", OrderedDict(), as_json=False)
        assert element is not None
        assert parsed(element) == common_pb2.OptimizerEvent(
            type="proposal", id="p:1", time=timestamp_ns(time_ns), body=struct(body),
            offset=1234)
    # no body, no time (absent, 0, negative, beyond int64, not an int), offset 0
    for time_ns in (None, 0, -5, 1 << 63, 1.5e18, "soon"):
        element = _event(record(0, {"type": "config", "id": f"c{time_ns}", "time_ns": time_ns}),
                         set(), "", OrderedDict(), as_json=False)
        assert element is not None
        assert parsed(element) == common_pb2.OptimizerEvent(type="config", id=f"c{time_ns}")


def test_event_skips_unwanted_repeated_and_unconvertible_records():
    seen: OrderedDict[tuple[str, str], None] = OrderedDict()
    ok = {"type": "finding", "id": "f1", "body": {"service": "a"}}
    assert _event(record(1, ok), {"proposal"}, "", seen, False) is None  # another type
    assert _event(record(1, ok), set(), "b", seen, False) is None  # another service
    assert _event(record(1, ok), set(), "b", seen, True) is None
    assert _event(record(1, ok), set(), "a", seen, False) is not None
    assert _event(record(2, ok), set(), "", seen, False) is None  # appended twice: sent once
    assert _event(record(2, ok), set(), "", seen, True) is None
    for bad in (b"not json", b"[1, 2]", b'{"type": "x", "id": "y", "body": {"n": 1e999}}',
                b'{"type": "x", "id": "big", "body": {"n": 1' + b"0" * 400 + b"}}"):
        assert _event(s.LogRecord(3, 0, bad), set(), "", seen, False) is None, bad
    assert ("x", "big") not in seen  # a record not sent is not taken as seen


def test_event_with_a_json_body_carries_the_record_text():
    payload = (b'{"type": "proposal", "id": "p:2", "time_ns": 5, "offset_hint": 1,\n'
               b' "body": {"service": "svc",  "title": "caf\xc3\xa9", "n": [1, 2.50]}}')
    element = _event(s.LogRecord(7, 0, payload), set(), "svc", OrderedDict(), as_json=True)
    assert element is not None
    assert parsed(element) == common_pb2.OptimizerEvent(
        type="proposal", id="p:2", time=timestamp_ns(5), offset=7,
        body_json='{"service": "svc",  "title": "caf\u00e9", "n": [1, 2.50]}')
    # a body that is not an object leaves the payload unset; not UTF-8: not sent
    element = _event(record(8, {"type": "t", "id": "x", "body": [1]}), set(), "",
                     OrderedDict(), as_json=True)
    assert element is not None and parsed(element).WhichOneof("payload") is None
    assert _event(s.LogRecord(9, 0, b'{"type": "t", "id": "y", "body": {"a": "\xff"}}'),
                  set(), "", OrderedDict(), as_json=True) is None


def test_a_message_of_elements_keeps_their_order():
    elements = [_event(record(n, {"type": "t", "id": str(n), "body": {"n": n}}), set(), "",
                       OrderedDict(), n % 2 == 0) for n in range(50)]
    message = response(_events_message(elements))
    assert [e.offset for e in message.events] == list(range(50))
    assert message.ByteSize() == sum(map(len, elements))  # the size the server splits by
