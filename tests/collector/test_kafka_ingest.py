"""Kafka ingest (workers/collector/kafka_ingest.py) against librdkafka's mock cluster.

The cluster runs in a separate process (tests/storage/kafka_support.py), started once for the
module and always killed at its end; the daemon's collector and the test's plain confluent_kafka
clients reach it over TCP. Every test has its own topics and consumer group. Waiting is always
polling a condition until a deadline; the mock coordinator delays a group's first join by ~3 s.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from datetime import UTC, datetime

import confluent_kafka
import msgspec
import pytest

from ipc import storage as s
from ipc.config import KafkaIngestSection
from ipc.events import LLMEvent, decode_event
from tests.conftest import http_get, stays_true, wait_until
from tests.storage.kafka_support import FAST_GROUP, PARTITIONS
from workers.collector.kafka_ingest import (
    KafkaIngest,
    consumer_conf,
    parse_record,
    producer_conf,
)
from workers.collector.pipeline import NotDurable, Overloaded
from workers.eventlog import EventLogError
from workers.storage_client import SyncStorageClient

pytestmark = pytest.mark.timeout(60)

DEADLINE = 25.0  # a first group join (~3 s) and a daemon start, with a wide margin
EVENT = {"time": "2026-11-25T10:00:00Z", "service": "support-bot", "model": "gpt-4o",
         "input_tokens": 1200, "output_tokens": 300, "latency_ms": 850.5}

_names = itertools.count()


@pytest.fixture
def names():
    n = next(_names)
    return f"calls-{n}", f"calls-{n}.dead", f"collector-{n}"


def event(event_id: str, **changes) -> dict:
    return dict(EVENT, event_id=event_id, **changes)


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    failed = []
    for key, value in records:
        producer.produce(topic, value=value, key=key,
                         on_delivery=lambda err, _msg: err and failed.append(err))
    assert producer.flush(15) == 0 and not failed, failed


def committed_and_ends(bootstrap: str, group: str, topic: str
                       ) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offset and the end offset, per partition, read by a client that
    does not join the group."""
    client = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                       "enable.auto.commit": False})
    try:
        tps = [confluent_kafka.TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = {tp.partition: tp.offset for tp in client.committed(tps, timeout=10)}
        ends = {p: client.get_watermark_offsets(tps[p], timeout=10)[1]
                for p in range(PARTITIONS)}
        return committed, ends
    finally:
        client.close()


def all_committed(bootstrap: str, group: str, topic: str) -> bool:
    committed, ends = committed_and_ends(bootstrap, group, topic)
    return all(committed[p] == ends[p] for p in range(PARTITIONS) if ends[p] > 0)


def read_topic(bootstrap: str, topic: str, count: int, deadline: float = DEADLINE
               ) -> list[confluent_kafka.Message]:
    client = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "reader",
                                       "enable.auto.commit": False})
    try:
        client.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                       for p in range(PARTITIONS)])
        got: list[confluent_kafka.Message] = []
        end = time.monotonic() + deadline
        while len(got) < count:
            assert time.monotonic() < end, f"{len(got)} of {count} records in {topic}"
            msg = client.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg)
        return got
    finally:
        client.close()


def read_events(runtime: str) -> list[LLMEvent]:
    client = SyncStorageClient(runtime)
    try:
        reply = client.call(s.LogRead(log="llm-events", offset=0, max_records=10_000))
        return [decode_event(r.payload) for r in reply.records]
    finally:
        client.close()


def test_record_values_are_parsed_like_post_events():
    assert parse_record(json.dumps(event("a")).encode(), "auto").event_id == "a"
    assert parse_record(msgspec.msgpack.encode(event("b")), "auto").event_id == "b"
    stamped = parse_record(msgspec.msgpack.encode(event(
        "t", time=datetime(2026, 11, 25, 10, 0, 0, 123456, tzinfo=UTC))), "auto")
    assert stamped.time_ns == 1795600800_123456000
    assert parse_record(b'  {"event_id": "c", ' + json.dumps(EVENT).encode()[1:],
                        "json").event_id == "c"
    for value, fmt, path, reason in [
        (b"{not json", "auto", "value", "not JSON"),
        (b"", "auto", "value", "empty"),
        (b"[1, 2]", "json", "value", "expected an object"),
        (json.dumps(event("d", input_tokens=-5)).encode(), "auto", "value.input_tokens",
         "negative"),
        (msgspec.msgpack.encode(event("e", colour="blue")), "msgpack", "value.colour",
         "unknown field"),
        (json.dumps(event("f")).encode(), "msgpack", "value", "not msgpack"),
    ]:
        with pytest.raises(Exception, match=reason) as info:
            parse_record(value, fmt)
        assert info.value.path == path


