"""The Kafka event log: a topic whose partitions the consumers of a group share (confluent-kafka).

Producer: idempotent, ``acks=all``; ``append`` produces every payload (with the key, if any, so
that related events stay in order within one partition) and returns once librdkafka reported
every one delivered, i.e. acknowledged by all in-sync replicas. Delivery reports are served by
a background thread that polls the client; they resolve an asyncio future through
``loop.call_soon_threadsafe``, so the event loop never blocks. A failed delivery (timeout, broker
error, fatal idempotence error) raises ``EventLogError`` with librdkafka's reason; after a fatal
error the next ``append`` starts a fresh client.

Consumer: ``enable.auto.commit=False`` and ``auto.offset.reset=earliest``; offsets move only by
``commit(records)``, which commits, per partition, the highest offset + 1 synchronously. A
reader that keeps its positions with its state (the processor) hands them to ``resume_from``,
and the first assignment starts there instead of at the committed offsets. ``poll``
runs librdkafka in a worker thread and returns as soon as a record arrived (or after
``timeout``). Rebalances: a revoke commits nothing (whatever was not committed is re-delivered to
the partition's next owner; the processor drops duplicates by event id) and drops the revoked
partitions from the local assignment, so that records of partitions this consumer no longer owns
are not committed by it. ``pause``/``resume`` stop and restart fetching (backpressure: the
records already returned stay the caller's, and fetching resumes after the last of them).

``[event_log] kafka_client_options`` are merged into both clients' librdkafka configuration; they
may tune anything except the settings the guarantees above rest on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from ipc.config import EventLogSection
from workers.eventlog import ConsumedRecord, Consumer, EventLogError, Producer

log = logging.getLogger("workers.eventlog.kafka")

PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,                      # small batches under load, ~no added latency idle
    "batch.num.messages": 10000,
    "batch.size": 1048576,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",     # the Java client's partitioning of keyed records
    "message.timeout.ms": 30000,         # a delivery report (success or error) within 30 s
    "socket.keepalive.enable": True,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "enable.partition.eof": False,
    "session.timeout.ms": 45000,
    "max.poll.interval.ms": 300000,
    "socket.keepalive.enable": True,
}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
# Settings the guarantees rest on: option -> (value we set, spellings accepted from the config).
PRODUCER_FIXED: dict[str, tuple[Any, set[str]]] = {
    "enable.idempotence": (True, _TRUE),
    "acks": ("all", {"all", "-1"}),
    "request.required.acks": ("all", {"all", "-1"}),
}
CONSUMER_FIXED: dict[str, tuple[Any, set[str]]] = {
    "enable.auto.commit": (False, _FALSE),
    "enable.auto.offset.store": (False, _FALSE),
}
# Neither client may take these from kafka_client_options: they come from elsewhere.
RESERVED = {"bootstrap.servers", "metadata.broker.list", "group.id", "on_delivery",
            "error_cb", "logger", "on_commit", "stats_cb"}

CLOSE_FLUSH_TIMEOUT = 10.0
ERROR_LOG_INTERVAL = 30.0  # seconds between two warnings about the same recurring client error


def _merge(defaults: dict[str, Any], fixed: dict[str, tuple[Any, set[str]]],
           extra: dict[str, Any], where: str = "[event_log] kafka_client_options"
           ) -> dict[str, Any]:
    """``defaults`` updated with ``extra`` (the options of the config key ``where``), which may
    neither set RESERVED keys nor change the ``fixed`` ones."""
    conf = dict(defaults)
    for key, value in extra.items():
        if key in RESERVED:
            raise EventLogError(
                f"{where} may not set {key!r}: it is set from other keys (the bootstrap "
                f"servers, the consumer group) or by the client itself (its callbacks)")
        if key in fixed and str(value).strip().lower() not in fixed[key][1]:
            raise EventLogError(
                f"{where} sets {key}={value!r}, but {fixed[key][0]!r} is needed for the "
                f"delivery guarantees")
        conf[key] = value
    for key, (value, _) in fixed.items():
        if key != "request.required.acks":
            conf[key] = value
    conf.pop("request.required.acks", None)  # an alias of acks, which is set
    return conf


def producer_config(section: EventLogSection) -> dict[str, Any]:
    """The producer's librdkafka configuration (without callbacks)."""
    conf = _merge(PRODUCER_DEFAULTS, PRODUCER_FIXED, section.kafka_client_options)
    conf["bootstrap.servers"] = section.kafka_bootstrap
    return conf


