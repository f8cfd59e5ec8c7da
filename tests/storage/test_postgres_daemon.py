"""optimizerd with ``[storage] backend = "postgres"``, end to end.

The DSN (with its password) reaches the daemon only through
LLM_OPTIMIZER__STORAGE__POSTGRES_DSN; every other service is disabled. Clients talk to the
storage worker over storage.sock with ``SyncStorageClient``, and to the daemon with
``optimizerctl``. Every daemon runs in its own session and is killed at teardown
(``make_daemon`` of tests/conftest.py).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import wait_until
from ipc import storage as s
from workers.storage.postgres_backend import PostgresBackend
from workers.storage_client import SyncStorageClient

from .pg_cluster import PG_PASSWORD, PgCluster

pytestmark = pytest.mark.timeout(120)
DSN_VAR = "LLM_OPTIMIZER__STORAGE__POSTGRES_DSN"
RETRY_PAUSE = 0.02  # a writer's pause before it retries appends refused while the server is down


def postgres_daemon(make_daemon: Callable[..., Any], dsn: str) -> Any:
    return make_daemon(builtins=["storage"], extra={"storage": {"backend": "postgres"}},
                       env={DSN_VAR: dsn})


def storage_status(d: Any) -> dict[str, Any]:
    """The storage service's entry of `optimizerctl --runtime-dir DIR status --json`."""
    done = d.ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    return next(x for x in doc["services"] if x["name"] == "storage")


def no_password_anywhere(d: Any) -> None:
    with open(d.config_path) as f:
        assert PG_PASSWORD not in f.read()
    assert PG_PASSWORD not in d.output(), "the password shows in the daemon's output"


def test_daemon_serves_storage_from_postgres(make_daemon: Callable[..., Any],
                                             pg_cluster: PgCluster) -> None:
    dsn = pg_cluster.dsn(pg_cluster.create_database())
    d = postgres_daemon(make_daemon, dsn).start()
    entry = storage_status(d)
    assert (entry["state"], entry["health"]) == ("ready", "ok"), entry
    client = SyncStorageClient(d.runtime)
    try:
        client.call(s.Put(ns="test", key=b"k", value=b"v"))
        assert client.call(s.Get(ns="test", key=b"k")) == b"v"
        assert client.call(s.DocPut(ns="configs", id="c", body=b"1")) == 1
        with pytest.raises(s.Conflict):
            client.call(s.DocPut(ns="configs", id="c", body=b"2", expected_version=0))
        answers = client.pipeline([s.LogAppend(log="events", records=[b"%d" % i])
                                   for i in range(200)])
        assert [a.first_offset for a in answers] == list(range(200))
        page = client.call(s.LogRead(log="events", offset=150, max_records=10))
        assert [r.payload for r in page.records] == [b"%d" % i for i in range(150, 160)]
        client.call(s.LogCommit(group="g", log="events", offset=160))
        assert client.call(s.LogCommitted(group="g", log="events")) == 160
        with pytest.raises(s.BadRequest):
            client.call(s.LogCommit(group="g", log="events", offset=201))
        with pytest.raises(s.UnknownNamespace):
            client.call(s.Get(ns="nope", key=b"k"))
    finally:
        client.close()
    stats = d.ctl("call", "storage", "stats")
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert doc["backend"] == "postgres" and doc["logs"]["events"]["next_offset"] == 200
    backup = d.ctl("backup", str(d.dir / "backup"))
    assert backup.returncode == 0 and "pg_dump of" in backup.stdout, backup.stderr
    assert (d.dir / "backup" / "postgres.dump").stat().st_size > 0
    # The rows are really in PostgreSQL.
    rows = pg_cluster.admin("SELECT count(*) FROM log_records WHERE log = 'events'",
                            dsn.rsplit("/", 1)[1])
    assert rows == [(200,)]
    stop = d.ctl("stop")
    assert stop.returncode == 0, stop.stderr
    assert d.wait_exit(30) == 0
    no_password_anywhere(d)


def test_daemon_refuses_a_database_with_a_newer_schema(make_daemon: Callable[..., Any],
                                                       pg_cluster: PgCluster) -> None:
    dbname = pg_cluster.create_database()
    dsn = pg_cluster.dsn(dbname)

    async def migrate() -> None:
        backend = PostgresBackend(dsn, 1)
        await backend.open()
        await backend.close()

    asyncio.run(migrate())
    pg_cluster.admin("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')",
                     dbname)
    d = make_daemon(builtins=["storage"], env={DSN_VAR: dsn},
                    extra={"storage": {"backend": "postgres", "max_restarts": 0}})
    d.start(wait_ready=False)
    d.wait_service("storage", lambda e: e["state"] == "failed", timeout=30)
    assert storage_status(d)["restarts"] == 0
    wait_until(lambda: "schema version 999" in d.output(), 10, message=d.tail)
    assert "newer than the newest this optimizer knows" in d.output()
    assert pg_cluster.admin("SELECT max(version) FROM schema_migrations", dbname) == [(999,)]
    no_password_anywhere(d)