def test_client_options_pass_through_and_guarantees_are_kept():
    section = KafkaIngestSection(enabled=True, bootstrap_servers="k1:9093,k2:9093",
                                 group_id="g", client_options={
                                     "security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
                                     "sasl.username": "u", "ssl.ca.location": "/etc/ca.pem",
                                     "fetch.max.bytes": 1048576})
    for conf in (consumer_conf(section), producer_conf(section)):
        assert conf["bootstrap.servers"] == "k1:9093,k2:9093"
        assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.username"] == "u"
    conf = consumer_conf(section)
    assert conf["group.id"] == "g" and conf["auto.offset.reset"] == "earliest"
    assert conf["enable.auto.commit"] is False and conf["fetch.max.bytes"] == 1048576
    assert producer_conf(section)["enable.idempotence"] is True
    for bad in ({"auto.offset.reset": "latest"}, {"enable.auto.commit": True},
                {"group.id": "other"}, {"bootstrap.servers": "x:1"}):
        with pytest.raises(EventLogError, match=r"\[collector.kafka\] client_options.*"
                           + next(iter(bad)).replace(".", r"\.")):
            consumer_conf(KafkaIngestSection(client_options=bad))
    with pytest.raises(EventLogError, match="acks"):
        producer_conf(KafkaIngestSection(client_options={"acks": "1"}))


def test_kafka_records_are_ingested_and_malformed_ones_dead_lettered(cluster, names,
                                                                     make_daemon):
    topic, dead_topic, group = names
    # Produced before the collector (and its group) exist: read all the same.
    produce(cluster.bootstrap, topic, [(b"k-early", json.dumps(event("early")).encode())])
    d = make_daemon(builtins=["storage", "collector"], extra={"collector": {"kafka": {
        "enabled": True, "bootstrap_servers": cluster.bootstrap, "topic": topic,
        "group_id": group, "dead_letter_topic": dead_topic, "client_options": FAST_GROUP}}})
    d.start()
    good = [(b"k-%d" % i, json.dumps(event(f"j-{i}", tags={"n": str(i)})).encode())
            for i in range(6)]
    good += [(b"m-%d" % i, msgspec.msgpack.encode(event(f"m-{i}", cost_usd=0.5)))
             for i in range(4)]
    bad = {b"bad-json": b'{"event_id": "x", not json',
           b"negative": json.dumps(event("neg", input_tokens=-5)).encode(),
           b"array": b"[1, 2, 3]",
           b"unknown": msgspec.msgpack.encode(event("unk", colour="blue"))}
    produce(cluster.bootstrap, topic, good[:5] + list(bad.items()) + good[5:])

    expected = {"early"} | {f"j-{i}" for i in range(6)} | {f"m-{i}" for i in range(4)}
    stored = wait_until(lambda: (e := read_events(d.runtime)) and {x.event_id for x in e}
                        >= expected and e, DEADLINE,
                        message=lambda: f"stored {[e.event_id for e in read_events(d.runtime)]}")
    by_id = {e.event_id: e for e in stored}
    assert by_id["j-3"].tags == {"n": "3"} and by_id["m-2"].cost_usd == 0.5
    assert by_id["early"].cost_usd is not None and by_id["early"].cost_usd > 0  # priced

    dead = read_topic(cluster.bootstrap, dead_topic, len(bad))
    assert sorted(m.key() for m in dead) == sorted(bad)
    source_offsets = set()
    for msg in dead:
        assert msg.value() == bad[msg.key()]  # the original bytes
        headers = {k: v.decode() for k, v in msg.headers()}
        assert headers["source.topic"] == topic
        source_offsets.add((int(headers["source.partition"]), int(headers["source.offset"])))
        assert headers["reason"].startswith(headers["path"] + ": ")
        assert {b"bad-json": "not JSON", b"negative": "must not be negative",
                b"array": "expected an object", b"unknown": "unknown field"}[msg.key()] \
            in headers["reason"]
    assert len(source_offsets) == len(bad)
    assert {m.key(): dict(m.headers())["path"].decode() for m in dead}[b"negative"] == \
        "value.input_tokens"

    # The group's offsets cover every record, good and bad.
    wait_until(lambda: all_committed(cluster.bootstrap, group, topic), DEADLINE,
               message=lambda: repr(committed_and_ends(cluster.bootstrap, group, topic)))

    def metrics() -> str:
        return http_get(d.admin_url("/metrics"))[1].decode()

    wait_until(lambda: 'collector_events_accepted_total{source="kafka"} 11.0' in metrics(), 10,
               message=metrics)
    text = metrics()
    assert 'collector_dead_letters_total{source="kafka"} 4.0' in text
    assert 'collector_events_rejected_total{reason="input_tokens",source="kafka"} 1.0' in text
    status = d.service("collector")
    assert status["restarts"] == 0


