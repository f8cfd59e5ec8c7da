"""``GET /v1/events/stream``: the ``optimizer-events`` log (findings, proposals, rollout
transitions, config changes) as server-sent events.

Each event's id is its log offset, so a client that reconnects with ``Last-Event-ID`` resumes
right after the last event it saw, losing nothing. A reader task long-polls the log into a
bounded per-client queue; when the client reads slowly the queue fills and the reader waits
(back-pressure), so memory per client stays bounded. A comment line every ``KEEPALIVE_S``
keeps proxies from closing an idle stream. Records the processor appended twice after a crash
are sent once per connection (deduplicated by type and id).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from typing import Annotated

from aiohttp import web
from msgspec import Meta, Struct, field

from ipc import storage as s
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import EVENTS_LOG, Deps
from workers.rest_api.problems import Problem
from workers.rest_api.routes import Call, RouteTable

KEEPALIVE_S = 15.0
QUEUE_MAX = 256
READ_BATCH = 200
DEDUP_MAX = 2048
RETRY_MS = 2000


class StreamQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    type: list[str] = field(default_factory=list)  # finding, proposal, rollout, config
    service: str | None = None
    since: Annotated[int, Meta(ge=0, description=(
        "Start at this log offset (replay); default: only new events. Last-Event-ID wins."
    ))] | None = None


def _start_offset(request: web.Request, query: StreamQuery) -> int | None:
    last = request.headers.get("Last-Event-ID", "").strip()
    if last:
        if not last.isdigit():
            raise Problem(400, "Bad Request", "Last-Event-ID must be an event id of this stream",
                          type_suffix="malformed-input")
        return int(last) + 1
    return query.since


def _wanted(record: dict, query: StreamQuery) -> bool:
    if query.type and record.get("type") not in query.type:
        return False
    if query.service is None:
        return True
    body = record.get("body") or {}
    return isinstance(body, dict) and body.get("service") == query.service


async def _read(deps: Deps, offset: int, queue: asyncio.Queue[s.LogRecord]) -> None:
    while True:
        page = await deps.storage.call(
            s.LogRead(log=EVENTS_LOG, offset=offset, max_records=READ_BATCH,
                      wait_ms=int(KEEPALIVE_S * 1000)), timeout=KEEPALIVE_S + 10)
        for record in page.records:
            await queue.put(record)  # blocks while the client is behind: back-pressure
        offset = page.next_offset


async def stream_events(call: Call, deps: Deps) -> web.StreamResponse:
    request, query = call.request, call.query
    assert request is not None, "the event stream is served over HTTP only"
    offset = _start_offset(request, query)
    if offset is None:
        offset = (await deps.storage.call(s.LogInfo(log=EVENTS_LOG))).next_offset
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MS}\n: from offset {offset}\n\n".encode())
    queue: asyncio.Queue[s.LogRecord] = asyncio.Queue(QUEUE_MAX)
    reader = asyncio.create_task(_read(deps, offset, queue), name="sse-reader")
    closing = asyncio.create_task(deps.closing.wait())
    seen: OrderedDict[tuple[str, str], None] = OrderedDict()
    try:
        while not deps.closing.is_set():
            getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({getter, reader, closing}, timeout=KEEPALIVE_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if reader in done:  # storage failed: end; the client resumes by its id
                    break
                if not closing.done():
                    await response.write(b": keep-alive\n\n")
                continue
            record = getter.result()
            try:
                event = json.loads(record.payload)
            except ValueError:
                continue
            ident = (str(event.get("type")), str(event.get("id")))
            if ident in seen or not _wanted(event, query):
                continue
            seen[ident] = None
            if len(seen) > DEDUP_MAX:
                seen.popitem(last=False)
            await response.write(f"id: {record.offset}\nevent: {ident[0]}\n"
                                 f"data: {json.dumps(event)}\n\n".encode())
    except ConnectionResetError:
        pass
    finally:
        for task in (reader, closing):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    return response


def install(table: RouteTable, deps: Deps) -> None:
    @table.route("GET", "/v1/events/stream", role=Role.VIEWER, query=StreamQuery,
                 responses={200: None}, tags=("events",))
    async def stream_optimizer_events(call: Call) -> web.StreamResponse:
        """Findings, proposals, rollout transitions and config changes as server-sent events.

        ``text/event-stream``; each event's ``id`` is its log offset: reconnect with
        ``Last-Event-ID`` to resume after it. ``event`` is the record's type and ``data`` the
        JSON record ``{"type", "id", "time_ns", "body"}``."""
        return await stream_events(call, deps)


async def close_streams(deps: Deps) -> None:
    """End every open stream, so that the server can stop without waiting on them."""
    deps.closing.set()
    await asyncio.sleep(0)
