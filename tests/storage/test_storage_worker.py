"""The storage worker end to end: a real optimizerd with its storage service on LevelDB."""
from __future__ import annotations

import tarfile
import json
import hashlib
import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import zmq

from ipc import storage as s
from ipc.config_loader import load_config
from tests.conftest import alive, free_port, http_get, wait_until
from workers.eventlog import open_consumer, open_producer
from workers.storage_client import SyncStorageClient

HERE = Path(__file__).resolve().parent


@pytest.fixture
def storage_daemon(make_daemon):
    def make(**storage):
        d = make_daemon(builtins=["storage"], extra={"storage": storage} if storage else None)
        d.start()
        return d
    return make


@pytest.fixture
def client_for():
    made = []

    def make(daemon):
        client = SyncStorageClient(daemon.runtime, timeout=5.0)
        made.append(client)
        return client
    yield make
    for client in made:
        client.close()


def test_operations_round_trip(storage_daemon, client_for):
    d = storage_daemon()
    c = client_for(d)
    c.call(s.Batch(ops=[s.Put(ns="test", key=b"a/1", value=b"one"),
                        s.Put(ns="test", key=b"a/2", value=b"two"),
                        s.Put(ns="test", key=b"b/1", value=b"other")]))
    assert c.call(s.Get(ns="test", key=b"a/1")) == b"one"
    page = c.call(s.Scan(ns="test", prefix=b"a/", limit=1))
    assert [r.key for r in page.records] == [b"a/1"] and page.next_cursor == b"a/1"
    page = c.call(s.Scan(ns="test", prefix=b"a/", limit=1, cursor=page.next_cursor))
    assert [r.key for r in page.records] == [b"a/2"] and page.next_cursor is None
    c.call(s.Delete(ns="test", key=b"a/1"))
    assert c.call(s.Get(ns="test", key=b"a/1")) is None

    c.call(s.TsAppend(ns="windows", series="cost", points=[s.Point(ts, b"%d" % ts)
                                                           for ts in (-5, 0, 10, 20)]))
    assert [p.ts for p in c.call(s.TsRange(ns="windows", series="cost", start=-5, end=20))] \
        == [-5, 0, 10]

    assert c.call(s.DocPut(ns="configs", id="svc", body=b"v1", expected_version=0)) == 1
    assert c.call(s.DocPut(ns="configs", id="svc", body=b"v2")) == 2
    with pytest.raises(s.Conflict):
        c.call(s.DocPut(ns="configs", id="svc", body=b"v3", expected_version=1))
    assert c.call(s.DocGet(ns="configs", id="svc")).body == b"v2"
    assert c.call(s.DocGet(ns="configs", id="svc", version=1)).body == b"v1"
    assert [doc.version for doc in c.call(s.DocHistory(ns="configs", id="svc"))] == [2, 1]
    with pytest.raises(s.NotFound):
        c.call(s.DocGet(ns="configs", id="nope"))


def test_group_commit_keeps_each_answer_apart(storage_daemon, client_for):
    """Writes pipelined together are committed together, yet each gets its own answer."""
    c = client_for(storage_daemon())
    answers = c.pipeline([s.DocPut(ns="configs", id="x", body=b"1", expected_version=0),
                          s.DocPut(ns="configs", id="x", body=b"2", expected_version=0),
                          s.LogAppend(log="events", records=[b"a", b"b"]),
                          s.Get(ns="test", key=b"k"),
                          s.LogAppend(log="events", records=[b"c"]),
                          s.LogCommit(group="g", log="events", offset=99)])
    assert answers[0] == 1
    assert isinstance(answers[1], s.Conflict)
    assert answers[2] == s.AppendResult(first_offset=0, next_offset=2)
    assert answers[3] is None
    assert answers[4] == s.AppendResult(first_offset=2, next_offset=3)
    assert isinstance(answers[5], s.BadRequest)


def test_consumer_lag_is_exported(storage_daemon, client_for):
    d = storage_daemon()
    c = client_for(d)
    c.call(s.LogAppend(log="events", records=[b"x"] * 10))
    c.call(s.LogCommit(group="processor", log="events", offset=4))
    c.call(s.LogAppend(log="events", records=[b"y"] * 5))
    expected = 'optimizer_storage_log_lag_records{group="processor",log="events"} 11.0'
    wait_until(lambda: expected in http_get(d.admin_url("/metrics"))[1].decode(), 10)