class FlakyPipeline:
    """Refuses (Overloaded, then NotDurable) while ``refuse`` is set; keeps what it takes."""

    max_in_flight = 7  # smaller than a poll's batch: the ingest submits in chunks

    def __init__(self):
        self.refuse = True
        self.refusals = 0
        self.events: list[LLMEvent] = []

    async def submit(self, source, events, started):
        if not events:
            return
        assert len(events) <= self.max_in_flight
        if self.refuse:
            self.refusals += 1
            raise Overloaded(0.2) if self.refusals < 3 else NotDurable("log down")
        assert source == "kafka"
        self.events += events


def test_a_refusing_pipeline_pauses_the_consumer_and_nothing_is_committed(cluster, names):
    topic, dead_topic, group = names
    section = KafkaIngestSection(enabled=True, bootstrap_servers=cluster.bootstrap, topic=topic,
                                 group_id=group, dead_letter_topic=dead_topic,
                                 client_options=FAST_GROUP)
    first = [(b"a%d" % i, json.dumps(event(f"a-{i}")).encode()) for i in range(12)]
    produce(cluster.bootstrap, topic, first)

    async def until(predicate, timeout, what):
        end = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < end, what
            await asyncio.sleep(0.05)

    async def main():
        pipeline = FlakyPipeline()
        ingest = KafkaIngest(section, pipeline)
        await ingest.start()
        try:
            await until(lambda: pipeline.refusals >= 4 and ingest.paused, DEADLINE,
                        "the consumer did not pause")
            held = len(ingest.pending)
            assert held > 0
            # Paused: no more records are fetched, nothing is committed or dropped.
            await asyncio.to_thread(produce, cluster.bootstrap, topic,
                                    [(b"b%d" % i, json.dumps(event(f"b-{i}")).encode())
                                     for i in range(5)])
            await asyncio.to_thread(
                stays_true, lambda: len(ingest.pending) == held and ingest.paused, 1.0)
            committed, _ = await asyncio.to_thread(committed_and_ends, cluster.bootstrap,
                                                   group, topic)
            assert all(o < 0 for o in committed.values()), committed
            assert not pipeline.events

            pipeline.refuse = False  # the log is back: everything goes through, then resumes
            await until(lambda: {e.event_id for e in pipeline.events} ==
                        {f"a-{i}" for i in range(12)} | {f"b-{i}" for i in range(5)},
                        DEADLINE, "events after the resume")
            assert not ingest.paused
            await until(lambda: ingest.committed and not ingest.uncommitted, 10, "commits")
        finally:
            await ingest.stop()
        assert await asyncio.to_thread(all_committed, cluster.bootstrap, group, topic)
    asyncio.run(asyncio.wait_for(main(), 50))


class IntermittentPipeline:
    """Takes every chunk but refuses every third submit (Overloaded): a backlog then goes
    through many pause/resume rounds."""

    max_in_flight = 300

    def __init__(self):
        self.submits = self.refusals = 0
        self.events: list[LLMEvent] = []

    async def submit(self, source, events, started):
        self.submits += 1
        if self.submits % 3 == 0:
            self.refusals += 1
            raise Overloaded(0.0)
        self.events += events


def test_a_backlog_is_read_whole_through_pauses_and_committed_to_the_end(cluster, names):
    """Thousands of records produced before the group exists, many polls' worth: every record
    reaches the pipeline (from offset 0 of every partition, none skipped), and the group ends
    committed at each partition's end."""
    topic, dead_topic, group = names
    count = 6_000
    produce(cluster.bootstrap, topic,
            [(b"k%d" % i, json.dumps(event(f"c-{i}")).encode()) for i in range(count)])
    section = KafkaIngestSection(enabled=True, bootstrap_servers=cluster.bootstrap, topic=topic,
                                 group_id=group, dead_letter_topic=dead_topic,
                                 client_options=FAST_GROUP)

    async def main():
        pipeline = IntermittentPipeline()
        ingest = KafkaIngest(section, pipeline)
        await ingest.start()
        try:
            end = time.monotonic() + DEADLINE
            while len({e.event_id for e in pipeline.events}) < count:
                assert time.monotonic() < end, \
                    f"{len({e.event_id for e in pipeline.events})} of {count} events"
                await asyncio.sleep(0.05)
            end = time.monotonic() + 10
            while not await asyncio.to_thread(all_committed, cluster.bootstrap, group, topic):
                assert time.monotonic() < end, "not committed to the end"
                await asyncio.sleep(0.1)
        finally:
            await ingest.stop()
        assert {e.event_id for e in pipeline.events} == {f"c-{i}" for i in range(count)}
        assert pipeline.refusals >= count // 300 // 2  # it paused and resumed often
    asyncio.run(asyncio.wait_for(main(), 50))


