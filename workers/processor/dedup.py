"""Duplicate event ids over a bounded event-time horizon, in bounded memory.

Why: clients retry, and the collector can deliver an event twice after a crash, but a
processor cannot remember every id forever. Ids are kept in time buckets of ``bucket_s`` by
event time; a bucket is forgotten once it ends more than ``horizon_s`` before the watermark
(a duplicate that late is also too late for any window). ``max_ids`` is a hard cap: past it
the oldest buckets go first, and ``pressure_evictions`` counts the ids lost that way, since
their duplicates would then be counted twice.

An id is stored as its 16-byte BLAKE2b digest: fixed size whatever the client sends, and a
collision needs about 2**64 ids.
"""
from __future__ import annotations

from hashlib import blake2b

import msgspec
from msgspec import Struct

NS = 1_000_000_000
FORMAT_VERSION = 1


class DedupDecodeError(ValueError):
    """Bytes that are not a serialized Deduplicator of a known version."""


class _State(Struct, array_like=True):
    version: int
    horizon_s: int
    max_ids: int
    bucket_s: int
    pressure_evictions: int
    horizon_evictions: int
    too_old: int
    buckets: list[tuple[int, list[bytes]]]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_State)


class Deduplicator:
    """``seen(id, time, watermark)``: has this id been seen within the horizon?"""

    def __init__(self, horizon_s: int = 600, max_ids: int = 2_000_000, bucket_s: int = 60):
        if horizon_s <= 0 or max_ids <= 0 or bucket_s <= 0:
            raise ValueError("horizon_s, max_ids and bucket_s must be positive")
        self._config = (horizon_s, max_ids, bucket_s)
        self.horizon_ns = int(horizon_s * NS)
        self.max_ids = max_ids
        self.bucket_ns = int(bucket_s * NS)
        self._ids: set[bytes] = set()
        self._buckets: dict[int, list[bytes]] = {}  # bucket start -> digests
        self._expire_below = -(2 ** 63)  # buckets ending at or before this are gone
        self.pressure_evictions = 0  # ids forgotten early because of max_ids
        self.horizon_evictions = 0
        self.too_old = 0  # ids older than the horizon: neither checked nor kept

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, event_id: str, time_ns: int, watermark_ns: int) -> bool:
        """True if ``event_id`` was seen before (a duplicate); else remember it."""
        threshold = watermark_ns - self.horizon_ns
        if threshold > self._expire_below:
            self._expire_below = threshold
            self._expire(threshold)
        bucket = time_ns - time_ns % self.bucket_ns
        if bucket + self.bucket_ns <= self._expire_below:
            self.too_old += 1
            return False
        digest = blake2b(event_id.encode(), digest_size=16).digest()
        if digest in self._ids:
            return True
        self._ids.add(digest)
        ids = self._buckets.get(bucket)
        if ids is None:
            self._buckets[bucket] = [digest]
        else:
            ids.append(digest)
        if len(self._ids) > self.max_ids:
            self._shed()
        return False

    def _drop(self, bucket: int) -> int:
        ids = self._buckets.pop(bucket)
        for digest in ids:
            self._ids.discard(digest)
        return len(ids)

    def _expire(self, threshold: int) -> None:
        for bucket in [b for b in self._buckets if b + self.bucket_ns <= threshold]:
            self.horizon_evictions += self._drop(bucket)

    def _shed(self) -> None:
        """Over ``max_ids``: drop whole buckets, oldest first."""
        for bucket in sorted(self._buckets):
            if len(self._ids) <= self.max_ids:
                break
            self.pressure_evictions += self._drop(bucket)

    def to_bytes(self) -> bytes:
        horizon_s, max_ids, bucket_s = self._config
        return _encoder.encode(_State(
            FORMAT_VERSION, horizon_s, max_ids, bucket_s, self.pressure_evictions,
            self.horizon_evictions, self.too_old, sorted(self._buckets.items())))

    @classmethod
    def from_bytes(cls, data: bytes) -> Deduplicator:
        try:
            state = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DedupDecodeError(f"not a serialized Deduplicator: {exc}") from None
        if state.version != FORMAT_VERSION:
            raise DedupDecodeError(f"unsupported Deduplicator format {state.version}")
        try:
            self = cls(state.horizon_s, state.max_ids, state.bucket_s)
        except ValueError as exc:
            raise DedupDecodeError(str(exc)) from None
        for bucket, ids in state.buckets:
            self._buckets[bucket] = list(ids)
            self._ids.update(ids)
        self.pressure_evictions, self.horizon_evictions = \
            state.pressure_evictions, state.horizon_evictions
        self.too_old = state.too_old
        return self
