"""From validated events to the durable event log: what every ingest path shares.

``IngestPipeline.submit`` appends accepted events to the event log and returns only once they
are durable, so that an ingest path may then acknowledge its client. Rejected inputs go to the
dead-letter log with their reason: counted, listable, never silently dropped. Backpressure is a
bound on events in flight: past it, ``Overloaded`` tells the path to answer 503 with
Retry-After instead of letting memory grow.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from ipc import storage as s
from ipc.events import ACCEPTED as EVENT_KEYS
from ipc.events import LLMEvent, encode_event
from ipc.prices import PriceTable
from workers import tracing
from workers.eventlog import EventLogError, Producer
from workers.resilience import CircuitBreaker, CircuitOpen
from workers.storage_client import StorageClient

log = logging.getLogger("workers.collector.pipeline")
DEAD_LETTER_LOG = "collector.dead-letters"
BREAKER_FAILURES = 3     # failed appends in a row that open the circuit
BREAKER_RECOVERY = 2.0   # seconds before a trial append is let through

ACCEPTED = Counter("collector_events_accepted", "Events written to the event log.", ["source"])
REJECTED = Counter("collector_events_rejected", "Events refused, by reason.",
                   ["source", "reason"])
DEAD_LETTERS = Counter("collector_dead_letters", "Refused inputs kept in the dead-letter log.",
                       ["source"])
IN_FLIGHT = Gauge("collector_events_in_flight", "Events accepted and not yet durable.",
                  multiprocess_mode="livesum")
INGEST_SECONDS = Histogram("collector_ingest_seconds",
                           "From a request's arrival to its events being durable.", ["source"],
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))


class Refused(Exception):
    """Nothing was acknowledged: the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Refused):
    """Too many events in flight (503, RESOURCE_EXHAUSTED, a paused Kafka partition)."""

    def __init__(self, retry_after: float):
        super().__init__(f"collector overloaded; retry after {retry_after:g} s", retry_after)


class NotDurable(Refused):
    """The event log did not take the events (503, UNAVAILABLE): not acknowledged."""


class IngestPipeline:
    def __init__(self, producer: Producer, storage: StorageClient, prices: PriceTable,
                 max_in_flight: int):
        self.producer, self.storage, self.prices = producer, storage, prices
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        # A failing event log is not waited on by every request: after a few failures in a row
        # requests are refused at once until a trial append gets through.
        self.breaker = CircuitBreaker("event-log", failure_threshold=BREAKER_FAILURES,
                                      recovery_timeout=BREAKER_RECOVERY,
                                      failure_types=(EventLogError,))

    async def submit(self, source: str, events: Sequence[LLMEvent], started: float) -> None:
        """Append ``events`` durably; raises Overloaded or NotDurable instead of acknowledging."""
        if not events:
            return
        # A batch larger than the bound on its own is let through when nothing else is in
        # flight (bodies are bounded by max_body_mb), or it would be refused forever.
        if self.in_flight and self.in_flight + len(events) > self.max_in_flight:
            raise Overloaded(retry_after=1.0)
        self.in_flight += len(events)
        IN_FLIGHT.inc(len(events))
        try:
            with tracing.span("collector.ingest", {"ingest.source": source,
                                                   "ingest.events": len(events)}):
                async with self.breaker:
                    # Cost from the price table where the event brought none.
                    await self.producer.append([encode_event(self.prices.with_cost(e))
                                                for e in events])
        except CircuitOpen as exc:
            raise NotDurable(f"the event log is failing; {exc}",
                             retry_after=max(1.0, exc.retry_after)) from exc
        except EventLogError as exc:
            log.warning("append of %d %s events failed: %s", len(events), source, exc)
            raise NotDurable(str(exc)) from exc
        finally:
            self.in_flight -= len(events)
            IN_FLIGHT.dec(len(events))
        ACCEPTED.labels(source).inc(len(events))
        INGEST_SECONDS.labels(source).observe(time.monotonic() - started)

    async def dead_letter(self, source: str, rejected: Sequence[tuple[Any, str, str]]) -> None:
        """Keep refused inputs (original, field path, reason) in the dead-letter log."""
        if not rejected:
            return
        records = []
        for original, path, reason in rejected:
            REJECTED.labels(source, rejection_label(path)).inc()
            records.append(json.dumps({"source": source, "path": path, "reason": reason,
                                       "at_ms": time.time_ns() // 1_000_000,
                                       "original": original}, default=repr).encode())
        try:
            await self.storage.append(DEAD_LETTER_LOG, records)
        except s.StorageFailure as exc:  # the client still learns why; we log what we lost
            log.error("%d rejected %s events not kept in the dead-letter log: %s",
                      len(records), source, exc)
            return
        DEAD_LETTERS.labels(source).inc(len(records))


def rejection_label(path: str) -> str:
    """The field a rejection is about, as a metric label: one of the event's keys, or "other"
    (never the raw input, so that a client cannot create labels without bound)."""
    field = path.rsplit(".", 1)[-1].split("[", 1)[0]
    return field if field in EVENT_KEYS else "other"
