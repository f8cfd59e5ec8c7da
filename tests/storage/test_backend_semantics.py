"""The same semantic tests against every storage backend: LevelDB and PostgreSQL are
interchangeable behind ``workers.storage.backend.Backend``.

Each test runs once per backend (``store`` is parametrized), on a fresh LevelDB in a temp dir or
a fresh database of the session's PostgreSQL cluster. Operations go through ``validate`` first,
as the storage server sends them. ``test_backends_agree_on_a_random_workload`` then drives both
with the same random groups of operations and compares every answer.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ipc import storage as s
from workers.storage import leveldb_backend, postgres_backend
from workers.storage.backend import Backend, now_ms, validate
from workers.storage.leveldb_backend import LevelDBBackend
from workers.storage.postgres_backend import PostgresBackend

pytestmark = pytest.mark.timeout(60)

Body = Callable[[Backend], Awaitable[Any]]


class Store:
    """Makes, opens and closes a backend of one kind around each ``run(body)``."""

    def __init__(self, kind: str, factory: Callable[[], Backend]):
        self.kind, self.factory = kind, factory

    def run(self, body: Body) -> Any:
        async def main() -> Any:
            backend = self.factory()
            await backend.open()
            try:
                return await body(backend)
            finally:
                await backend.close()
        return asyncio.run(main())


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path) -> Store:
    if kind == "leveldb":
        return Store(kind, lambda: LevelDBBackend(str(tmp_path / "leveldb")))
    dsn = request.getfixturevalue("pg_dsn")
    return Store(kind, lambda: PostgresBackend(dsn, 2))


@pytest.fixture(params=["leveldb", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path) -> Store:
    return make_store(request.param, request, tmp_path)


async def group(b: Backend, *ops: s.Op) -> list[Any]:
    """One write group, validated like the server does: per op, a result or a failure."""
    for op in ops:
        validate(op)
    return await b.write(list(ops))


async def write(b: Backend, op: s.Op) -> Any:
    """One write that must succeed."""
    [result] = await group(b, op)
    if isinstance(result, s.StorageFailure):
        raise result
    return result


async def read(b: Backend, op: s.Op) -> Any:
    validate(op)
    return await b.read(op)


def keys(result: s.ScanResult) -> list[bytes]:
    return [r.key for r in result.records]


# --- key/value -------------------------------------------------------------------------------

def test_put_get_overwrite_delete(store: Store) -> None:
    async def body(b: Backend) -> None:
        assert await read(b, s.Get(ns="test", key=b"k")) is None
        assert await write(b, s.Put(ns="test", key=b"k", value=b"v1")) is None
        assert await read(b, s.Get(ns="test", key=b"k")) == b"v1"
        await write(b, s.Put(ns="test", key=b"k", value=b"v2"))
        assert await read(b, s.Get(ns="test", key=b"k")) == b"v2"
        await write(b, s.Put(ns="test", key=b"empty", value=b""))
        assert await read(b, s.Get(ns="test", key=b"empty")) == b""
        assert await read(b, s.Get(ns="state", key=b"k")) is None, "namespaces are separate"
        assert await write(b, s.Delete(ns="test", key=b"k")) is None
        assert await read(b, s.Get(ns="test", key=b"k")) is None
        await write(b, s.Delete(ns="test", key=b"never-there"))  # deleting nothing is fine
        binary = bytes(range(256)) * 4
        await write(b, s.Put(ns="test", key=b"\x00\xff\x00", value=binary))
        assert await read(b, s.Get(ns="test", key=b"\x00\xff\x00")) == binary
    store.run(body)


def test_puts_and_deletes_of_one_group_apply_in_order(store: Store) -> None:
    async def body(b: Backend) -> None:
        results = await group(
            b, s.Put(ns="test", key=b"a", value=b"1"), s.Delete(ns="test", key=b"a"),
            s.Delete(ns="test", key=b"b"), s.Put(ns="test", key=b"b", value=b"2"),
            s.Put(ns="test", key=b"c", value=b"1"), s.Put(ns="test", key=b"c", value=b"3"),
            s.Batch(ops=[s.Put(ns="test", key=b"d", value=b"x"),
                         s.Delete(ns="test", key=b"c"),
                         s.Put(ns="state", key=b"d", value=b"y")]))
        assert results == [None] * 7
        assert await read(b, s.Get(ns="test", key=b"a")) is None
        assert await read(b, s.Get(ns="test", key=b"b")) == b"2"
        assert await read(b, s.Get(ns="test", key=b"c")) is None
        assert await read(b, s.Get(ns="test", key=b"d")) == b"x"
        assert await read(b, s.Get(ns="state", key=b"d")) == b"y"
    store.run(body)


def test_scan_orders_by_bytes_and_pages_with_a_cursor(store: Store) -> None:
    all_keys = sorted([b"a", b"a\x00", b"a\x00\x01", b"ab", b"a\xff", b"a\xff\xff", b"b",
                       b"\x00", b"\xff", b"\xff\xff\x01", b"B", b"aa", b"abc"])

    async def body(b: Backend) -> None:
        await group(b, *[s.Put(ns="test", key=k, value=k * 2) for k in all_keys],
                    s.Put(ns="state", key=b"a", value=b"other ns"))
        full = await read(b, s.Scan(ns="test", limit=100))
        assert keys(full) == all_keys and full.next_cursor is None
        assert [r.value for r in full.records] == [k * 2 for k in all_keys]
        # Pages of 3: the cursor is the last key returned; the next page starts after it.
        got, cursor = [], None
        while True:
            page = await read(b, s.Scan(ns="test", limit=3, cursor=cursor))
            got += keys(page)
            if page.next_cursor is None:
                break
            assert page.next_cursor == page.records[-1].key
            cursor = page.next_cursor
        assert got == all_keys
        # Exactly `limit` records left: no next cursor, as there is nothing after them.
        last = await read(b, s.Scan(ns="test", limit=2, cursor=all_keys[-3]))
        assert keys(last) == all_keys[-2:] and last.next_cursor is None
        for prefix in (b"a", b"a\x00", b"a\xff", b"\xff", b"ab", b"zz", b"\xff\xff"):
            want = [k for k in all_keys if k.startswith(prefix)]
            assert keys(await read(b, s.Scan(ns="test", prefix=prefix))) == want, prefix
            got, cursor = [], None
            while True:
                page = await read(b, s.Scan(ns="test", prefix=prefix, limit=1, cursor=cursor))
                got += keys(page)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert got == want, prefix
        # A cursor that is not a stored key; one before the prefix; one past everything.
        assert keys(await read(b, s.Scan(ns="test", cursor=b"a\x00\x00"))) == \
            [k for k in all_keys if k > b"a\x00\x00"]
        assert keys(await read(b, s.Scan(ns="test", prefix=b"b", cursor=b"a"))) == [b"b"]
        assert keys(await read(b, s.Scan(ns="test", prefix=b"a", cursor=b"b"))) == []
        assert keys(await read(b, s.Scan(ns="test", cursor=b"\xff\xff\xff"))) == []
        assert keys(await read(b, s.Scan(ns="state"))) == [b"a"]
        assert keys(await read(b, s.Scan(ns="jobs"))) == []
    store.run(body)


# --- time series -----------------------------------------------------------------------------

def test_time_series_range_overwrite_and_limit(store: Store) -> None:
    async def body(b: Backend) -> None:
        await write(b, s.TsAppend(ns="windows", series="cost.daily", points=[
            s.Point(30, b"c"), s.Point(10, b"a"), s.Point(20, b"b"), s.Point(-5, b"neg"),
            s.Point(20, b"b2")]))  # one value per ts: the later one wins
        await write(b, s.TsAppend(ns="windows", series="cost.daily", points=[
            s.Point(10, b"a2"), s.Point(40, b"d")]))
        await write(b, s.TsAppend(ns="windows", series="other", points=[s.Point(15, b"x")]))
        await write(b, s.TsAppend(ns="windows", series="empty", points=[]))
        full = await read(b, s.TsRange(ns="windows", series="cost.daily", start=-100, end=100))
        assert full == [s.Point(-5, b"neg"), s.Point(10, b"a2"), s.Point(20, b"b2"),
                        s.Point(30, b"c"), s.Point(40, b"d")]
        # start <= ts < end
        assert await read(b, s.TsRange(ns="windows", series="cost.daily", start=10, end=30)) \
            == [s.Point(10, b"a2"), s.Point(20, b"b2")]
        assert await read(b, s.TsRange(ns="windows", series="cost.daily", start=10, end=10)) == []
        assert await read(b, s.TsRange(ns="windows", series="cost.daily", start=50, end=10)) == []
        assert await read(b, s.TsRange(ns="windows", series="cost.daily", start=-100, end=100,
                                       limit=2)) == [s.Point(-5, b"neg"), s.Point(10, b"a2")]
        assert await read(b, s.TsRange(ns="windows", series="other", start=0, end=100)) == \
            [s.Point(15, b"x")]
        assert await read(b, s.TsRange(ns="test", series="other", start=0, end=100)) == []
        # The extremes of the signed 64-bit range.
        lo, hi = -(1 << 63), (1 << 63) - 1
        await write(b, s.TsAppend(ns="windows", series="edge", points=[
            s.Point(lo, b"lo"), s.Point(hi - 1, b"hi"), s.Point(0, b"zero")]))
        assert await read(b, s.TsRange(ns="windows", series="edge", start=lo, end=hi)) == \
            [s.Point(lo, b"lo"), s.Point(0, b"zero"), s.Point(hi - 1, b"hi")]
    store.run(body)


def test_out_of_range_numbers_are_refused_before_the_backend() -> None:
    for op in (s.TsAppend(ns="test", series="x", points=[s.Point(1 << 63, b"")]),
               s.TsRange(ns="test", series="x", start=0, end=1 << 64),
               s.LogRead(log="l", offset=1 << 63), s.LogCommit(group="g", log="l", offset=1 << 70),
               s.DocGet(ns="test", id="d", version=1 << 63),
               s.DocGet(ns="test", id="d", version=-1),
               s.DocPut(ns="test", id="d", body=b"", expected_version=1 << 64)):
        with pytest.raises(s.BadRequest):
            validate(op)


# --- documents -------------------------------------------------------------------------------

def test_document_versions_and_optimistic_concurrency(store: Store) -> None:
    async def body(b: Backend) -> None:
        before = now_ms()
        assert await write(b, s.DocPut(ns="configs", id="route.main", body=b"v1")) == 1
        assert await write(b, s.DocPut(ns="configs", id="route.main", body=b"v2",
                                       expected_version=1)) == 2
        after = now_ms()
        doc = await read(b, s.DocGet(ns="configs", id="route.main"))
        assert (doc.id, doc.version, doc.body) == ("route.main", 2, b"v2")
        assert before <= doc.created_ms <= after
        assert (await read(b, s.DocGet(ns="configs", id="route.main", version=1))).body == b"v1"
        assert (await read(b, s.DocGet(ns="configs", id="route.main", version=0))).version == 2
        with pytest.raises(s.NotFound, match="configs/route.main version 3 does not exist"):
            await read(b, s.DocGet(ns="configs", id="route.main", version=3))
        with pytest.raises(s.NotFound, match="^configs/nope does not exist$"):
            await read(b, s.DocGet(ns="configs", id="nope"))
        with pytest.raises(s.NotFound):
            await read(b, s.DocGet(ns="findings", id="route.main"))  # namespaces are separate
        # Conflicts: refused alone, the rest of the group is applied.
        results = await group(
            b, s.DocPut(ns="configs", id="route.main", body=b"stale", expected_version=1),
            s.Put(ns="test", key=b"neighbour", value=b"applied"),
            s.DocPut(ns="configs", id="route.main", body=b"v3", expected_version=2),
            s.DocPut(ns="configs", id="route.main", body=b"v4", expected_version=3),
            s.DocPut(ns="configs", id="route.main", body=b"late", expected_version=3),
            s.DocPut(ns="configs", id="new", body=b"n1", expected_version=0),
            s.DocPut(ns="configs", id="new", body=b"dup", expected_version=0),
            s.DocPut(ns="configs", id="ghost", body=b"g", expected_version=4))
        assert isinstance(results[0], s.Conflict)
        assert str(results[0]) == "configs/route.main is at version 2, not 1"
        assert results[1:4] == [None, 3, 4]
        assert isinstance(results[4], s.Conflict)
        assert str(results[4]) == "configs/route.main is at version 4, not 3"
        assert results[5] == 1
        assert isinstance(results[6], s.Conflict)
        assert isinstance(results[7], s.Conflict)
        assert str(results[7]) == "configs/ghost is at version 0, not 4"
        assert await read(b, s.Get(ns="test", key=b"neighbour")) == b"applied"
        with pytest.raises(s.NotFound):
            await read(b, s.DocGet(ns="configs", id="ghost"))
        history = await read(b, s.DocHistory(ns="configs", id="route.main"))
        assert [(d.version, d.body) for d in history] == \
            [(4, b"v4"), (3, b"v3"), (2, b"v2"), (1, b"v1")]
        assert all(d.id == "route.main" for d in history)
        assert [d.version for d in await read(b, s.DocHistory(ns="configs", id="route.main",
                                                              limit=2))] == [4, 3]
        assert await read(b, s.DocHistory(ns="configs", id="nope")) == []
    store.run(body)


def test_document_list_by_prefix_with_cursor(store: Store) -> None:
    ids = sorted(["a", "a.b", "a:c", "a-d", "a_e", "ab", "abc", "B", "b.1", "b.2", "Z9", "a0"])

    async def body(b: Backend) -> None:
        await group(b, *[s.DocPut(ns="rollouts", id=i, body=i.encode()) for i in ids])
        await group(b, *[s.DocPut(ns="rollouts", id=i, body=i.encode() + b"!") for i in ids[::2]])
        await write(b, s.DocPut(ns="flags", id="a", body=b"other ns"))
        full = await read(b, s.DocList(ns="rollouts", limit=100))
        assert [d.id for d in full.documents] == ids and full.next_cursor is None
        for d in full.documents:  # current versions only
            bumped = ids.index(d.id) % 2 == 0
            assert (d.version, d.body) == ((2, d.id.encode() + b"!") if bumped
                                           else (1, d.id.encode()))
        for prefix in ("", "a", "a.", "ab", "b.", "zz", "a\x00", "é", "~"):
            want = [i for i in ids if i.startswith(prefix)]
            got, cursor = [], None
            while True:
                page = await read(b, s.DocList(ns="rollouts", prefix=prefix, limit=2,
                                               cursor=cursor))
                got += [d.id for d in page.documents]
                if page.next_cursor is None:
                    break
                assert page.next_cursor == page.documents[-1].id
                cursor = page.next_cursor
            assert got == want, prefix
        after = await read(b, s.DocList(ns="rollouts", cursor="a0a"))
        assert [d.id for d in after.documents] == [i for i in ids if i > "a0a"]
        assert [d.id for d in (await read(b, s.DocList(ns="rollouts", prefix="b",
                                                       cursor="a"))).documents] == \
            ["b.1", "b.2"]
        assert (await read(b, s.DocList(ns="rollouts", cursor="zzz"))).documents == []
        assert [d.id for d in (await read(b, s.DocList(ns="flags"))).documents] == ["a"]
    store.run(body)


# --- event log -------------------------------------------------------------------------------

def test_log_offsets_are_monotonic_and_gap_free(store: Store) -> None:
    async def body(b: Backend) -> None:
        assert await read(b, s.LogInfo(log="events")) == s.LogState("events", 0, 0)
        before = now_ms()
        assert await write(b, s.LogAppend(log="events", records=[b"r0", b"r1"])) == \
            s.AppendResult(first_offset=0, next_offset=2)
        results = await group(b, s.LogAppend(log="events", records=[b"r2"]),
                              s.LogAppend(log="other", records=[b"o0"]),
                              s.LogAppend(log="events", records=[b"r3", b"r4", b"r5"]))
        assert results == [s.AppendResult(2, 3), s.AppendResult(0, 1), s.AppendResult(3, 6)]
        after = now_ms()
        read_all = await read(b, s.LogRead(log="events", offset=0))
        assert [(r.offset, r.payload) for r in read_all.records] == \
            [(i, f"r{i}".encode()) for i in range(6)]
        assert read_all.next_offset == 6
        assert all(before <= r.appended_ms <= after for r in read_all.records)
        part = await read(b, s.LogRead(log="events", offset=2, max_records=3))
        assert [r.offset for r in part.records] == [2, 3, 4] and part.next_offset == 5
        assert await read(b, s.LogRead(log="events", offset=6)) == s.LogReadResult([], 6)
        assert await read(b, s.LogRead(log="events", offset=99)) == s.LogReadResult([], 99)
        assert await read(b, s.LogRead(log="nothing", offset=0)) == s.LogReadResult([], 0)
        assert await read(b, s.LogInfo(log="events")) == s.LogState("events", 0, 6)
        assert await read(b, s.LogInfo(log="other")) == s.LogState("other", 0, 1)
        many = [f"m{i}".encode() for i in range(3000)]  # big appends (COPY in PostgreSQL)
        assert await write(b, s.LogAppend(log="events", records=many)) == \
            s.AppendResult(6, 3006)
        chunk = await read(b, s.LogRead(log="events", offset=6, max_records=s.MAX_LOG_READ))
        assert [r.payload for r in chunk.records] == many
        assert [r.offset for r in chunk.records] == list(range(6, 3006))
    store.run(body)


def test_consumer_offsets(store: Store) -> None:
    async def body(b: Backend) -> None:
        assert await read(b, s.LogCommitted(group="proc", log="events")) == 0
        await write(b, s.LogAppend(log="events", records=[b"a", b"b", b"c"]))
        assert await write(b, s.LogCommit(group="proc", log="events", offset=2)) is None
        assert await read(b, s.LogCommitted(group="proc", log="events")) == 2
        assert await read(b, s.LogCommitted(group="other", log="events")) == 0
        results = await group(
            b, s.LogCommit(group="proc", log="events", offset=4),     # beyond the end: refused
            s.LogAppend(log="events", records=[b"d"]),
            s.LogCommit(group="proc", log="events", offset=4),     # now it is the end: fine
            s.LogCommit(group="proc", log="events", offset=5),
            s.LogCommit(group="new", log="nothing", offset=0),
            s.LogCommit(group="new", log="nothing", offset=1))
        assert isinstance(results[0], s.BadRequest)
        assert str(results[0]) == "offset 4 is beyond the end of events (3)"
        assert results[1] == s.AppendResult(3, 4)
        assert results[2] is None
        assert isinstance(results[3], s.BadRequest)
        assert results[4] is None
        assert str(results[5]) == "offset 1 is beyond the end of nothing (0)"
        assert await read(b, s.LogCommitted(group="proc", log="events")) == 4
        await write(b, s.LogCommit(group="proc", log="events", offset=1))  # may go back
        assert await read(b, s.LogCommitted(group="proc", log="events")) == 1
    store.run(body)


def test_retention_by_count_and_age(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 1_000_000}
    for module in (leveldb_backend, postgres_backend):
        monkeypatch.setattr(module, "now_ms", lambda: clock["now"])

    async def body(b: Backend) -> None:
        await write(b, s.LogAppend(log="a", records=[b"%d" % i for i in range(10)]))
        clock["now"] += 60_000
        await write(b, s.LogAppend(log="a", records=[b"%d" % i for i in range(10, 15)]))
        await write(b, s.LogAppend(log="b", records=[b"x"] * 3))
        assert await b.apply_retention(0, 0) == 0
        assert await b.apply_retention(0, 12) == 3  # keep the newest 12 of a
        assert await read(b, s.LogInfo(log="a")) == s.LogState("a", 3, 15)
        assert await read(b, s.LogInfo(log="b")) == s.LogState("b", 0, 3)
        result = await read(b, s.LogRead(log="a", offset=0, max_records=2))
        assert [r.offset for r in result.records] == [3, 4] and result.next_offset == 5
        # Age: the records appended 60 s ago are older than 30 s, the newer ones are not.
        assert await b.apply_retention(30_000, 0) == 7
        assert await read(b, s.LogInfo(log="a")) == s.LogState("a", 10, 15)
        assert await read(b, s.LogInfo(log="b")) == s.LogState("b", 0, 3)
        assert await b.apply_retention(30_000, 100) == 0
        clock["now"] += 60_000
        assert await b.apply_retention(30_000, 0) == 5 + 3
        assert await read(b, s.LogInfo(log="b")) == s.LogState("b", 3, 3)
        assert await read(b, s.LogRead(log="b", offset=0)) == s.LogReadResult([], 3)
        assert await read(b, s.LogRead(log="a", offset=0)) == s.LogReadResult([], 15)
        # Appends go on from where the log was.
        assert await write(b, s.LogAppend(log="a", records=[b"new"])) == s.AppendResult(15, 16)
        result = await read(b, s.LogRead(log="a", offset=0))
        assert [(r.offset, r.payload) for r in result.records] == [(15, b"new")]
        assert await write(b, s.LogCommit(group="g", log="a", offset=16)) is None
    store.run(body)


def test_state_survives_reopening(store: Store) -> None:
    async def first(b: Backend) -> None:
        await group(b, s.Put(ns="test", key=b"k", value=b"v"),
                    s.DocPut(ns="jobs", id="j", body=b"1"),
                    s.LogAppend(log="l", records=[b"a", b"b"]),
                    s.TsAppend(ns="windows", series="s", points=[s.Point(1, b"p")]))
        await write(b, s.LogCommit(group="g", log="l", offset=2))

    async def second(b: Backend) -> None:
        await b.check()
        assert await read(b, s.Get(ns="test", key=b"k")) == b"v"
        assert await write(b, s.DocPut(ns="jobs", id="j", body=b"2", expected_version=1)) == 2
        assert await write(b, s.LogAppend(log="l", records=[b"c"])) == s.AppendResult(2, 3)
        assert await read(b, s.LogCommitted(group="g", log="l")) == 2
        assert await read(b, s.TsRange(ns="windows", series="s", start=0, end=9)) == \
            [s.Point(1, b"p")]
        stats = await read(b, s.Stats())
        assert stats["backend"] == store.kind

    store.run(first)
    store.run(second)


def test_write_results_have_the_api_types(store: Store) -> None:
    """What each write returns converts to RESULT_TYPES, as clients decode it."""
    async def body(b: Backend) -> None:
        ops = [s.Put(ns="test", key=b"k", value=b"v"), s.Delete(ns="test", key=b"x"),
               s.Batch(ops=[s.Put(ns="test", key=b"y", value=b"")]),
               s.TsAppend(ns="test", series="s", points=[s.Point(1, b"")]),
               s.DocPut(ns="test", id="d", body=b""), s.LogAppend(log="l", records=[b""]),
               s.LogCommit(group="g", log="l", offset=1)]
        for op, result in zip(ops, await group(b, *ops), strict=True):
            wire = s.decode_reply(s.encode(s.StorageReply(id=1, ok=True, result=result)))
            assert s.result_as(wire, s.RESULT_TYPES[type(op)]) == result
        reads = [s.Get(ns="test", key=b"k"), s.Scan(ns="test"),
                 s.TsRange(ns="test", series="s", start=0, end=5),
                 s.DocGet(ns="test", id="d"), s.DocHistory(ns="test", id="d"),
                 s.DocList(ns="test"), s.LogRead(log="l", offset=0),
                 s.LogCommitted(group="g", log="l"), s.LogInfo(log="l"), s.Stats()]
        for op in reads:
            result = await read(b, op)
            wire = s.decode_reply(s.encode(s.StorageReply(id=1, ok=True, result=result)))
            assert s.result_as(wire, s.RESULT_TYPES[type(op)]) == result, op
    store.run(body)


# --- both at once ----------------------------------------------------------------------------

def random_group(rng: random.Random, step: int) -> list[s.Op]:
    ops: list[s.Op] = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        key = bytes([rng.choice(b"ab\x00\xff")]) * rng.randint(1, 3)
        if kind < 0.2:
            ops.append(s.Put(ns=rng.choice(["test", "state"]), key=key,
                             value=b"%d" % step))
        elif kind < 0.3:
            ops.append(s.Delete(ns="test", key=key))
        elif kind < 0.35:
            ops.append(s.Batch(ops=[s.Put(ns="test", key=key, value=b"b"),
                                    s.Delete(ns="test", key=key[:1])]))
        elif kind < 0.45:
            ops.append(s.TsAppend(ns="windows", series=rng.choice(["s1", "s2"]), points=[
                s.Point(rng.randint(-5, 20), b"%d" % step) for _ in range(rng.randint(0, 4))]))
        elif kind < 0.65:
            ops.append(s.DocPut(ns="configs", id=rng.choice(["x", "x.y", "y", "z"]),
                                body=b"%d" % step,
                                expected_version=rng.choice([None, 0, 1, 2, 3, 4, 5])))
        elif kind < 0.85:
            ops.append(s.LogAppend(log=rng.choice(["l1", "l2"]),
                                   records=[b"%d" % i for i in range(rng.randint(1, 5))]))
        else:
            ops.append(s.LogCommit(group=rng.choice(["g1", "g2"]), log=rng.choice(["l1", "l2"]),
                                   offset=rng.randint(0, 60)))
    return ops


def comparable(value: Any) -> Any:
    """A result with the clock-dependent fields blanked, failures as (type, message)."""
    if isinstance(value, s.StorageFailure):
        return (type(value).__name__, str(value))
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, s.Document):
        return (value.id, value.version, value.body)
    if isinstance(value, s.LogRecord):
        return (value.offset, value.payload)
    if isinstance(value, s.DocListResult):
        return (comparable(value.documents), value.next_cursor)
    if isinstance(value, s.LogReadResult):
        return (comparable(value.records), value.next_offset)
    return value


def random_reads(rng: random.Random) -> list[s.Op]:
    prefix = bytes([rng.choice(b"ab\x00\xff")]) * rng.randint(0, 2)
    cursor = rng.choice([None, b"a", b"\x00\x00", b"b\xff"])
    return [s.Get(ns="test", key=prefix or b"a"),
            s.Scan(ns=rng.choice(["test", "state"]), prefix=prefix, limit=rng.randint(1, 5),
                   cursor=cursor),
            s.TsRange(ns="windows", series="s1", start=rng.randint(-6, 10),
                      end=rng.randint(0, 25), limit=rng.randint(1, 10)),
            s.DocGet(ns="configs", id=rng.choice(["x", "y", "z"]),
                     version=rng.choice([None, 1, 2, 7])),
            s.DocHistory(ns="configs", id=rng.choice(["x", "x.y"]), limit=rng.randint(1, 4)),
            s.DocList(ns="configs", prefix=rng.choice(["", "x", "x.", "q"]),
                      limit=rng.randint(1, 3), cursor=rng.choice([None, "x", "x.y", "a"])),
            s.LogRead(log=rng.choice(["l1", "l2"]), offset=rng.randint(0, 70),
                      max_records=rng.randint(1, 20)),
            s.LogCommitted(group="g1", log=rng.choice(["l1", "l2"])),
            s.LogInfo(log=rng.choice(["l1", "l2", "l3"]))]


def test_backends_agree_on_a_random_workload(request: pytest.FixtureRequest, tmp_path) -> None:
    stores = [make_store("leveldb", request, tmp_path), make_store("postgres", request, tmp_path)]

    async def answers(b: Backend, seed: int) -> list[Any]:
        rng = random.Random(seed)
        out: list[Any] = []
        for step in range(150):
            out.append(comparable(await group(b, *random_group(rng, step))))
            for op in random_reads(rng):
                validate(op)
                try:
                    out.append((type(op).__name__, comparable(await b.read(op))))
                except s.StorageFailure as exc:
                    out.append((type(op).__name__, comparable(exc)))
            if step % 50 == 49:
                out.append(("retention", await b.apply_retention(0, 25)))
        return out

    for seed in (1, 2):
        lev, pg = (store.run(lambda b, seed=seed: answers(b, seed)) for store in stores)
        for i, (a, b) in enumerate(zip(lev, pg, strict=True)):
            assert a == b, f"seed {seed}, answer {i}: leveldb {a!r} != postgres {b!r}"
