"""Per-client rate limits on the push ingest paths (JSON, OTLP/HTTP, OTLP/gRPC).

A client is the value of ``[collector] rate_limit_key_header`` (an API key, a tenant id) when
the request carries it, else its peer address. Each client has a token bucket of
``rate_limit_events_per_s`` events a second with a burst of ``rate_limit_burst``; a request
costs one token per item it carries (events, spans), counted before validation since invalid
items are work too. A batch larger than the burst is taken once the bucket is full and leaves
it in debt, so the sustained rate holds whatever the batch size. Over budget, the request is
refused whole (HTTP 429, gRPC RESOURCE_EXHAUSTED) with the wait in Retry-After / RetryInfo.

Header values are kept only as a keyed digest, so API keys are not held in memory in clear.
Buckets are per collector process: with ``processes = N`` a client may get up to N times the
rate if its connections spread over the processes.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from prometheus_client import Counter

from ipc.config import CollectorSection
from workers.collector.pipeline import Refused
from workers.resilience import TokenBucket

RATE_LIMITED = Counter("collector_rate_limited",
                       "Items (events, spans) refused because their client was over its rate.",
                       ["source"])


class OverBudget(Refused):
    """The client sent more than its rate allows: HTTP 429, nothing acknowledged."""


class ClientLimits:
    def __init__(self, events_per_s: float, burst: int, key_header: str):
        self.key_header = key_header.lower()
        self.bucket = TokenBucket(events_per_s, burst or events_per_s, allow_debt=True)
        self._salt = os.urandom(16)  # per process: digests are never compared across them

    @classmethod
    def from_section(cls, section: CollectorSection) -> ClientLimits | None:
        if section.rate_limit_events_per_s <= 0:
            return None
        return cls(section.rate_limit_events_per_s, section.rate_limit_burst,
                   section.rate_limit_key_header)

    def client_of(self, headers: Mapping[str, str], peer: str | None) -> str:
        value = headers.get(self.key_header) if self.key_header else None
        if value:
            digest = hashlib.blake2b(value.encode(), key=self._salt, digest_size=16)
            return "key:" + digest.hexdigest()
        return "peer:" + (peer or "unknown")

    def admit(self, source: str, client: str, items: int) -> None:
        """Take ``items`` tokens from ``client``'s bucket or raise OverBudget."""
        if items <= 0:
            return
        wait = self.bucket.retry_after(client, items, take=True)
        if wait:
            RATE_LIMITED.labels(source).inc(items)
            raise OverBudget(f"rate limit of {self.bucket.rate:g} events/s for this client "
                             f"exceeded; retry after {wait:.2f} s", retry_after=wait)
