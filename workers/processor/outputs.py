"""What the processor writes for the APIs and integrations, and where.

- closed windows: time series in ``windows`` (``ipc.window_series``), one point per window;
- findings: documents in ``findings`` (one version per analysis interval they persist);
- proposals: documents in ``optimizations``;
- every new finding, new proposal and rollout transition: one JSON record in the
  ``optimizer-events`` log, in order, which notifiers and the APIs' streams read.

All writes are idempotent or versioned, so a processor that replays events after a crash
rewrites the same windows; an event record may then be appended twice (readers dedupe by
``id`` and ``type``).
"""
from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any

from ipc import storage as s
from ipc import window_series as ws
from workers.processor.findings import FindingUpdate
from workers.processor.windows import ClosedWindow
from workers.storage_client import StorageClient

EVENTS_LOG = "optimizer-events"
FINDINGS_NS = "findings"
PROPOSALS_NS = "optimizations"


def doc_id(prefix: str, readable: str) -> str:
    """A storage document id for a name that may hold any character (service and model
    names do): the prefix and a digest; the readable name stays in the body."""
    return f"{prefix}.{blake2b(readable.encode(), digest_size=12).hexdigest()}"


class Outputs:
    def __init__(self, storage: StorageClient):
        self.storage = storage
        self._known_keys: set[str] = set()

    async def windows(self, closed: Sequence[ClosedWindow]) -> None:
        points: dict[str, list[s.Point]] = defaultdict(list)
        new_keys = []
        for w in closed:
            point = ws.WindowPoint(w.kind, w.start_ns, w.end_ns, ws.WindowKey(*w.key),
                                   w.aggregate.summary())
            points[ws.series_name(w.kind, w.key)].append(
                s.Point(w.start_ns // 1_000_000, ws.encode_point(point)))
            digest = ws.key_digest(w.key)
            if digest not in self._known_keys:
                self._known_keys.add(digest)
                new_keys.append(w.key)
        for key in new_keys:
            try:
                await self.storage.call(s.DocPut(ns=ws.NS, id=ws.key_doc_id(key),
                                                 body=ws.encode_key(key), expected_version=0))
            except s.Conflict:
                pass  # known from an earlier run
        # One request per series, all in flight at once: the storage socket pipelines them.
        await asyncio.gather(*(self.storage.call(s.TsAppend(ns=ws.NS, series=series,
                                                            points=batch))
                               for series, batch in points.items()))

    async def findings(self, updates: Sequence[FindingUpdate]) -> None:
        for update in updates:
            body = update.to_dict()
            await self.storage.call(s.DocPut(ns=FINDINGS_NS, id=update.id,
                                             body=json.dumps(body).encode()))
        await self.events([("finding", u.id, u.finding.window_end_ns, u.to_dict())
                           for u in updates if u.new])

    async def proposal(self, proposal_id: str, body: dict[str, Any]) -> None:
        await self.storage.call(s.DocPut(ns=PROPOSALS_NS, id=doc_id("p", proposal_id),
                                         body=json.dumps(body).encode()))

    async def events(self, items: Sequence[tuple[str, str, int, dict[str, Any]]]) -> None:
        """(type, id, event time, body) records appended to the optimizer-events log."""
        if items:
            await self.storage.append(EVENTS_LOG, [
                json.dumps({"type": t, "id": i, "time_ns": at, "body": b}).encode()
                for t, i, at, b in items])
