"""Kafka ingest: a consumer group on ``[collector.kafka] topic``, one LLM event per record.

A record's value is one event in the JSON shape of ``POST /v1/events`` (an object, validated by
``parse_json_event``), as JSON or msgpack (``value_format``; ``auto`` tells them apart by the
first byte). Valid events go through the ``IngestPipeline`` (source ``kafka``) into the event
log; a malformed record is produced to ``dead_letter_topic`` with its original key and value,
and headers ``reason``, ``path``, ``source.topic``, ``source.partition``, ``source.offset``.

Offsets are committed (manually, synchronously, per partition) only after every record below
them is durable: its event appended to the event log, or the record delivered to the
dead-letter topic. A crash thus loses nothing acknowledged; what was not committed is delivered
again (the processor drops duplicate event ids). A new group starts at the earliest offset, so
records produced before its first assignment are read too.

Backpressure: when the pipeline answers Overloaded or NotDurable (or the dead-letter topic does
not take a record), the consumer pauses its partitions, keeps the records it holds and retries
them with backoff, still polling (so that it stays in the group and sees rebalances); once they
are through it commits and resumes. Records of partitions revoked meanwhile are dropped: their
next owner reads them again from the committed offset.

The consumer and the dead-letter producer are the event log's (``workers.eventlog.kafka``),
configured from ``[collector.kafka]``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from ipc.config import EventLogSection, KafkaIngestSection
from ipc.events import EventRejected, LLMEvent, parse_json_event
from workers.collector.pipeline import (
    DEAD_LETTERS,
    REJECTED,
    IngestPipeline,
    NotDurable,
    Refused,
    rejection_label,
)
from workers.eventlog import ConsumedRecord, EventLogError
from workers.eventlog.kafka import (
    CONSUMER_DEFAULTS,
    CONSUMER_FIXED,
    PRODUCER_DEFAULTS,
    PRODUCER_FIXED,
    KafkaConsumer,
    KafkaProducer,
    _merge,
)

log = logging.getLogger("workers.collector.kafka")

SOURCE = "kafka"
MAX_RECORDS = 500          # records per poll, and so per append to the event log
POLL_TIMEOUT = 0.5         # seconds; also how soon stop() is noticed
RETRY_MIN, RETRY_MAX = 0.2, 5.0  # backoff while the pipeline refuses (seconds)
WHERE = "[collector.kafka] client_options"
# A new group must not skip what was produced before its first assignment.
INGEST_CONSUMER_FIXED = {**CONSUMER_FIXED, "auto.offset.reset": (
    "earliest", {"earliest", "smallest", "beginning"})}


def consumer_conf(section: KafkaIngestSection) -> dict[str, Any]:
    conf = _merge(CONSUMER_DEFAULTS, INGEST_CONSUMER_FIXED, section.client_options, WHERE)
    conf["bootstrap.servers"] = section.bootstrap_servers
    conf["group.id"] = section.group_id
    return conf


def producer_conf(section: KafkaIngestSection) -> dict[str, Any]:
    """The dead-letter producer's: idempotent, acks=all."""
    conf = _merge(PRODUCER_DEFAULTS, PRODUCER_FIXED, section.client_options, WHERE)
    conf["bootstrap.servers"] = section.bootstrap_servers
    return conf


# --- decoding -------------------------------------------------------------------------------