def test_uncommitted_records_are_read_again_by_the_next_member(cluster, names):
    """A member that never got its records into the log (a crash, as far as Kafka can tell)
    commits nothing: the next member of the group reads all of them."""
    topic, dead_topic, group = names
    section = KafkaIngestSection(enabled=True, bootstrap_servers=cluster.bootstrap, topic=topic,
                                 group_id=group, dead_letter_topic=dead_topic,
                                 client_options=FAST_GROUP)
    records = [(b"c%d" % i, json.dumps(event(f"c-{i}")).encode()) for i in range(8)]
    produce(cluster.bootstrap, topic, records)

    async def main():
        refusing = FlakyPipeline()
        first = KafkaIngest(section, refusing)
        await first.start()
        try:
            end = time.monotonic() + DEADLINE
            while not (first.paused and first.pending):
                assert time.monotonic() < end, "records not read"
                await asyncio.sleep(0.05)
        finally:
            await first.stop()
        committed, _ = await asyncio.to_thread(committed_and_ends, cluster.bootstrap,
                                               group, topic)
        assert all(o < 0 for o in committed.values()), committed
        taking = FlakyPipeline()
        taking.refuse = False
        second = KafkaIngest(section, taking)
        await second.start()
        try:
            end = time.monotonic() + DEADLINE
            while len(taking.events) < len(records):
                assert time.monotonic() < end, "records not read again"
                await asyncio.sleep(0.05)
            assert sorted(e.event_id for e in taking.events) == sorted(
                f"c-{i}" for i in range(8))
        finally:
            await second.stop()
        assert await asyncio.to_thread(all_committed, cluster.bootstrap, group, topic)
    asyncio.run(asyncio.wait_for(main(), 50))


def test_a_stalled_event_log_pauses_and_a_killed_collector_loses_nothing(cluster, names,
                                                                        make_daemon):
    """SIGSTOP the storage worker: appends time out (NotDurable), so the consumer pauses and
    holds its records without committing them; after SIGCONT they go through. Then SIGKILL the
    collector worker: its uncommitted records go to its successor. Every record ends up in the
    event log and the group's offsets cover them all."""
    topic, dead_topic, group = names
    d = make_daemon(builtins=["storage", "collector"], extra={
        "storage": {"heartbeat_timeout": 60.0},  # stopped, it is not restarted
        "collector": {"kafka": {
            "enabled": True, "bootstrap_servers": cluster.bootstrap, "topic": topic,
            "group_id": group, "dead_letter_topic": dead_topic, "client_options": FAST_GROUP}}})
    d.start()
    wanted: set[str] = set()

    def send(prefix: str, count: int) -> None:
        ids = [f"{prefix}-{i}" for i in range(count)]
        produce(cluster.bootstrap, topic, [(i.encode(), json.dumps(event(i)).encode())
                                           for i in ids])
        wanted.update(ids)

    def all_stored() -> bool:
        return wanted <= {e.event_id for e in read_events(d.runtime)}

    def kafka_status() -> dict:
        reply = d.request("call", {"service": "collector", "command": "info", "args": {}})
        assert reply.ok, reply
        return reply.result["status"]["kafka"]

    send("a", 40)
    wait_until(all_stored, DEADLINE)
    storage = d.services()["storage"]["pid"]
    os.kill(storage, signal.SIGSTOP)
    try:
        send("b", 40)
        status = wait_until(lambda: (k := kafka_status())["paused"] and k, DEADLINE,
                            message=lambda: repr(kafka_status()))
        assert status["pending"] > 0 and status["last_error"], status
        assert not all_committed(cluster.bootstrap, group, topic)
    finally:
        os.kill(storage, signal.SIGCONT)
    wait_until(all_stored, DEADLINE)
    wait_until(lambda: not kafka_status()["paused"], DEADLINE)

    old = d.services()["collector"]["pid"]
    os.kill(old, signal.SIGKILL)
    send("c", 40)
    d.wait_service("collector", lambda x: x["state"] == "ready" and x["pid"] != old, 20)
    wait_until(all_stored, DEADLINE)
    wait_until(lambda: all_committed(cluster.bootstrap, group, topic), DEADLINE,
               message=lambda: repr(committed_and_ends(cluster.bootstrap, group, topic)))
    assert d.services()["storage"]["pid"] == storage