def test_bad_input_gets_typed_errors_and_the_worker_stays_up(storage_daemon, client_for):
    d = storage_daemon()
    pid = d.services()["storage"]["pid"]
    c = client_for(d)
    with pytest.raises(s.TooLarge):
        c.call(s.Put(ns="test", key=b"k", value=b"x" * (s.MAX_VALUE_BYTES + 1)))
    with pytest.raises(s.UnknownNamespace):
        c.call(s.Get(ns="no-such-namespace", key=b"k"))
    with pytest.raises(s.BadRequest):
        c.call(s.Scan(ns="test", limit=0))
    with pytest.raises(s.BadRequest):
        c.call(s.LogAppend(log="bad name with spaces", records=[b"x"]))
    # Garbage frames straight onto the socket: a malformed request is answered with an error.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("ipc://" + os.path.join(d.runtime, s.STORAGE_SOCKET))
    for frame in (b"", b"\xc1", os.urandom(300), msgspec.msgpack.encode({"id": 1, "op": 7})):
        sock.send(frame)
        assert sock.poll(5000), "no answer to a malformed request"
        reply = s.decode_reply(sock.recv())
        assert not reply.ok and reply.error.code == s.StorageErrorCode.BAD_REQUEST
    sock.send_multipart([b"a", b"b", b"c"])  # wrong frame count: dropped
    sock.close()
    ctx.term()
    assert c.call(s.Put(ns="test", key=b"k", value=b"v")) is None
    assert d.services()["storage"]["pid"] == pid and d.services()["storage"]["restarts"] == 0


def test_sigkill_mid_stream_loses_no_acknowledged_append(storage_daemon, client_for, tmp_path):
    d = storage_daemon()
    acked = tmp_path / "acked.txt"
    appender = subprocess.Popen([sys.executable, str(HERE / "appender.py"), d.runtime,
                                 "events", str(acked)], env=d.env)
    try:
        wait_until(lambda: acked.exists() and acked.stat().st_size > 20_000, 30)
        c = client_for(d)
        c.call(s.LogCommit(group="processor", log="events", offset=100))
        old = d.services()["storage"]["pid"]
        os.kill(old, signal.SIGKILL)
        d.wait_service("storage", lambda x: x["state"] == "ready" and x["pid"] != old, 20)
        size = acked.stat().st_size  # appends go on against the new process
        wait_until(lambda: acked.stat().st_size > size + 20_000, 30)
    finally:
        appender.send_signal(signal.SIGTERM)
        appender.wait(10)
    records = []
    offset = 0
    while True:
        page = c.call(s.LogRead(log="events", offset=offset, max_records=10_000))
        records += page.records
        if not page.records:
            break
        offset = page.next_offset
    assert [r.offset for r in records] == list(range(len(records))), "offsets have gaps"
    payloads = [r.payload.decode() for r in records]
    assert len(set(payloads)) == len(payloads), "a payload was stored twice"
    by_offset = {r.offset: r.payload.decode() for r in records}
    lines = acked.read_text().splitlines()
    assert len(lines) > 1000
    for line in lines:
        offset_text, payload = line.split(" ")
        assert by_offset.get(int(offset_text)) == payload, f"acknowledged {line!r} is missing"
    assert c.call(s.LogCommitted(group="processor", log="events")) == 100


def test_embedded_event_log_resumes_from_the_committed_offset(storage_daemon):
    d = storage_daemon()
    config = load_config(d.config_path)

    async def scenario():
        producer = open_producer(config, d.runtime)
        await producer.append([b"e%d" % i for i in range(10)])
        first = open_consumer(config, d.runtime, "processor")
        got = await first.poll(max_records=4, timeout=1)
        assert [r.payload for r in got] == [b"e0", b"e1", b"e2", b"e3"]
        await first.commit(got)
        await first.poll(max_records=4, timeout=1)  # read, never committed: comes again
        await first.close()
        second = open_consumer(config, d.runtime, "processor")
        again = await second.poll(max_records=100, timeout=1)
        assert [r.offset for r in again] == list(range(4, 10))
        # A long poll is answered by the next append, not by its timeout.
        waiting = asyncio.create_task(second.poll(timeout=20))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await producer.append([b"late"])
        late = await asyncio.wait_for(waiting, 5)
        assert [r.payload for r in late] == [b"late"]
        await second.close()
        await producer.close()

    asyncio.run(scenario())


