"""Short-lived per-process cache of GET answers, for the list and read routes that many clients
poll: encoded bodies for the REST API, the operations' results for the gRPC API
(workers/rest_api/operations.py).

A list answer costs a storage round trip; the same page asked again within ``ttl_s`` is served
from here (after authentication, authorization and the rate limit, which always run). Any
state-changing call served by this process clears the cache, so a client sees its own writes at
once; changes made elsewhere (the processor, another API process) show within ``ttl_s``. The
cache holds at most ``max_entries`` answers of at most ``MAX_BODY`` bytes each (as encoded; a
result object is a page the route bounds).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_BODY = 256 * 1024


@dataclass(frozen=True, slots=True)
class Cached:
    expires: float
    status: int
    body: Any  # REST: the encoded bytes; gRPC: the operation's result


class ResponseCache:
    def __init__(self, ttl_s: float, max_entries: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.entries: OrderedDict[str, Cached] = OrderedDict()

    def get(self, key: str) -> Cached | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        if hit.expires <= time.monotonic():
            del self.entries[key]
            return None
        return hit

    def put(self, key: str, status: int, body: Any, size: int = 0) -> None:
        if self.ttl_s <= 0 or size > MAX_BODY:
            return
        self.entries[key] = Cached(time.monotonic() + self.ttl_s, status, body)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