def consumer_config(section: EventLogSection, group: str) -> dict[str, Any]:
    """The consumer's librdkafka configuration (without callbacks)."""
    conf = _merge(CONSUMER_DEFAULTS, CONSUMER_FIXED, section.kafka_client_options)
    conf["bootstrap.servers"] = section.kafka_bootstrap
    conf["group.id"] = group
    return conf


def _reason(err: KafkaError | Any) -> str:
    if isinstance(err, KafkaError):
        return f"{err.name()}: {err.str()}"
    return str(err)


class _ErrorLog:
    """Client-level errors (error_cb) logged at most once per ERROR_LOG_INTERVAL per code."""

    def __init__(self, what: str):
        self.what = what
        self.last: dict[int, float] = {}

    def __call__(self, err: KafkaError) -> None:
        now = time.monotonic()
        code = err.code()
        if now - self.last.get(code, -ERROR_LOG_INTERVAL) >= ERROR_LOG_INTERVAL or err.fatal():
            self.last[code] = now
            log.warning("%s: %s%s", self.what, _reason(err), " (fatal)" if err.fatal() else "")


# --- producer ------------------------------------------------------------------------------------

class _Batch:
    """The delivery reports of one ``append``: counted in the polling thread, the result handed
    to the event loop once, when the last report arrived."""

    __slots__ = ("delivered", "failed", "future", "lock", "loop", "produced", "reason", "sealed")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.produced = self.delivered = self.failed = 0
        self.reason: str | None = None
        self.sealed = False
        self.lock = threading.Lock()

    def on_delivery(self, err: KafkaError | None, msg: Any) -> None:  # any thread
        with self.lock:
            self.delivered += 1
            if err is not None:
                self.failed += 1
                if self.reason is None:
                    self.reason = _reason(err)
            done = self.sealed and self.delivered == self.produced
        if done:
            self._hand_over()

    def seal(self) -> None:
        """Every payload is produced: resolve as soon as (or if already) all are reported."""
        with self.lock:
            self.sealed = True
            done = self.delivered == self.produced
        if done:
            self._hand_over()

    def fail(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason
            self.failed = max(self.failed, 1)
        self._hand_over()

    def _hand_over(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _resolve(self) -> None:
        if self.future.done():  # cancelled by its waiter
            return
        if self.failed:
            self.future.set_exception(EventLogError(
                f"{self.failed} of {self.produced} records not delivered: {self.reason}"))
        else:
            self.future.set_result(None)


class _PollingClient:
    """A confluent_kafka.Producer and the daemon thread that serves its callbacks."""

    def __init__(self, conf: dict[str, Any], on_error: Callable[[KafkaError], None]):
        self.fatal: str | None = None
        self._on_error = on_error
        try:
            self.producer = confluent_kafka.Producer(
                {**conf, "error_cb": self._error, "logger": log})
        except (KafkaException, ValueError, TypeError) as exc:
            raise EventLogError(f"invalid Kafka producer configuration: {exc}") from exc
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="kafka-producer-poll",
                                       daemon=True)
        self.thread.start()

    def _error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = _reason(err)
        self._on_error(err)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                self.producer.poll(0.1)
            except Exception:  # a callback raised: keep serving the others
                log.exception("error in a Kafka producer callback")

    def shutdown(self, flush_timeout: float) -> int:
        """Flush (waiting at most ``flush_timeout``), purge what is left (its waiters get an
        error) and close. Blocking: run it in a thread. Returns the number of purged records."""
        left = 0
        try:
            left = self.producer.flush(flush_timeout) if flush_timeout > 0 else len(self.producer)
            if left:
                self.producer.purge(in_queue=True, in_flight=True, blocking=True)
                self.producer.flush(1.0)  # serves the purged records' delivery reports
        finally:
            self.stop.set()
            self.thread.join()
            try:
                self.producer.close()
            except Exception:  # close() is best effort
                log.debug("Kafka producer close failed", exc_info=True)
        return left


# A record for append_records: (key, value, headers).
Record = tuple[bytes | None, bytes, Sequence[tuple[str, bytes]] | None]


class KafkaProducer(Producer):
    def __init__(self, section: EventLogSection, conf: dict[str, Any] | None = None):
        """A producer to the topic ``section.log``; ``conf``: its librdkafka configuration,
        by default producer_config(section)."""
        self.topic = section.log
        self.conf = producer_config(section) if conf is None else conf
        self._errors = _ErrorLog(f"Kafka producer for topic {self.topic}")
        self._client = _PollingClient(self.conf, self._errors)
        self._pending: set[_Batch] = set()
        self._closed = False
        timeout_ms = self.conf.get("delivery.timeout.ms", self.conf["message.timeout.ms"])
        # librdkafka reports every record within message.timeout.ms; this is only a backstop.
        self._report_timeout = int(timeout_ms) / 1000.0 + 10.0

    async def append(self, payloads: Sequence[bytes], key: bytes | None = None) -> None:
        await self.append_records([(key, payload, None) for payload in payloads])

    async def append_records(self, records: Sequence[Record]) -> None:
        """Like ``append``, for records with their own key and headers each."""
        if self._closed:
            raise EventLogError(f"append to Kafka topic {self.topic}: the producer is closed")
        if not records:
            return
        if self._client.fatal is not None:
            await self._replace_client()
        client = self._client
        batch = _Batch(asyncio.get_running_loop())
        self._pending.add(batch)
        try:
            for n, (key, payload, headers) in enumerate(records, 1):
                await self._produce(client, batch, payload, key, headers)
                if n % 1000 == 0:
                    await asyncio.sleep(0)  # let other tasks run during a large batch
            batch.seal()
            try:
                await asyncio.wait_for(batch.future, self._report_timeout)
            except TimeoutError:
                raise EventLogError(
                    f"no delivery report within {self._report_timeout:g} s") from None
        except EventLogError as exc:
            raise EventLogError(f"append to Kafka topic {self.topic} failed: {exc}") from exc
        finally:
            self._pending.discard(batch)
            if not batch.future.done():
                batch.future.cancel()  # late reports are then ignored

    async def _produce(self, client: _PollingClient, batch: _Batch, payload: bytes,
                       key: bytes | None,
                       headers: Sequence[tuple[str, bytes]] | None = None) -> None:
        deadline = None
        while True:
            with batch.lock:
                batch.produced += 1
            try:
                client.producer.produce(self.topic, value=payload, key=key,
                                        headers=list(headers) if headers else None,
                                        on_delivery=batch.on_delivery)
                return
            except BufferError:
                # The local queue is full: wait for the polling thread to drain reports.
                with batch.lock:
                    batch.produced -= 1
                now = time.monotonic()
                deadline = deadline or now + self._report_timeout
                if now >= deadline:
                    raise EventLogError(
                        f"the producer's local queue stayed full for {self._report_timeout:g} s"
                    ) from None
                await asyncio.sleep(0.01)
            except (KafkaException, ValueError, TypeError) as exc:
                with batch.lock:
                    batch.produced -= 1
                reason = _reason(exc.args[0]) if isinstance(exc, KafkaException) and exc.args \
                    else str(exc)
                raise EventLogError(f"produce refused: {reason}") from exc

    async def _replace_client(self) -> None:
        old = self._client
        log.warning("Kafka producer for topic %s had a fatal error (%s): starting a new one",
                    self.topic, old.fatal)
        self._client = _PollingClient(self.conf, self._errors)
        await asyncio.to_thread(old.shutdown, 0.0)

    async def close(self, timeout: float = CLOSE_FLUSH_TIMEOUT) -> None:
        if self._closed:
            return
        self._closed = True
        left = await asyncio.to_thread(self._client.shutdown, timeout)
        if left:
            log.warning("Kafka producer for topic %s closed with %d records undelivered",
                        self.topic, left)
        for batch in list(self._pending):
            batch.fail("the producer was closed before their delivery")


# --- consumer ------------------------------------------------------------------------------------

# Errors after which polling again cannot help: raised instead of logged.
_PERMANENT = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
              KafkaError._INVALID_ARG, KafkaError._UNSUPPORTED_FEATURE}


