"""The Kafka event log (workers/eventlog/kafka.py) against librdkafka's mock cluster.

The cluster runs in a separate process (tests/storage/kafka_support.py), started once for the
module and always killed at its end; the producer and consumers under test reach its three
brokers over TCP on 127.0.0.1. Every test uses its own topic (auto-created with 4 partitions)
and its own consumer group. Waiting is always polling a condition until a deadline.

The mock's group coordinator delays a group's first join by ~3 s (as Kafka's
group.initial.rebalance.delay.ms), so tests that read allow for it.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import confluent_kafka
import pytest

from ipc.config import Config, EventLogSection
from workers.eventlog import ConsumedRecord, EventLogError, open_consumer, open_producer
from workers.eventlog.kafka import (
    KafkaConsumer,
    KafkaProducer,
    consumer_config,
    producer_config,
)

from .kafka_support import FAST_GROUP, PARTITIONS, dead_bootstrap

pytestmark = pytest.mark.timeout(60)

READ_DEADLINE = 20.0    # a first join (~3 s) plus a rebalance, with a wide margin

_names = itertools.count()
T = TypeVar("T")


@pytest.fixture
def names(request):
    """A fresh (topic, group) per test."""
    n = next(_names)
    base = request.node.name.replace("[", "-").replace("]", "")[:60]
    return f"t-{base}-{n}", f"g-{base}-{n}"


def section(bootstrap: str, topic: str, **options: str) -> EventLogSection:
    return EventLogSection(backend="kafka", log=topic, kafka_bootstrap=bootstrap,
                           kafka_client_options={**FAST_GROUP, **options})


def run(coro: Awaitable[T], timeout: float = 50.0) -> T:
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def read_until(consumer: KafkaConsumer, done: Callable[[list[ConsumedRecord]], bool],
                     deadline: float = READ_DEADLINE, got: list[ConsumedRecord] | None = None,
                     max_records: int = 500) -> list[ConsumedRecord]:
    """Poll until ``done(records so far)`` or fail at the deadline."""
    got = [] if got is None else got
    end = time.monotonic() + deadline
    while not done(got):
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline:g} s; read {len(got)} "
                                 f"records, assigned {sorted(consumer.assigned_partitions)}")
        got += await consumer.poll(max_records=max_records, timeout=0.5)
    return got


def payloads_of(records: Sequence[ConsumedRecord]) -> list[bytes]:
    return [r.payload for r in records]


async def append_keyed(producer: KafkaProducer, keys: int, per_key: int) -> set[bytes]:
    """``keys`` concurrent appends of ``per_key`` payloads each, one key per append; the
    payloads are b"k<key>:<n>"."""
    batches = {k: [b"k%d:%d" % (k, n) for n in range(per_key)] for k in range(keys)}
    await asyncio.gather(*(producer.append(p, key=b"key-%d" % k) for k, p in batches.items()))
    return {p for ps in batches.values() for p in ps}


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (negative: none), read with a plain client
    that does not join the group."""
    client = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                       "enable.auto.commit": False})
    try:
        tps = client.committed([confluent_kafka.TopicPartition(topic, p)
                                for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        client.close()


# --- configuration ---------------------------------------------------------------------------

def test_client_options_are_merged_and_guarantees_kept():
    s = EventLogSection(backend="kafka", log="events", kafka_bootstrap="h1:9092,h2:9092",
                        kafka_client_options={"linger.ms": "50", "client.id": "opt",
                                              "acks": "-1", "security.protocol": "ssl"})
    conf = producer_config(s)
    assert conf["bootstrap.servers"] == "h1:9092,h2:9092"
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["linger.ms"] == "50" and conf["client.id"] == "opt"
    assert conf["security.protocol"] == "ssl"
    conf = consumer_config(s, "processors")
    assert conf["group.id"] == "processors"
    assert conf["enable.auto.commit"] is False and conf["auto.offset.reset"] == "earliest"
    assert conf["client.id"] == "opt"

    for bad in ({"enable.idempotence": "false"}, {"acks": "1"}, {"request.required.acks": "0"},
                {"bootstrap.servers": "x:1"}):
        with pytest.raises(EventLogError, match=next(iter(bad))):
            producer_config(EventLogSection(backend="kafka", kafka_client_options=bad))
    for bad in ({"enable.auto.commit": "true"}, {"group.id": "other"}):
        with pytest.raises(EventLogError, match=next(iter(bad))):
            consumer_config(EventLogSection(backend="kafka", kafka_client_options=bad), "g")
    # A value librdkafka rejects is an EventLogError too, at construction.
    with pytest.raises(EventLogError, match="invalid Kafka producer configuration"):
        KafkaProducer(EventLogSection(backend="kafka",
                                      kafka_client_options={"linger.ms": "soon"}))


def test_factories_open_the_kafka_implementation(cluster, names, tmp_path):
    topic, group = names
    config = Config(event_log=section(cluster.bootstrap, topic))

    async def main():
        producer = open_producer(config, str(tmp_path))
        consumer = open_consumer(config, str(tmp_path), group)
        assert isinstance(producer, KafkaProducer) and isinstance(consumer, KafkaConsumer)
        await producer.close()
        await consumer.close()
    run(main())


# --- producing and consuming -----------------------------------------------------------------

def test_appended_records_are_consumed_exactly_once_in_key_order(cluster, names):
    topic, group = names
    s = section(cluster.bootstrap, topic)

    async def main():
        producer = KafkaProducer(s)
        before_ms = int(time.time() * 1000)
        expected = await append_keyed(producer, keys=8, per_key=25)
        await producer.append([])  # nothing to do
        consumer = KafkaConsumer(s, group)
        try:
            got = await read_until(consumer, lambda g: len(g) >= len(expected))
            # Nothing more comes: no duplicates were written or delivered.
            got += await consumer.poll(timeout=0.5)
            assert sorted(payloads_of(got)) == sorted(expected)
            assert len({(r.partition, r.offset) for r in got}) == len(got)
            assert len({r.partition for r in got}) >= 2, "keys spread over partitions"
            assert consumer.assigned_partitions == frozenset(range(PARTITIONS))
            # One key, one partition, in the order appended.
            by_key: dict[bytes, list[ConsumedRecord]] = defaultdict(list)
            for r in sorted(got, key=lambda r: (r.partition, r.offset)):
                by_key[r.payload.split(b":")[0]].append(r)
            for key, records in by_key.items():
                assert len({r.partition for r in records}) == 1, key
                assert [int(r.payload.split(b":")[1]) for r in records] == list(range(25))
            now_ms = int(time.time() * 1000)
            assert all(before_ms - 5000 <= r.timestamp_ms <= now_ms + 5000 for r in got)
            await consumer.commit(got)
            assert committed_offsets(cluster.bootstrap, group, topic) == {
                p: max((r.offset for r in got if r.partition == p), default=-1) + 1
                for p in range(PARTITIONS)} | {
                p: -1001 for p in range(PARTITIONS) if not any(r.partition == p for r in got)}
        finally:
            await consumer.close()
            await producer.close()
    run(main())


async def read_all_and_commit(s: EventLogSection, group: str,
                              choose: Callable[[dict[int, list[ConsumedRecord]]],
                                               list[ConsumedRecord]]
                              ) -> tuple[dict[int, list[ConsumedRecord]], list[ConsumedRecord],
                                         KafkaConsumer]:
    """Append 8 keys x 6 records, read them all as a member of ``group``, commit the records
    ``choose`` picks (passed in reverse order), and leave the group. Returns the records by
    partition in offset order, the committed ones and the closed consumer."""
    producer = KafkaProducer(s)
    expected = await append_keyed(producer, keys=8, per_key=6)
    await producer.close()
    first = KafkaConsumer(s, group)
    try:
        got = await read_until(first, lambda g: len(g) >= len(expected))
        assert sorted(payloads_of(got)) == sorted(expected)
        by_partition: dict[int, list[ConsumedRecord]] = defaultdict(list)
        for r in sorted(got, key=lambda r: r.offset):
            by_partition[r.partition].append(r)
        done = choose(by_partition)
        await first.commit(list(reversed(done)))
        await first.commit([])
    finally:
        await first.close()
    return by_partition, done, first


async def read_as_new_member(s: EventLogSection, group: str, count: int,
                             positions: dict[int, int] | None = None) -> list[bytes]:
    """The payloads a new member of ``group`` (resumed from ``positions``, if given) reads:
    ``count`` records, then whatever else arrives within half a second."""
    consumer = KafkaConsumer(s, group)
    if positions is not None:
        consumer.resume_from(positions)
    try:
        got = await read_until(consumer, lambda g: len(g) >= count)
        return payloads_of(got + await consumer.poll(timeout=0.5))
    finally:
        await consumer.close()


def test_new_consumer_resumes_after_the_committed_offsets(cluster, names):
    topic, group = names
    s = section(cluster.bootstrap, topic)

    async def main():
        # Commit the first half of every partition.
        by_partition, done, first = await read_all_and_commit(s, group, lambda parts: [
            r for rs in parts.values() for r in rs[:len(rs) // 2]])
        with pytest.raises(EventLogError, match="closed"):
            await first.poll(timeout=0.1)
        rest = {r.payload for rs in by_partition.values() for r in rs} - set(payloads_of(done))
        assert done and rest
        # Exactly the uncommitted records are delivered again, none of the committed.
        assert sorted(await read_as_new_member(s, group, len(rest))) == sorted(rest)
    run(main())


@pytest.mark.parametrize("strategy", ["range,roundrobin", "cooperative-sticky"])
def test_resume_from_starts_at_the_readers_positions(cluster, names, strategy):
    """A reader restarted from its own state (the processor's checkpoint) reads what follows
    that state, not what follows the committed offsets, which lag behind it when it stopped
    between saving and committing; a partition it gives no position for starts at the
    committed offset. Eager and cooperative assignment alike."""
    topic, group = names
    s = section(cluster.bootstrap, topic, **{"partition.assignment.strategy": strategy})

    async def main():
        # committed: the first record of each partition; the state saw the first half
        by_partition, _, _ = await read_all_and_commit(s, group, lambda parts: [
            rs[0] for rs in parts.values()])
        assert len(by_partition) >= 2, "the keys spread over several partitions"
        resumed, *others = sorted(by_partition)
        positions = {resumed: by_partition[resumed][len(by_partition[resumed]) // 2].offset}
        want = {r.payload for r in by_partition[resumed] if r.offset >= positions[resumed]}
        want |= {r.payload for p in others for r in by_partition[p][1:]}  # after the commit
        assert sorted(await read_as_new_member(s, group, len(want), positions)) == \
            sorted(want)
    run(main())


def test_two_consumers_of_a_group_share_the_partitions(cluster, names):
    topic, group = names
    s = section(cluster.bootstrap, topic)

    async def main():
        producer = KafkaProducer(s)
        expected = await append_keyed(producer, keys=12, per_key=5)
        await producer.close()

        a = KafkaConsumer(s, group)
        b = None
        try:
            before = await read_until(a, lambda g: len(g) >= len(expected))
            assert a.assigned_partitions == frozenset(range(PARTITIONS))
            # Nothing committed: after b joins, each partition is re-read by its new owner.
            b = KafkaConsumer(s, group)
            # What each read since its latest assignment change: the group may need more than
            # one round to settle, and each round starts the partitions over at the committed
            # offsets (none), so only the last round's reading counts.
            seen: dict[KafkaConsumer, list[ConsumedRecord]] = {a: [], b: []}
            rounds = {a: a.rebalances, b: b.rebalances}

            def shared() -> bool:
                pa, pb = a.assigned_partitions, b.assigned_partitions
                return bool(pa) and bool(pb) and not pa & pb \
                    and pa | pb == frozenset(range(PARTITIONS))

            async def read_both():
                results = await asyncio.gather(a.poll(timeout=0.3), b.poll(timeout=0.3))
                for consumer, records in zip((a, b), results, strict=True):
                    if consumer.rebalances != rounds[consumer]:
                        rounds[consumer] = consumer.rebalances
                        seen[consumer] = []
                    seen[consumer] += records

            end = time.monotonic() + 1.5 * READ_DEADLINE  # a few rounds
            while not (shared() and len(seen[a]) + len(seen[b]) >= len(expected)):
                assert time.monotonic() < end, (
                    f"no shared reading: a has {sorted(a.assigned_partitions)}, b has "
                    f"{sorted(b.assigned_partitions)}, read {len(seen[a])}+{len(seen[b])}")
                await read_both()
            await read_both()  # and nothing more comes
            assert shared()
            pa, pb = a.assigned_partitions, b.assigned_partitions
            assert {r.partition for r in seen[a]} <= pa
            assert {r.partition for r in seen[b]} <= pb
            together = payloads_of(seen[a]) + payloads_of(seen[b])
            assert sorted(together) == sorted(expected)  # every record, once

            # a commits everything it read before the rebalance: only the partitions it still
            # owns are committed; b's stay uncommitted until b commits them.
            await a.commit(before)
            offsets = committed_offsets(cluster.bootstrap, group, topic)
            end_of = {p: max((r.offset for r in before if r.partition == p), default=-1) + 1
                      for p in range(PARTITIONS)}
            for p in pa:
                assert offsets[p] == end_of[p], (p, offsets)
            for p in pb:
                assert offsets[p] < 0, (p, offsets)
            await b.commit(seen[b])
            offsets = committed_offsets(cluster.bootstrap, group, topic)
            for p in pb:
                if end_of[p]:
                    assert offsets[p] == end_of[p], (p, offsets)
        finally:
            await a.close()
            if b is not None:
                await b.close()
    run(main())


def test_cancelled_poll_loses_no_records(cluster, names):
    topic, group = names
    s = section(cluster.bootstrap, topic)

    async def main():
        producer = KafkaProducer(s)
        expected = await append_keyed(producer, keys=4, per_key=10)
        await producer.close()
        consumer = KafkaConsumer(s, group)
        try:
            got = await read_until(consumer, lambda g: len(g) > 0, max_records=2)
            cancelled = 0
            for _ in range(3):
                # Cancel polls while librdkafka may be reading in its thread: what it read
                # (the consumer's position moved past it) must come with the next poll.
                task = asyncio.create_task(consumer.poll(max_records=3, timeout=2.0))
                await asyncio.sleep(0)  # one step: the poll starts, or takes a finished read
                if task.done():
                    got += task.result()
                    continue
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                cancelled += 1
            # The first poll always started a read of its own, in a thread, and was cancelled.
            assert cancelled >= 1
            got = await read_until(consumer, lambda g: len(g) >= len(expected), got=got,
                                   max_records=3)
            got += await consumer.poll(timeout=0.5)
            assert sorted(payloads_of(got)) == sorted(expected)
        finally:
            await consumer.close()
    run(main())


def test_poll_returns_when_a_record_arrives_and_loop_stays_responsive(cluster, names):
    topic, group = names
    s = section(cluster.bootstrap, topic)

    async def main():
        producer = KafkaProducer(s)
        await producer.append([b"first"])
        consumer = KafkaConsumer(s, group)
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker():
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        try:
            # An idle poll blocks only its thread: the loop keeps ticking through it.
            started = time.monotonic()
            assert await consumer.poll(timeout=1.0) == []  # still joining the group
            took = time.monotonic() - started
            assert took >= 0.9
            during = [t for t in ticks if started <= t]
            assert len(during) >= 40, len(during)
            gaps = [b - a for a, b in itertools.pairwise(during)]
            assert max(gaps) < 0.25, max(gaps)

            await read_until(consumer, lambda g: len(g) >= 1)
            # A long poll returns once a record arrives, not at its timeout.
            waiting = asyncio.create_task(consumer.poll(timeout=15.0))
            started = time.monotonic()
            await producer.append([b"second"])
            second = await waiting
            assert payloads_of(second) == [b"second"]
            assert time.monotonic() - started < 5.0

            # Appending many records keeps the loop responsive too.
            mark = len(ticks)
            await producer.append([b"bulk-%d" % i for i in range(5000)])
            gaps = [b - a for a, b in itertools.pairwise(ticks[mark:])]
            assert not gaps or max(gaps) < 0.25, max(gaps)
        finally:
            stop.set()
            await tick_task
            await consumer.close()
            await producer.close()
    run(main())


# --- failures --------------------------------------------------------------------------------

def test_append_to_an_unreachable_cluster_fails_in_bounded_time():
    s = EventLogSection(backend="kafka", log="nowhere", kafka_bootstrap=dead_bootstrap(),
                        kafka_client_options={"message.timeout.ms": "1500",
                                              "reconnect.backoff.max.ms": "200"})

    async def main():
        producer = KafkaProducer(s)
        started = time.monotonic()
        with pytest.raises(EventLogError, match=r"nowhere.*2 of 2 records not delivered.*"
                                                r"timed out"):
            await producer.append([b"a", b"b"], key=b"k")
        took = time.monotonic() - started
        assert 1.0 <= took < 10.0, took
        started = time.monotonic()
        await producer.close(timeout=2.0)
        assert time.monotonic() - started < 5.0
        with pytest.raises(EventLogError, match="closed"):
            await producer.append([b"c"])
    run(main(), timeout=30)


def test_producer_replaces_its_client_after_a_fatal_error(cluster, names):
    topic, group = names
    s = section(cluster.bootstrap, topic)

    async def main():
        producer = KafkaProducer(s)
        try:
            await producer.append([b"before"])
            old = producer._client
            old.fatal = "_FATAL: simulated"  # what error_cb records for a fatal error
            await producer.append([b"after"])
            assert producer._client is not old and not old.thread.is_alive()
        finally:
            await producer.close()
        consumer = KafkaConsumer(s, group)
        try:
            got = await read_until(consumer, lambda g: len(g) >= 2)
            assert sorted(payloads_of(got)) == [b"after", b"before"]
        finally:
            await consumer.close()
    run(main())


def test_close_fails_appends_still_waiting():
    s = EventLogSection(backend="kafka", log="nowhere", kafka_bootstrap=dead_bootstrap(),
                        kafka_client_options={"message.timeout.ms": "60000"})

    async def main():
        producer = KafkaProducer(s)
        waiting = asyncio.create_task(producer.append([b"x"]))
        while not producer._pending:  # the append has produced its record
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await producer.close(timeout=0.5)
        with pytest.raises(EventLogError, match="not delivered"):
            await waiting
        assert time.monotonic() - started < 5.0
    run(main(), timeout=30)
