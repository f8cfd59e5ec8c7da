"""Where the processor keeps closed windows, so that the APIs can read them back.

Each (kind, key) is one time series in the storage namespace ``windows``: one point per window,
at its start (milliseconds), whose value is a ``WindowPoint`` in msgpack. Series names allow
only ``[A-Za-z0-9_.:-]``, and services and models may be named with anything, so a series is
named by a digest of its key (``tumbling.<24 hex>``) and the key itself is a document in the
same namespace under that digest (``key.<24 hex>``), which ``DocList(prefix="key.")`` lists.
Writing a window twice (a processor replaying after a crash) rewrites the same point.
"""
from __future__ import annotations

from hashlib import blake2b
from typing import Any, Literal

import msgspec

NS = "windows"
Kind = Literal["tumbling", "sliding"]
KeyT = tuple[str, str, str, str]  # service, model, variant ("" for none), operation


class WindowKey(msgspec.Struct, frozen=True):
    service: str
    model: str
    variant: str
    operation: str

    def as_tuple(self) -> KeyT:
        return (self.service, self.model, self.variant, self.operation)


class WindowPoint(msgspec.Struct):
    kind: Kind
    start_ns: int
    end_ns: int
    key: WindowKey
    summary: dict[str, Any]


def key_digest(key: KeyT) -> str:
    return blake2b("\x1f".join(key).encode(), digest_size=12).hexdigest()


def series_name(kind: Kind, key: KeyT) -> str:
    return f"{kind}.{key_digest(key)}"


def key_doc_id(key: KeyT) -> str:
    return f"key.{key_digest(key)}"


_encoder = msgspec.msgpack.Encoder()
_point_decoder = msgspec.msgpack.Decoder(WindowPoint)
_key_decoder = msgspec.msgpack.Decoder(WindowKey)


def encode_point(point: WindowPoint) -> bytes:
    return _encoder.encode(point)


def decode_point(data: bytes) -> WindowPoint:
    return _point_decoder.decode(data)


def encode_key(key: KeyT) -> bytes:
    return _encoder.encode(WindowKey(*key))


def decode_key(data: bytes) -> WindowKey:
    return _key_decoder.decode(data)
