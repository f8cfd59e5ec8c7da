"""PostgreSQL restarts under load: no acknowledged append is lost or duplicated, offsets stay
gap-free, and appends succeed again once the server is back.

Writers append in a loop (several concurrent write groups, several appends per group) while
``pg_ctl restart -m fast`` runs twice. An append that fails with Unavailable is retried under a
new payload: it may or may not have been committed (its COMMIT got no answer), so it may show
up at most once; every acknowledged one must be exactly where its AppendResult said.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest

from ipc import storage as s
from workers.storage.postgres_backend import PostgresBackend

from .pg_cluster import PgCluster

pytestmark = pytest.mark.timeout(120)
WRITERS = 4
RESTARTS = 2


def test_appends_survive_postgres_restarts_under_load(
        pg_new_cluster: Callable[[], PgCluster]) -> None:
    cluster = pg_new_cluster()
    dsn = cluster.dsn(cluster.create_database())
    acked: dict[bytes, int] = {}      # payload -> offset it was acknowledged at
    attempted: set[bytes] = set()
    failures: Counter[str] = Counter()
    acked_after_restart = Counter[int]()

    async def main() -> None:
        backend = PostgresBackend(dsn, WRITERS)
        await backend.open()
        stop = asyncio.Event()
        restarts_done = 0

        async def writer(w: int) -> None:
            i = attempt = 0
            while not stop.is_set():
                # One group: two appends to the main log, one to a side log.
                payloads = [f"w{w}-{i}-{k}-a{attempt}".encode() for k in range(3)]
                ops = [s.LogAppend(log="events", records=payloads[:2]),
                       s.LogAppend(log="side", records=[b"x"]),
                       s.LogAppend(log="events", records=payloads[2:])]
                attempted.update(payloads)
                try:
                    results = await backend.write(ops)
                except s.Unavailable as exc:
                    failures[type(exc).__name__] += 1
                    attempt += 1
                    await asyncio.sleep(0.02)
                    continue
                first, _, last = results
                assert isinstance(first, s.AppendResult) and isinstance(last, s.AppendResult)
                assert first.next_offset - first.first_offset == 2
                acked[payloads[0]], acked[payloads[1]] = first.first_offset, first.first_offset + 1
                acked[payloads[2]] = last.first_offset
                acked_after_restart[restarts_done] += 1
                i, attempt = i + 1, 0

        async def under_load(n: int) -> None:
            """Until 200 groups were acknowledged since restart n (appends work again)."""
            deadline = time.monotonic() + 30
            while acked_after_restart[n] < 200:
                assert time.monotonic() < deadline, f"no appends succeeded after restart {n}"
                assert not any(t.done() for t in tasks), [t.exception() for t in tasks]
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        try:
            for _ in range(RESTARTS):
                await under_load(restarts_done)
                await asyncio.to_thread(cluster.restart, "fast")
                restarts_done += 1
            await under_load(restarts_done)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        # Every record of the log, in pages.
        records: list[s.LogRecord] = []
        offset = 0
        while True:
            page = await backend.read(s.LogRead(log="events", offset=offset,
                                                max_records=s.MAX_LOG_READ))
            if not page.records:
                break
            records += page.records
            offset = page.next_offset
        info = await backend.read(s.LogInfo(log="events"))
        await backend.close()

        assert [r.offset for r in records] == list(range(len(records))), "gap in offsets"
        assert info == s.LogState("events", 0, len(records))
        where = {r.payload: r.offset for r in records}
        counts = Counter(r.payload for r in records)
        assert not [p for p, n in counts.items() if n > 1], "a payload was stored twice"
        assert set(where) <= attempted
        missing = [p for p in acked if p not in where]
        assert not missing, f"{len(missing)} acknowledged appends were lost: {missing[:5]}"
        moved = [(p, acked[p], where[p]) for p in acked if where[p] != acked[p]]
        assert not moved, f"acknowledged at one offset, stored at another: {moved[:5]}"

    asyncio.run(main())
    print(f"\n{len(acked)} appends acknowledged, {sum(failures.values())} groups failed "
          f"during {RESTARTS} restarts ({dict(failures)})")
