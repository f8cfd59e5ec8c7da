"""Recent events by id, so that feedback arriving after its event can be joined to it.

A quality score (``POST /v1/feedback``) names only an event id; to count it in the right
window the processor must know that event's key and time. This keeps the last ``capacity``
events' (key, time) by id digest, in arrival order, oldest forgotten first: bounded memory,
and feedback for an event older than that is counted as unmatched instead of guessed.
"""
from __future__ import annotations

from collections import OrderedDict
from hashlib import blake2b

import msgspec

from ipc.window_series import KeyT

DEFAULT_CAPACITY = 100_000


def _digest(event_id: str) -> bytes:
    return blake2b(event_id.encode(), digest_size=16).digest()


class _State(msgspec.Struct, array_like=True):
    capacity: int
    keys: list[tuple[str, str, str, str]]
    entries: list[tuple[bytes, int, int]]  # digest, index into keys, time_ns


class RecentEvents:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._entries: OrderedDict[bytes, tuple[KeyT, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, event_id: str, key: KeyT, time_ns: int) -> None:
        self._entries[_digest(event_id)] = (key, time_ns)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def find(self, event_id: str) -> tuple[KeyT, int] | None:
        return self._entries.get(_digest(event_id))

    def to_bytes(self) -> bytes:
        index: dict[KeyT, int] = {}
        entries = [(d, index.setdefault(key, len(index)), t)
                   for d, (key, t) in self._entries.items()]
        return msgspec.msgpack.encode(_State(self.capacity, list(index), entries))

    @classmethod
    def from_bytes(cls, data: bytes) -> RecentEvents:
        state = msgspec.msgpack.decode(data, type=_State)
        recent = cls(state.capacity)
        keys = [tuple(k) for k in state.keys]
        for digest, i, time_ns in state.entries:
            recent._entries[digest] = (keys[i], time_ns)
        return recent
