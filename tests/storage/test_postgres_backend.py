"""PostgresBackend on its own: migrations, errors without secrets, reconnecting, several writers.

The semantics shared with LevelDB are in test_backend_semantics.py; the restart under load is
in test_postgres_restart.py, the daemon in test_postgres_daemon.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
import tomllib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from ipc import storage as s
from workers.storage.backend import validate
from workers.storage.postgres_backend import BadDsn, PostgresBackend
from workers.storage.postgres_migrations import MIGRATION_LOCK, SchemaTooNew, load_migrations

from .pg_cluster import PG_PASSWORD, PgCluster, free_port

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)


async def opened(dsn: str, pool_size: int = 2) -> PostgresBackend:
    backend = PostgresBackend(dsn, pool_size)
    await backend.open()
    return backend


async def write(b: PostgresBackend, *ops: s.Op) -> list[Any]:
    for op in ops:
        validate(op)
    return await b.write(list(ops))


def sql(dsn: str, query: str, params: Any = None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def secret_free(*texts: str) -> None:
    for text in texts:
        assert PG_PASSWORD not in text, f"the password leaked: {text!r}"


# --- migrations ------------------------------------------------------------------------------

def test_migration_files_ship_as_package_data() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial" and "CREATE TABLE kv" in migrations[0].sql
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "migrations/*.sql" in package_data["workers.storage"]


def test_open_migrates_once_and_is_idempotent(pg_dsn: str) -> None:
    newest = load_migrations()[-1].version

    async def main() -> None:
        b = await opened(pg_dsn)
        assert b.schema_version == newest and b.stats()["schema_version"] == newest
        await b.close()

    run(main())
    rows = sql(pg_dsn, "SELECT version, name, applied_at FROM schema_migrations ORDER BY 1")
    assert [(v, n) for v, n, _ in rows] == [(m.version, m.name) for m in load_migrations()]
    tables = {r[0] for r in sql(pg_dsn, "SELECT tablename FROM pg_tables "
                                        "WHERE schemaname = current_schema()")}
    assert {"kv", "ts_points", "doc_versions", "doc_current", "log_records", "log_heads",
            "consumer_offsets", "schema_migrations"} <= tables
    run(main())  # again: nothing new is applied
    run(main())
    assert sql(pg_dsn, "SELECT version, name, applied_at FROM schema_migrations ORDER BY 1") \
        == rows


def test_concurrent_opens_migrate_once_under_the_advisory_lock(pg_cluster: PgCluster) -> None:
    dsn = pg_cluster.dsn(pg_cluster.create_database())

    async def main() -> None:
        # Someone holds the migration lock: open() waits for it instead of colliding.
        holder = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        waiting = asyncio.create_task(opened(dsn))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "open() did not wait for the migration lock"
        await holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])
        await holder.close()
        first = await asyncio.wait_for(waiting, 10)
        await first.close()

    run(main())
    fresh = pg_cluster.dsn(pg_cluster.create_database())

    async def many() -> None:
        backends = await asyncio.gather(*(opened(fresh, 1) for _ in range(6)))
        for b in backends:
            assert b.schema_version == len(load_migrations())
            await b.close()

    run(many())
    assert sql(fresh, "SELECT count(*) FROM schema_migrations")[0][0] == len(load_migrations())


def test_a_migration_lock_held_too_long_is_unavailable(pg_dsn: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.storage import postgres_migrations

    monkeypatch.setattr(postgres_migrations, "MIGRATION_LOCK_TIMEOUT_MS", 300)

    async def main() -> None:
        holder = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
        await holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        with pytest.raises(s.Unavailable, match="lock timeout"):
            await opened(pg_dsn)
        await holder.close()
        b = await opened(pg_dsn)  # retried once the lock is free: fine
        await b.close()

    run(main())


def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    async def main() -> None:
        b = await opened(pg_dsn)
        await b.close()

    run(main())
    newest = load_migrations()[-1].version
    sql(pg_dsn, "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')",
        [newest + 1])
    with pytest.raises(SchemaTooNew) as caught:
        run(main())
    assert not isinstance(caught.value, s.StorageFailure), "must not be retried as Unavailable"
    text = str(caught.value)
    assert f"schema version {newest + 1}" in text and f"knows ({newest})" in text
    assert "Upgrade the optimizer" in text
    assert sql(pg_dsn, "SELECT max(version) FROM schema_migrations")[0][0] == newest + 1


# --- errors ----------------------------------------------------------------------------------

def test_unreachable_server_is_unavailable_and_the_password_stays_secret(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = f"postgresql://optimizer:{PG_PASSWORD}@127.0.0.1:{free_port()}/nothing"
    started = time.monotonic()
    with pytest.raises(s.Unavailable) as caught:
        run(opened(dsn))
    assert time.monotonic() - started < 10
    assert "cannot connect to PostgreSQL" in str(caught.value)
    assert "refused" in str(caught.value).lower()
    secret_free(str(caught.value), repr(caught.value), caplog.text)

    async def closed() -> None:
        b = PostgresBackend(dsn, 1)
        for call in (b.check(), b.read(s.Get(ns="test", key=b"k")),
                     b.write([s.Put(ns="test", key=b"k", value=b"")])):
            with pytest.raises(s.Unavailable, match="not open"):
                await call
    run(closed())


def test_wrong_password_is_unavailable_with_the_reason(pg_cluster: PgCluster) -> None:
    wrong = pg_cluster.dsn("postgres").replace(PG_PASSWORD, "not-" + PG_PASSWORD[::-1])
    with pytest.raises(s.Unavailable) as caught:
        run(opened(wrong))
    assert "password authentication failed" in str(caught.value)
    assert PG_PASSWORD[::-1] not in str(caught.value)


def test_an_unparsable_dsn_is_a_config_error_that_does_not_echo_it() -> None:
    dsn = f"host=127.0.0.1 password={PG_PASSWORD} dbname"
    with pytest.raises(BadDsn) as caught:
        run(opened(dsn))
    assert "postgres_dsn" in str(caught.value)
    secret_free(str(caught.value))


def test_check_and_close(pg_dsn: str) -> None:
    async def main() -> None:
        b = await opened(pg_dsn)
        await b.check()
        stats = await b.read(s.Stats())
        assert stats["backend"] == "postgres" and stats["available"] is True
        assert stats["tables"]["kv"]["bytes"] > 0
        secret_free(repr(stats))
        await b.close()
        with pytest.raises(s.Unavailable):
            await b.check()
        await b.close()  # twice is fine
    run(main())


def test_server_down_then_back(pg_new_cluster: Callable[[], PgCluster],
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cluster = pg_new_cluster()
    dsn = cluster.dsn(cluster.create_database())

    async def main() -> None:
        b = await opened(dsn, 3)
        assert await write(b, s.LogAppend(log="l", records=[b"a"])) == [s.AppendResult(0, 1)]
        await asyncio.to_thread(cluster.stop)
        for attempt in range(3):  # stale pooled connections first, then no server at all
            started = time.monotonic()
            with pytest.raises(s.Unavailable) as caught:
                await write(b, s.LogAppend(log="l", records=[b"lost"]))
            assert time.monotonic() - started < 6, f"attempt {attempt} took too long"
            secret_free(str(caught.value))
        with pytest.raises(s.Unavailable):
            await b.read(s.LogInfo(log="l"))
        with pytest.raises(s.Unavailable):
            await b.check()
        assert b.stats()["available"] is False
        await asyncio.to_thread(cluster.start)
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects by itself
            try:
                await b.check()
                break
            except s.Unavailable:
                assert time.monotonic() < deadline, "no reconnection within 30 s"
                await asyncio.sleep(0.2)
        assert await write(b, s.LogAppend(log="l", records=[b"b"])) == [s.AppendResult(1, 2)]
        result = await b.read(s.LogRead(log="l", offset=0))
        assert [r.payload for r in result.records] == [b"a", b"b"]
        await b.close()

    run(main())
    secret_free(caplog.text)


# --- several writers -------------------------------------------------------------------------

def test_concurrent_writers_keep_offsets_gap_free_and_versions_serial(pg_dsn: str) -> None:
    """Two backends (as two storage workers would) and concurrent groups on each."""
    async def main() -> None:
        one, two = await opened(pg_dsn, 4), await opened(pg_dsn, 4)

        async def appender(b: PostgresBackend, name: str) -> list[s.AppendResult]:
            got = []
            for i in range(15):
                results = await write(b, *[s.LogAppend(log=log, records=[
                    f"{name}-{i}-{j}".encode()] * (j + 1)) for j, log in
                    enumerate(["x", "y", "x"])])
                got += [r for r, log in zip(results, ["x", "y", "x"], strict=True)
                        if log == "x"]
            return got

        batches = await asyncio.gather(*(appender(b, f"{k}{n}") for k, b in
                                         (("one", one), ("two", two)) for n in range(3)))
        spans = sorted((r.first_offset, r.next_offset) for rs in batches for r in rs)
        covered = [o for first, nxt in spans for o in range(first, nxt)]
        assert covered == list(range(len(covered))), "offsets overlap or leave gaps"
        info = await one.read(s.LogInfo(log="x"))
        assert info.next_offset == len(covered)

        # Racing creations and updates of the same documents: exactly one wins each round.
        for round_ in range(10):
            doc = f"doc{round_}"
            results = await asyncio.gather(*(
                write(b, s.DocPut(ns="configs", id=doc, body=b"%d" % n, expected_version=0))
                for n, b in enumerate([one, two, one, two])))
            flat = [r[0] for r in results]
            assert flat.count(1) == 1, flat
            assert sum(isinstance(r, s.Conflict) for r in flat) == 3, flat
            updates = [r[0] for r in await asyncio.gather(*(
                write(b, s.DocPut(ns="configs", id=doc, body=b"u", expected_version=1))
                for b in (one, two)))]
            assert updates.count(2) == 1, updates
            assert sum(isinstance(r, s.Conflict) for r in updates) == 1, updates
            history = await one.read(s.DocHistory(ns="configs", id=doc))
            assert [d.version for d in history] == [2, 1]
        await one.close()
        await two.close()

    run(main())


def test_large_appends(pg_dsn: str) -> None:
    async def main() -> float:
        b = await opened(pg_dsn)
        records = [os.urandom(100) for _ in range(50_000)]
        started = time.perf_counter()
        [result] = await write(b, s.LogAppend(log="big", records=records))
        elapsed = time.perf_counter() - started
        assert result == s.AppendResult(0, 50_000)
        got: list[bytes] = []
        offset = 0
        while offset < 50_000:
            page = await b.read(s.LogRead(log="big", offset=offset, max_records=s.MAX_LOG_READ))
            got += [r.payload for r in page.records]
            offset = page.next_offset
        assert got == records
        await b.close()
        return elapsed

    elapsed = run(main())
    assert elapsed < 10, f"appending 50,000 records took {elapsed:.1f} s"


# --- backup ----------------------------------------------------------------------------------

def test_pg_dump_and_pg_restore_round_trip(pg_cluster: PgCluster, pg_bin: str,
                                           tmp_path: Any) -> None:
    """The backup the docs recommend (the worker has none for PostgreSQL): pg_dump -Fc of the
    live database, pg_restore into an empty one, and the backend carries on from there."""
    source = pg_cluster.create_database()
    target = pg_cluster.create_database()
    env = {**os.environ, "PGPASSWORD": PG_PASSWORD}  # not on the command line

    def url(db: str) -> str:
        return f"postgresql://optimizer@127.0.0.1:{pg_cluster.port}/{db}"

    async def fill() -> None:
        b = await opened(pg_cluster.dsn(source))
        await write(b, s.Put(ns="test", key=b"k", value=b"v"),
                    s.DocPut(ns="configs", id="c", body=b"1"),
                    s.LogAppend(log="l", records=[b"a", b"b", b"c"]),
                    s.LogCommit(group="g", log="l", offset=2))
        assert await b.apply_retention(0, 2) == 1
        await b.close()

    async def check() -> None:
        b = await opened(pg_cluster.dsn(target))
        assert await b.read(s.Get(ns="test", key=b"k")) == b"v"
        assert (await b.read(s.DocGet(ns="configs", id="c"))).body == b"1"
        assert await b.read(s.LogInfo(log="l")) == s.LogState("l", 1, 3)
        assert await b.read(s.LogCommitted(group="g", log="l")) == 2
        assert await write(b, s.LogAppend(log="l", records=[b"d"])) == [s.AppendResult(3, 4)]
        await b.close()

    asyncio.run(fill())
    dump = str(tmp_path / "optimizer.dump")
    for cmd in ([os.path.join(pg_bin, "pg_dump"), "--format=custom", "--no-owner",
                 f"--file={dump}", f"--dbname={url(source)}"],
                [os.path.join(pg_bin, "pg_restore"), "--no-owner", "--exit-on-error",
                 "--single-transaction", f"--dbname={url(target)}", dump]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    asyncio.run(check())
