"""The outbox: notifications accepted for delivery, kept in storage until a destination took
them, so that nothing accepted is lost to a crash or a restart (at least once).

An entry is one notification for one destination, keyed ``destination|notification key``. It
is stored before the event that caused it counts as read, and removed once delivered, when a
``done`` marker takes its place: the same event read again after a crash finds the marker (or
the pending entry) and is not queued twice. A delivery interrupted between the destination's
answer and the marker is sent again with the same idempotency key, which the destinations
deduplicate on (Jira and GitHub by a label, webhooks by ``Idempotency-Key``; Slack cannot).
Entries that failed ``max_attempts`` times, or for good (4xx), become dead letters, kept for
the operator and shown in status. Pending entries are few and also kept in memory.

Storage namespace ``outbox``: ``p/<key>`` pending, ``x/<key>`` dead, ``d/<key>`` delivered
(time and result), pruned to the newest ``MAX_DONE``.
"""
from __future__ import annotations

import time
from typing import Any

import msgspec
from msgspec import Struct, field

from ipc import storage as s
from workers.integrations.notification import Notification
from workers.storage_client import StorageClient

NS = "outbox"
MAX_DONE = 10_000
SCAN_PAGE = 500


class Entry(Struct, kw_only=True):
    destination: str
    note: Notification
    created_ms: int
    next_ms: int
    attempts: int = 0
    last_error: str = ""

    @property
    def key(self) -> str:
        return f"{self.destination}|{self.note.key}"


class Done(Struct, kw_only=True):
    delivered_ms: int
    result: dict[str, Any] = field(default_factory=dict)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Outbox:
    def __init__(self, storage: StorageClient) -> None:
        self.storage = storage
        self.pending: dict[str, Entry] = {}
        self.dead_count = 0
        self.done_count = 0

    async def _scan(self, ns: str, prefix: bytes) -> list[s.Record]:
        records, cursor = [], None
        while True:
            page = await self.storage.call(s.Scan(ns=ns, prefix=prefix, limit=SCAN_PAGE,
                                                  cursor=cursor))
            records += page.records
            if page.next_cursor is None:
                return records
            cursor = page.next_cursor

    async def load(self) -> None:
        """The pending entries a previous run left, and the counts; prunes old markers."""
        for record in await self._scan(NS, b"p/"):
            entry = msgspec.json.decode(record.value, type=Entry)
            self.pending[entry.key] = entry
        self.dead_count = len(await self._scan(NS, b"x/"))
        done = await self._scan(NS, b"d/")
        self.done_count = len(done)
        if len(done) > MAX_DONE:
            ordered = sorted(done, key=lambda r: msgspec.json.decode(r.value,
                                                                     type=Done).delivered_ms)
            for record in ordered[:len(done) - MAX_DONE]:
                await self.storage.call(s.Delete(ns=NS, key=record.key))
            self.done_count = MAX_DONE

    async def enqueue(self, destination: str, note: Notification) -> bool:
        """Store ``note`` for ``destination`` unless it is queued or delivered already."""
        entry = Entry(destination=destination, note=note, created_ms=now_ms(),
                      next_ms=now_ms())
        if entry.key in self.pending:
            return False
        if await self.storage.call(s.Get(ns=NS, key=f"d/{entry.key}".encode())) is not None:
            return False
        await self._put(entry)
        self.pending[entry.key] = entry
        return True

    def due(self, at_ms: int) -> list[Entry]:
        return sorted((e for e in self.pending.values() if e.next_ms <= at_ms),
                      key=lambda e: (e.next_ms, e.created_ms))

    def next_due_ms(self) -> int | None:
        return min((e.next_ms for e in self.pending.values()), default=None)

    async def delivered(self, entry: Entry, result: dict[str, Any]) -> None:
        await self.storage.call(s.Put(ns=NS, key=f"d/{entry.key}".encode(), value=msgspec.json
                                      .encode(Done(delivered_ms=now_ms(), result=result))))
        await self.storage.call(s.Delete(ns=NS, key=f"p/{entry.key}".encode()))
        self.pending.pop(entry.key, None)
        self.done_count += 1

    async def postpone(self, entry: Entry, wait_s: float, error: str = "",
                       attempt: bool = True) -> None:
        """Try again in ``wait_s``; ``attempt``: this was a failed delivery, not a rate-limit
        or open-breaker wait."""
        entry.next_ms = now_ms() + int(wait_s * 1000)
        if attempt:
            entry.attempts += 1
            entry.last_error = error
        await self._put(entry)

    async def bury(self, entry: Entry, error: str) -> None:
        """A dead letter: kept for the operator, never sent again on its own."""
        entry.last_error = error
        await self.storage.call(s.Put(ns=NS, key=f"x/{entry.key}".encode(),
                                      value=msgspec.json.encode(entry)))
        await self.storage.call(s.Delete(ns=NS, key=f"p/{entry.key}".encode()))
        self.pending.pop(entry.key, None)
        self.dead_count += 1

    async def dead_letters(self, limit: int = 100) -> list[Entry]:
        page = await self.storage.call(s.Scan(ns=NS, prefix=b"x/", limit=limit))
        return [msgspec.json.decode(r.value, type=Entry) for r in page.records]

    async def _put(self, entry: Entry) -> None:
        await self.storage.call(s.Put(ns=NS, key=f"p/{entry.key}".encode(),
                                      value=msgspec.json.encode(entry)))
