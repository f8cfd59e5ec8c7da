"""``GET /v1/events``: the LLM calls in the event log, filtered, a bounded scan per request.

The cursor is the log offset to read on from (opaque to clients); a page ends when it is full,
when ``MAX_SCAN`` records have been read, or at the end of the log, and always carries the
cursor to continue from, so that a client can also poll for new calls.
"""
from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from ipc import storage as s
from ipc.events import EventDecodeError, LLMEvent, decode_event
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import MAX_PAGE, Deps, decode_cursor, encode_cursor
from workers.rest_api.problems import Problem
from workers.rest_api.routes import Call, RouteTable

MAX_SCAN = 5_000
READ = 1_000
Ms = Annotated[int, Meta(ge=0, le=2 ** 62 // 1_000_000,
                         description="Milliseconds since the epoch.")]


class Event(Struct, kw_only=True):
    """One LLM call as the collector recorded it; ``offset`` is its place in the log."""

    offset: int
    event_id: str
    time_ns: int
    service: str
    model: str
    provider: str | None
    operation: str
    input_tokens: int
    output_tokens: int
    latency_ms: float
    ttft_ms: float | None
    cost_usd: float | None
    status: str
    error_type: str | None
    cache_hit: bool | None
    quality: float | None
    variant: str | None
    tags: dict[str, str]


class EventPage(Struct, kw_only=True):
    items: list[Event]
    next_cursor: str
    end_of_log: bool


class EventQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    service: str | None = None
    model: str | None = None
    variant: str | None = None  # "baseline" for calls that carry none
    start: Ms | None = None
    end: Ms | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 100
    cursor: str | None = None


_fields = frozenset(Event.__struct_fields__)


def _matches(event: LLMEvent, q: EventQuery) -> bool:
    variant = event.variant or "baseline"
    if any(want is not None and got != want for got, want in
           ((event.service, q.service), (event.model, q.model), (variant, q.variant))):
        return False
    if q.start is not None and event.time_ns < q.start * 1_000_000:
        return False
    return q.end is None or event.time_ns < q.end * 1_000_000


def _view(offset: int, event: LLMEvent) -> Event:
    data = {k: v for k, v in msgspec.structs.asdict(event).items() if k in _fields}
    return Event(offset=offset, **data)


def install(table: RouteTable, deps: Deps) -> None:
    @table.route("GET", "/v1/events", role=Role.VIEWER, query=EventQuery,
                 responses={200: EventPage}, tags=("events",))
    async def list_events(call: Call) -> EventPage:
        """LLM calls from the event log, oldest first, by service, model, variant and time."""
        if deps.config.event_log.backend != "embedded":
            raise Problem(501, "Not Implemented", "events are read from the embedded event "
                          "log; this daemon uses Kafka", type_suffix="not-implemented")
        q: EventQuery = call.query
        log_name = deps.config.event_log.log
        offset = decode_cursor(q.cursor)
        if not isinstance(offset, int) or offset < 0:
            offset = (await deps.storage.call(s.LogInfo(log=log_name))).first_offset
        items: list[Event] = []
        scanned = 0
        while len(items) < q.limit and scanned < MAX_SCAN:
            page = await deps.storage.call(s.LogRead(log=log_name, offset=offset,
                                                     max_records=READ))
            for record in page.records:
                offset = record.offset + 1
                scanned += 1
                try:
                    event = decode_event(record.payload)
                except EventDecodeError:
                    continue
                if _matches(event, q):
                    items.append(_view(record.offset, event))
                    if len(items) == q.limit:
                        break
            if not page.records:
                return EventPage(items=items, next_cursor=encode_cursor(page.next_offset),
                                 end_of_log=True)
        return EventPage(items=items, next_cursor=encode_cursor(offset), end_of_log=False)