class Malformed(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


_MSGPACK_MAP = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_WHITESPACE = b" \t\r\n"


def decode_value(value: bytes, value_format: str) -> Any:
    """A record's value as a decoded object (not yet validated), or Malformed."""
    if not value:
        raise Malformed("value", "empty record value; expected one event")
    fmt = value_format
    if fmt == "auto":
        first = value.lstrip(_WHITESPACE)[:1]
        fmt = "msgpack" if first and first[0] in _MSGPACK_MAP else "json"
    if fmt == "msgpack":
        try:
            obj = msgspec.msgpack.decode(value)
        except msgspec.DecodeError as exc:
            raise Malformed("value", f"not msgpack: {exc}") from None
        if isinstance(obj, dict) and isinstance(obj.get("time"), datetime) \
                and obj["time"].tzinfo is not None:
            obj["time"] = obj["time"].isoformat()  # the msgpack timestamp type (microseconds)
        return obj
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        what = "not JSON" + (" (nor msgpack)" if value_format == "auto" else "")
        raise Malformed("value", f"{what}: {exc}") from None


def parse_record(value: bytes, value_format: str) -> LLMEvent:
    """One record's value -> LLMEvent, or Malformed with the field path (``value.KEY``)."""
    obj = decode_value(value, value_format)
    try:
        return parse_json_event(obj, 0)
    except EventRejected as exc:
        raise Malformed("value" + exc.path.removeprefix("events[0]"), exc.reason) from None


# --- the consumer loop ----------------------------------------------------------------------

@dataclass(slots=True)
class _Item:
    """A consumed record, parsed, and whether it is through (durable event or dead letter)."""

    record: ConsumedRecord
    event: LLMEvent | None
    path: str = ""
    reason: str = ""
    done: bool = False


class KafkaIngest:
    def __init__(self, section: KafkaIngestSection, pipeline: IngestPipeline):
        self.section, self.pipeline = section, pipeline
        self.topic = section.topic
        # Both configurations are checked here: an error is an EventLogError naming the key.
        self._consumer_conf, self._producer_conf = consumer_conf(section), producer_conf(section)
        self.consumer: KafkaConsumer | None = None
        self.dead_letters: KafkaProducer | None = None
        self.pending: list[_Item] = []
        self.paused = False
        self.retry_delay = 0.0
        self.retry_at = 0.0
        self.uncommitted: dict[int, int] = {}  # partition -> highest offset durable, to commit
        self.committed: dict[int, int] = {}    # partition -> offset committed (next to read)
        self.last_error = ""
        self.consumed = self.dead_lettered = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the clients (connecting happens in the background) and start consuming."""
        section = self.section
        self.dead_letters = KafkaProducer(
            EventLogSection(backend="kafka", log=section.dead_letter_topic,
                            kafka_bootstrap=section.bootstrap_servers), conf=self._producer_conf)
        try:
            self.consumer = KafkaConsumer(
                EventLogSection(backend="kafka", log=section.topic,
                                kafka_bootstrap=section.bootstrap_servers),
                section.group_id, conf=self._consumer_conf)
        except BaseException:
            await self.dead_letters.close()
            raise
        self._task = asyncio.create_task(self._run(), name="kafka-ingest")
        log.info("Kafka ingest: topic %s, group %s, dead letters to %s", self.topic,
                 self.section.group_id, self.section.dead_letter_topic)

    async def stop(self) -> None:
        """Finish the batch in hand (if the pipeline takes it), commit, leave the group."""
        self._stop.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            try:
                if self.consumer is not None:
                    await self.consumer.close()  # commits nothing: the rest is read again
            finally:
                if self.dead_letters is not None:
                    await self.dead_letters.close()

    def status(self) -> dict[str, Any]:
        return {"topic": self.topic, "group": self.section.group_id,
                "assigned": sorted(self.consumer.assigned_partitions) if self.consumer else [],
                "paused": self.paused,
                "pending": len(self.pending), "consumed": self.consumed,
                "dead_lettered": self.dead_lettered, "committed": dict(self.committed),
                "last_error": self.last_error}

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._step()
            except EventLogError as exc:  # the consumer: librdkafka retries by itself
                self.last_error = str(exc)
                log.warning("Kafka ingest: %s", exc)
                await self._sleep(1.0)
            except Exception:
                log.exception("Kafka ingest: unexpected error")
                await self._sleep(1.0)
        if self.uncommitted:
            try:
                await self._commit()
            except EventLogError as exc:
                log.warning("Kafka ingest: last commit failed (its records will be read "
                            "again): %s", exc)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _step(self) -> None:
        if self.paused:
            # Keep polling: rebalances are served in poll, and records of partitions assigned
            # meanwhile (or buffered before the pause) join what is held.
            wait = min(POLL_TIMEOUT, max(0.0, self.retry_at - time.monotonic()))
            self._take(await self.consumer.poll(MAX_RECORDS, wait))
            if self.consumer.assigned_partitions:
                self.consumer.pause()  # partitions assigned since are paused too
            if time.monotonic() < self.retry_at:
                return
        elif not self.pending:
            self._take(await self.consumer.poll(MAX_RECORDS, POLL_TIMEOUT))
            if not self.pending:
                if self.uncommitted:
                    await self._commit()
                return
        assigned = self.consumer.assigned_partitions
        self.pending = [i for i in self.pending if i.record.partition in assigned]
        try:
            await self._ingest(self.pending)
        except Refused as exc:
            self._back_off(exc)
            return
        done, self.pending = self.pending, []
        for item in done:
            p, o = item.record.partition, item.record.offset
            if o > self.uncommitted.get(p, -1):
                self.uncommitted[p] = o
        if self.paused:
            self.consumer.resume()
            self.paused = False
            self.retry_delay = 0.0
            log.info("Kafka ingest: resumed topic %s", self.topic)
        await self._commit()

    def _take(self, records: list[ConsumedRecord]) -> None:
        for record in records:
            self.consumed += 1
            try:
                self.pending.append(_Item(record, parse_record(record.payload,
                                                               self.section.value_format)))
            except Malformed as exc:
                self.pending.append(_Item(record, None, exc.path, exc.reason))

    async def _ingest(self, items: list[_Item]) -> None:
        """Every item through: events durable, malformed records dead-lettered; raises
        Overloaded or NotDurable if not (items done so far stay done)."""
        started = time.monotonic()
        events = [i for i in items if i.event is not None and not i.done]
        # In chunks the pipeline can take at all (a batch over max_in_flight never fits).
        size = max(1, min(MAX_RECORDS, self.pipeline.max_in_flight))
        for n in range(0, len(events), size):
            chunk = events[n:n + size]
            await self.pipeline.submit(SOURCE, [i.event for i in chunk], started)
            for item in chunk:
                item.done = True
        bad = [i for i in items if i.event is None and not i.done]
        if not bad:
            return
        try:
            await self.dead_letters.append_records([(i.record.key, i.record.payload, [
                ("reason", f"{i.path}: {i.reason}".encode()),
                ("path", i.path.encode()),
                ("source.topic", self.topic.encode()),
                ("source.partition", str(i.record.partition).encode()),
                ("source.offset", str(i.record.offset).encode()),
            ]) for i in bad])
        except EventLogError as exc:
            raise NotDurable(f"dead-letter topic {self.section.dead_letter_topic}: {exc}") \
                from exc
        for item in bad:
            item.done = True
            REJECTED.labels(SOURCE, rejection_label(item.path)).inc()
        DEAD_LETTERS.labels(SOURCE).inc(len(bad))
        self.dead_lettered += len(bad)

    def _back_off(self, exc: Refused) -> None:
        floor = max(exc.retry_after, RETRY_MIN)
        self.retry_delay = min(RETRY_MAX, max(floor, self.retry_delay * 2, RETRY_MIN))
        self.retry_at = time.monotonic() + self.retry_delay
        self.last_error = str(exc)
        if not self.paused:
            self.paused = True
            log.warning("Kafka ingest: pausing topic %s (%d records held): %s", self.topic,
                        len(self.pending), exc)
        self.consumer.pause()

    async def _commit(self) -> None:
        """Commit every partition's highest durable offset (never moving one back)."""
        assigned = self.consumer.assigned_partitions
        # A partition this member lost may be committed further by others meanwhile.
        self.committed = {p: o for p, o in self.committed.items() if p in assigned}
        todo = {p: o for p, o in self.uncommitted.items()
                if p in assigned and o + 1 > self.committed.get(p, -1)}
        self.uncommitted = {p: o for p, o in self.uncommitted.items() if p in todo}
        if not todo:
            return
        await self.consumer.commit([ConsumedRecord(p, o, 0, b"") for p, o in todo.items()])
        for p, o in todo.items():
            self.committed[p] = o + 1
            if self.uncommitted.get(p) == o:
                del self.uncommitted[p]