class KafkaConsumer(Consumer):
    def __init__(self, section: EventLogSection, group: str,
                 conf: dict[str, Any] | None = None):
        """A member of ``group`` on the topic ``section.log``; ``conf``: its librdkafka
        configuration, by default consumer_config(section, group)."""
        self.topic, self.group = section.log, group
        self._errors = _ErrorLog(f"Kafka consumer of topic {self.topic} (group {group})")
        self._fatal: str | None = None
        conf = consumer_config(section, group) if conf is None else conf
        try:
            self._consumer = confluent_kafka.Consumer(
                {**conf, "error_cb": self._error, "logger": log})
        except (KafkaException, ValueError, TypeError) as exc:
            raise EventLogError(f"invalid Kafka consumer configuration: {exc}") from exc
        self._lock = threading.Lock()  # guards _assigned: rebalances run in librdkafka calls
        self._assigned: set[int] = set()
        self._starts: dict[int, int] = {}  # resume_from's positions, until the first assignment
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self.rebalances = 0  # assignment changes seen (assigned, revoked or lost partitions)
        self._stash: list[ConsumedRecord] = []  # read but not yet returned by poll
        self._inflight: asyncio.Future[Any] | None = None  # the read in librdkafka's thread
        self._busy = 0
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._consumer.subscribe([self.topic], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)

    # Rebalance callbacks: called by librdkafka inside consume()/close(), in that thread. With
    # the eager protocol they get the whole assignment, with cooperative-sticky the increment:
    # adding and removing handles both. Nothing is committed here: what was not committed is
    # re-delivered to the next owner.
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._assigned |= {tp.partition for tp in partitions if tp.topic == self.topic}
            self.rebalances += 1
            assigned = sorted(self._assigned)
            starts, self._starts = self._starts, {}
        log.info("consumer group %s: assigned partitions %s of %s", self.group, assigned,
                 self.topic)
        if starts:  # assigned here with the reader's positions, or librdkafka assigns as is
            chosen = [TopicPartition(tp.topic, tp.partition, starts[tp.partition])
                      if tp.topic == self.topic and tp.partition in starts else tp
                      for tp in partitions]
            (consumer.incremental_assign if self._cooperative else consumer.assign)(chosen)
            log.info("consumer group %s: reading %s from the positions %s", self.group,
                     self.topic, {tp.partition: tp.offset for tp in chosen
                                  if tp.partition in starts})

    def resume_from(self, positions: dict[int, int]) -> None:
        """At this consumer's first assignment, start each partition at its position here
        (the reader's state) instead of the group's committed offset, which lags behind it
        when the reader stopped between saving its state and committing. Partitions without
        a position, and later assignments (a partition moving here from another member),
        start at the committed offsets."""
        with self._lock:
            self._starts = dict(positions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "revoked")

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "lost")

    def _drop(self, partitions: list[TopicPartition], how: str) -> None:
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        with self._lock:
            self._assigned -= gone
            self.rebalances += 1
            self._stash = [r for r in self._stash if r.partition not in gone]
        log.info("consumer group %s: partitions %s of %s %s", self.group, sorted(gone),
                 self.topic, how)

    def _error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = _reason(err)
        self._errors(err)

    @property
    def assigned_partitions(self) -> frozenset[int]:
        """The partitions of the topic this consumer owns now."""
        with self._lock:
            return frozenset(self._assigned)

    # -- reading --

    def _read(self, max_records: int, timeout: float) -> tuple[list[ConsumedRecord], str | None]:
        """Blocking: wait up to ``timeout`` for a first record, then take what else is already
        there, up to ``max_records``. (consume(n, timeout) alone would wait out the whole
        timeout unless n records arrive.) Returns the records and a permanent error, if any."""
        deadline = time.monotonic() + timeout
        while True:
            first = self._consumer.poll(max(0.0, deadline - time.monotonic()))
            if first is None:
                return [], None
            messages = [first]
            if max_records > 1:
                messages += self._consumer.consume(max_records - 1, 0)
            records: list[ConsumedRecord] = []
            problem = None
            for msg in messages:
                err = msg.error()
                if err is None:
                    kind, ts = msg.timestamp()
                    records.append(ConsumedRecord(
                        msg.partition(), msg.offset(),
                        ts if kind != confluent_kafka.TIMESTAMP_NOT_AVAILABLE and ts >= 0 else 0,
                        msg.value() or b"", msg.key()))
                elif err.code() == KafkaError._PARTITION_EOF:
                    continue
                elif err.fatal() or err.code() in _PERMANENT:
                    problem = problem or _reason(err)
                else:
                    self._errors(err)  # informational: librdkafka recovers by itself
            if records or problem or time.monotonic() >= deadline:
                return records, problem

    async def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[ConsumedRecord]:
        self._check_open()
        max_records = max(1, min(max_records, 1_000_000))
        self._enter()
        try:
            if self._inflight is None:
                with self._lock:
                    self._stash = [r for r in self._stash if r.partition in self._assigned]
                    if self._stash:
                        return self._take_stash(max_records)
                self._inflight = asyncio.get_running_loop().run_in_executor(
                    None, self._read, max_records, timeout)
            # If this poll is cancelled, the read goes on in its thread and stays in
            # _inflight: its records (the consumer's position moved past them) come with the
            # next poll instead of being lost. A poll after a cancelled one waits for that read.
            read = self._inflight
            await asyncio.shield(read)
            if self._inflight is read:  # not yet collected by a concurrent poll
                self._inflight = None
                self._collect(read)
            with self._lock:
                return self._take_stash(max_records)
        finally:
            self._leave()

    def _take_stash(self, max_records: int) -> list[ConsumedRecord]:
        out, self._stash = self._stash[:max_records], self._stash[max_records:]
        return out

    def _collect(self, read: asyncio.Future[Any]) -> None:
        """Move a finished read's records into the stash; raise its error, if any."""
        try:
            records, problem = read.result()
        except (KafkaException, RuntimeError) as exc:
            raise EventLogError(f"read of Kafka topic {self.topic} failed: {exc}") from exc
        with self._lock:
            self._stash += [r for r in records if r.partition in self._assigned]
        if problem or self._fatal:
            raise EventLogError(f"read of Kafka topic {self.topic} (group {self.group}) "
                                f"failed: {problem or self._fatal}")

    # -- flow control --

    def pause(self) -> frozenset[int]:
        """Stop fetching from every assigned partition; returns them. Records already returned
        by ``poll`` stay the caller's (and any in this consumer's buffer come with the next
        polls); after ``resume`` fetching goes on after the last record returned. Partitions
        assigned later are not paused. Call it between polls (not during one)."""
        self._check_open()
        with self._lock:
            partitions = frozenset(self._assigned)
        self._flow(self._consumer.pause, partitions, "pause")
        return partitions

    def resume(self) -> None:
        """Fetch again from every assigned partition (paused or not)."""
        self._check_open()
        with self._lock:
            partitions = frozenset(self._assigned)
        self._flow(self._consumer.resume, partitions, "resume")

    def _flow(self, call: Callable[[list[TopicPartition]], None], partitions: frozenset[int],
              what: str) -> None:
        if not partitions:
            return
        try:
            call([TopicPartition(self.topic, p) for p in sorted(partitions)])
        except (KafkaException, RuntimeError) as exc:
            reason = _reason(exc.args[0]) if isinstance(exc, KafkaException) and exc.args \
                else str(exc)
            raise EventLogError(f"{what} of Kafka topic {self.topic} (group {self.group}) "
                                f"failed: {reason}") from exc

    # -- committing --

    async def commit(self, records: Sequence[ConsumedRecord]) -> None:
        self._check_open()
        if not records:
            return
        highest: dict[int, int] = {}
        for r in records:
            if r.offset > highest.get(r.partition, -1):
                highest[r.partition] = r.offset
        with self._lock:
            owned = {p: o for p, o in highest.items() if p in self._assigned}
        skipped = sorted(set(highest) - set(owned))
        if skipped:
            log.info("consumer group %s: not committing records of partitions %s of %s, "
                     "no longer assigned (their next owner re-reads them)", self.group, skipped,
                     self.topic)
        if not owned:
            return
        offsets = [TopicPartition(self.topic, p, o + 1) for p, o in sorted(owned.items())]
        self._enter()
        try:
            result = await asyncio.to_thread(self._consumer.commit, offsets=offsets,
                                             asynchronous=False)
        except (KafkaException, RuntimeError) as exc:
            reason = _reason(exc.args[0]) if isinstance(exc, KafkaException) and exc.args \
                else str(exc)
            raise EventLogError(f"commit on Kafka topic {self.topic} (group {self.group}) "
                                f"failed: {reason}") from exc
        finally:
            self._leave()
        failed = [f"partition {tp.partition}: {_reason(tp.error)}"
                  for tp in result or () if tp.error is not None]
        if failed:
            raise EventLogError(f"commit on Kafka topic {self.topic} (group {self.group}) "
                                f"failed: {'; '.join(failed)}")

    # -- lifecycle --

    def _check_open(self) -> None:
        if self._closed:
            raise EventLogError(f"Kafka consumer of {self.topic} (group {self.group}) is closed")

    def _enter(self) -> None:
        self._busy += 1

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self._idle is not None:
            self._idle.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # librdkafka must not be closed under a running poll or commit: wait for them (a poll
        # lasts at most its timeout), and for the read of a cancelled poll.
        while self._busy:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
            self._inflight = None
        # Leaves the group (its partitions go to the other members); commits nothing.
        await asyncio.to_thread(self._consumer.close)
        with self._lock:
            self._assigned.clear()
            self._stash = []