def test_daemon_is_ready_but_degraded_while_postgres_is_down(
        make_daemon: Callable[..., Any], pg_new_cluster: Callable[[], PgCluster]) -> None:
    cluster = pg_new_cluster()
    dsn = cluster.dsn(cluster.create_database())
    cluster.stop()
    d = postgres_daemon(make_daemon, dsn).start()  # READY: a down database does not block it
    entry = wait_until(lambda: (e := storage_status(d))["health"] == "degraded" and e, 15,
                       message=lambda: json.dumps(storage_status(d)))
    assert entry["state"] == "ready", entry
    print(f"\nstorage while PostgreSQL is down: {json.dumps(entry)}")
    assert "PostgreSQL" in entry["reason"] and "refused" in entry["reason"].lower(), entry
    assert PG_PASSWORD not in entry["reason"]
    client = SyncStorageClient(d.runtime)
    try:
        with pytest.raises(s.Unavailable):
            client.call(s.Put(ns="test", key=b"k", value=b"v"))
        cluster.start()
        wait_until(lambda: storage_status(d)["health"] == "ok", 40,
                   message=lambda: json.dumps(storage_status(d)))
        assert storage_status(d)["reason"] == ""
        client.call(s.Put(ns="test", key=b"k", value=b"v"))
        assert client.call(s.Get(ns="test", key=b"k")) == b"v"
        assert client.call(s.LogAppend(log="l", records=[b"a"])) == s.AppendResult(0, 1)
    finally:
        client.close()
    assert storage_status(d)["restarts"] == 0, "degraded must not mean restarted"
    no_password_anywhere(d)


def test_a_later_postgres_outage_shows_as_degraded_then_ok(
        make_daemon: Callable[..., Any], pg_new_cluster: Callable[[], PgCluster]) -> None:
    """Health follows the database after start too: the worker checks it periodically."""
    cluster = pg_new_cluster()
    d = postgres_daemon(make_daemon, cluster.dsn(cluster.create_database())).start()
    assert storage_status(d)["health"] == "ok"
    cluster.stop()
    entry = wait_until(lambda: (e := storage_status(d))["health"] == "degraded" and e, 30,
                       message=lambda: json.dumps(storage_status(d)))
    assert entry["state"] == "ready" and "PostgreSQL" in entry["reason"], entry
    assert PG_PASSWORD not in entry["reason"]
    cluster.start()
    wait_until(lambda: storage_status(d)["health"] == "ok", 40,
               message=lambda: json.dumps(storage_status(d)))
    assert storage_status(d)["restarts"] == 0


def test_appends_through_the_daemon_survive_a_postgres_restart(
        make_daemon: Callable[..., Any], pg_new_cluster: Callable[[], PgCluster]) -> None:
    cluster = pg_new_cluster()
    dsn = cluster.dsn(cluster.create_database())
    d = postgres_daemon(make_daemon, dsn).start()
    client = SyncStorageClient(d.runtime, timeout=10)
    acked: dict[bytes, int] = {}
    attempted: set[bytes] = set()
    failed = 0
    restarted = threading.Event()
    after_restart = 0
    restarter = threading.Timer(0.5, lambda: (cluster.restart("fast"), restarted.set()))
    restarter.start()
    try:
        i = attempt = 0
        deadline = time.monotonic() + 60
        while not (restarted.is_set() and after_restart >= 100):
            assert time.monotonic() < deadline, "appends did not work again after the restart"
            payloads = [f"{i}-{k}-a{attempt}".encode() for k in range(5)]
            attempted.update(payloads)
            answers = client.pipeline([s.LogAppend(log="events", records=[p])
                                       for p in payloads])
            for p, answer in zip(payloads, answers, strict=True):
                if isinstance(answer, s.AppendResult):
                    acked[p] = answer.first_offset
                    after_restart += restarted.is_set()
                else:
                    assert isinstance(answer, s.Unavailable), answer
                    failed += 1
            if any(not isinstance(a, s.AppendResult) for a in answers):
                attempt += 1
                time.sleep(RETRY_PAUSE)
            else:
                i, attempt = i + 1, 0
        records: list[s.LogRecord] = []
        offset = 0
        while True:
            page = client.call(s.LogRead(log="events", offset=offset,
                                         max_records=s.MAX_LOG_READ))
            if not page.records:
                break
            records += page.records
            offset = page.next_offset
    finally:
        restarter.join()
        client.close()
    assert [r.offset for r in records] == list(range(len(records)))
    where = {r.payload: r.offset for r in records}
    assert len(where) == len(records), "a payload was stored twice"
    assert set(where) <= attempted
    assert all(where.get(p) == o for p, o in acked.items()), "an acknowledged append was lost"
    print(f"\n{len(acked)} appends acknowledged, {failed} failed during the restart")
    assert storage_status(d)["state"] == "ready"
