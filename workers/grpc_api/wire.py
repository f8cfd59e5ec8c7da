"""Protobuf wire bytes written directly, for the one place where building messages field by field
costs too much: the event stream converts every record's JSON body to a
``google.protobuf.Struct``. ``struct_bytes`` writes the Struct of a decoded JSON object (what
``Struct.update`` would build, with the same value kinds) in 14 µs where ``Struct.update``
takes 24 (a 600-byte proposal body, measured), and a message embedding such bytes is parsed
once with ``FromString`` (upb, in C) instead of being built field by field: the event
stream's conversion went from ~37 to ~22 µs per event.

Wire format: https://protobuf.dev/programming-guides/encoding/ (a Struct is a map<string,
Value>: one length-delimited entry {1: key, 2: Value} per key)."""
from __future__ import annotations

import struct
from typing import Any

from workers.grpc_api.convert import NS

_DOUBLE = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    """The varint of a non-negative integer."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SHORT = [varint(n) for n in range(0x80)]


def _length(n: int) -> bytes:
    if n < 0x80:
        return _SHORT[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    return varint(n)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte (field number << 3 | 2), length and payload."""
    return tag + _length(len(payload)) + payload


def timestamp_bytes(ns: int) -> bytes:
    """The google.protobuf.Timestamp {seconds = 1, nanos = 2} of positive nanoseconds (zero
    fields left out, as the runtime does)."""
    seconds, nanos = divmod(ns, NS)
    return (b"\x08" + varint(seconds) if seconds else b"") + (
        b"\x10" + varint(nanos) if nanos else b"")


# Value's oneof: null_value = 1 (varint), number_value = 2 (double), string_value = 3,
# bool_value = 4 (varint), struct_value = 5, list_value = 6; ListValue: repeated values = 1.
_NULL, _TRUE, _FALSE = b"\x08\x00", b"\x20\x01", b"\x20\x00"


def value_bytes(value: Any) -> bytes:
    """The google.protobuf.Value of a JSON value: TypeError for anything else, ValueError for
    what a Value cannot hold (a number beyond a double, a string that is not Unicode)."""
    kind = type(value)
    if kind is str:
        data = value.encode()
        return b"\x1a" + _length(len(data)) + data
    if kind is float or kind is int:
        try:
            return b"\x11" + _DOUBLE(value)
        except struct.error:
            raise ValueError(f"{value} is beyond a double") from None
    if kind is bool:
        return _TRUE if value else _FALSE
    if value is None:
        return _NULL
    if kind is dict:
        return field(b"\x2a", struct_bytes(value))
    if kind is list:
        return field(b"\x32", b"".join([field(b"\x0a", value_bytes(item)) for item in value]))
    raise TypeError(f"{kind.__name__} is not a JSON value")


def struct_bytes(obj: dict[str, Any]) -> bytes:
    """The google.protobuf.Struct of a decoded JSON object, in its key order."""
    parts: list[bytes] = []
    for key, value in obj.items():
        k, v = key.encode(), value_bytes(value)
        nk, nv = len(k), len(v)
        if nk + nv < 0x7C:  # every length fits one byte: the common case
            parts += (b"\x0a", _SHORT[nk + nv + 4], b"\x0a", _SHORT[nk], k, b"\x12", _SHORT[nv], v)
        else:
            parts.append(field(b"\x0a", field(b"\x0a", k) + field(b"\x12", v)))
    return b"".join(parts)