def test_backup_and_restore_while_running(storage_daemon, client_for, tmp_path):
    d = storage_daemon()
    c = client_for(d)
    c.call(s.Put(ns="test", key=b"k", value=b"before"))
    c.call(s.LogAppend(log="events", records=[b"a", b"b"]))
    target = tmp_path / "backup"
    r = d.ctl("backup", str(target))
    assert r.returncode == 0, r.stderr
    assert d.ctl("backup", str(target)).returncode == 2  # never overwrites
    c.call(s.Put(ns="test", key=b"k", value=b"after"))
    c.call(s.LogAppend(log="events", records=[b"c"]))
    r = d.ctl("restore", str(target))
    assert r.returncode == 0, r.stderr
    assert c.call(s.Get(ns="test", key=b"k")) == b"before"
    assert c.call(s.LogInfo(log="events")).next_offset == 2
    assert c.call(s.LogAppend(log="events", records=[b"d"])).first_offset == 2


def test_backup_archive_holds_store_config_and_manifest_and_restores(storage_daemon,
                                                                     client_for, tmp_path):
    d = storage_daemon()
    c = client_for(d)
    c.call(s.Put(ns="test", key=b"k", value=b"archived"))
    target = tmp_path / "nested" / "optimizer.tar.gz"
    r = d.ctl("backup", str(target))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"archive of \d+ keys and {re.escape(d.config_path)} written to "
                     rf"{re.escape(str(target))}", r.stdout), r.stdout
    assert os.stat(target).st_mode & 0o777 == 0o600
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("manifest.json"))
        config = tar.extractfile(f"config/{os.path.basename(d.config_path)}").read()
    assert "store" in names and any(n.startswith("store/") for n in names)
    assert manifest["backend"] == "leveldb" and manifest["store"]["keys"] >= 1
    assert config == open(d.config_path, "rb").read()
    assert manifest["config"]["sha256"] == hashlib.sha256(config).hexdigest()
    assert d.ctl("backup", str(target)).returncode == 2  # never overwrites
    c.call(s.Put(ns="test", key=b"k", value=b"changed"))
    r = d.ctl("restore", str(target))
    assert r.returncode == 0, r.stderr
    assert c.call(s.Get(ns="test", key=b"k")) == b"archived"
    assert sorted(os.listdir(target.parent)) == ["optimizer.tar.gz"]  # nothing left behind
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    r = d.ctl("restore", str(junk))
    assert r.returncode == 2 and "not a backup archive" in r.stderr


def test_document_changes_are_published_on_redis(storage_daemon, client_for, redis_url):
    import redis

    d = storage_daemon(redis_url=redis_url)
    pubsub = redis.Redis.from_url(redis_url).pubsub()
    pubsub.subscribe("llm-optimizer:changes")
    wait_until(lambda: pubsub.get_message(timeout=0.1), 5)  # the subscribe confirmation
    c = client_for(d)
    c.call(s.DocPut(ns="configs", id="rest_api", body=b"{}"))
    c.call(s.DocPut(ns="test", id="ignored", body=b"{}"))
    message = wait_until(lambda: pubsub.get_message(timeout=0.1), 5)
    assert msgspec.json.decode(message["data"]) == {"ns": "configs", "id": "rest_api",
                                                     "version": 1}
    pubsub.close()
    assert d.services()["storage"]["health"] == "ok"


def test_unreachable_redis_makes_storage_degraded_not_down(storage_daemon, client_for):
    closed = f"redis://:secret@127.0.0.1:{free_port()}/0"
    d = storage_daemon(redis_url=closed)
    entry = d.wait_service("storage", lambda x: x["health"] == "degraded", 10)
    assert "redis" in entry["reason"] and "secret" not in entry["reason"]
    c = client_for(d)
    assert c.call(s.DocPut(ns="configs", id="x", body=b"{}")) == 1  # durable writes go on
    assert alive(entry["pid"])
