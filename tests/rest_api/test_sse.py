"""The event stream in process, over a fake log: keep-alive comments while idle, duplicates
(a processor replaying after a crash) sent once, filters, resume after Last-Event-ID, and a
stream that ends when the server closes."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ipc import storage as s
from workers.rest_api import sse
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.auth import Authenticator, Role
from workers.rest_api.endpoints.common import Deps
from workers.rest_api.problems import problem_middleware
from workers.rest_api.routes import RouteTable

from .test_api_keys import MemoryStorage


class FakeLog(MemoryStorage):
    """API keys in memory, and an optimizer-events log that long-polls like storage's."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__()
        self.records = [json.dumps(r).encode() for r in records]

    async def call(self, op: s.Op, timeout: float | None = None) -> Any:
        if isinstance(op, s.LogInfo):
            return s.LogState(op.log, 0, len(self.records))
        if isinstance(op, s.LogRead):
            if op.offset >= len(self.records):
                await asyncio.sleep(op.wait_ms / 1000)
            found = [s.LogRecord(i, 0, self.records[i])
                     for i in range(op.offset, min(len(self.records),
                                                   op.offset + op.max_records))]
            return s.LogReadResult(found, op.offset + len(found))
        return await super().call(op, timeout)


def record(kind: str, ident: str, service: str) -> dict[str, Any]:
    return {"type": kind, "id": ident, "time_ns": 1, "body": {"service": service}}


async def read_events(response: Any, count: int) -> list[str]:
    """The next ``count`` blocks (events or comments) of a stream, as text."""
    blocks: list[str] = []
    buffer = ""
    while len(blocks) < count:
        chunk = await asyncio.wait_for(response.content.readany(), 5)
        assert chunk, "stream ended"
        buffer += chunk.decode()
        while "\n\n" in buffer and len(blocks) < count:
            block, buffer = buffer.split("\n\n", 1)
            blocks.append(block)
    return blocks


def test_stream_keepalive_dedup_filters_and_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.2)
    storage = FakeLog([record("rollout", "a.started.0", "w"), record("rollout", "a.started.0", "w"),
                       record("finding", "f1", "other"), record("config", "w.2", "w")])

    async def go() -> None:
        deps = Deps(config=None, section=None, storage=storage, link=None, configs=None,
                    api_keys=ApiKeyStore(storage))
        _, key = await deps.api_keys.create("tester", Role.VIEWER)
        app = web.Application(middlewares=[problem_middleware])
        table = RouteTable()
        sse.install(table, deps)
        table.install(app, Authenticator(deps.api_keys, None))
        headers = {"Authorization": f"Bearer {key}"}
        async with TestClient(TestServer(app)) as client:
            answer = await client.get("/v1/events/stream?since=0&service=w", headers=headers)
            assert answer.status == 200
            blocks = await read_events(answer, 4)
            assert blocks[0].startswith("retry: ")
            assert blocks[1].startswith("id: 0\nevent: rollout\n")
            assert blocks[2].startswith("id: 3\nevent: config\n")  # 1 was a duplicate
            assert blocks[3] == ": keep-alive"
            answer.close()
            answer = await client.get("/v1/events/stream?type=finding",
                                      headers={**headers, "Last-Event-ID": "0"})
            blocks = await read_events(answer, 2)
            assert blocks[1].startswith("id: 2\nevent: finding\n")
            answer.close()
            bad = await client.get("/v1/events/stream", headers={**headers,
                                                                 "Last-Event-ID": "x"})
            assert bad.status == 400
            answer = await client.get("/v1/events/stream", headers=headers)
            await read_events(answer, 1)
            await sse.close_streams(deps)
            rest = await asyncio.wait_for(answer.content.read(), 5)
            assert b"event:" not in rest  # ended, nothing more sent

    asyncio.run(go())
