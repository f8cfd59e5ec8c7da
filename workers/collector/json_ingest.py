"""JSON ingest: ``POST /v1/events`` with ``{"events": [...]}``.

Each event is validated on its own: valid ones are appended durably, then the answer says how
many were accepted and why each other one was rejected (index, field path, reason). A body
that is not such an object is a 400 problem (RFC 9457). A full collector answers 503 with
Retry-After and acknowledges nothing; a client over its rate limit, 429 with Retry-After.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

from aiohttp import web

from ipc.events import EventRejected, encode_feedback, parse_feedback, parse_json_event
from ipc.storage import StorageFailure
from workers.collector.admission import ClientLimits, OverBudget
from workers.collector.pipeline import IngestPipeline, NotDurable, Refused

MAX_EVENTS_PER_REQUEST = 10_000
SOURCE = "json"
FEEDBACK_LOG = "llm-feedback"  # read by the processor, which joins scores to their events


def problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem-details answer."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    headers = {"Retry-After": str(int(extra["retry_after"]))} if "retry_after" in extra else None
    return web.json_response(body, status=status, content_type="application/problem+json",
                             headers=headers)


def unavailable(exc: Refused) -> web.Response:
    return problem(503, "Service Unavailable", str(exc),
                   retry_after=max(1, round(exc.retry_after)))


def over_budget(request: web.Request, source: str, items: int) -> web.Response | None:
    """The 429 answer if the request's client is over its rate (``[collector]
    rate_limit_events_per_s``), else None with the items counted against its budget."""
    limits: ClientLimits | None = request.app.get("limits")
    if limits is None:
        return None
    try:
        limits.admit(source, limits.client_of(request.headers, request.remote), items)
    except OverBudget as exc:
        return problem(429, "Too Many Requests", str(exc),
                       retry_after=max(1, math.ceil(exc.retry_after)))
    return None


async def read_json(request: web.Request) -> Any | web.Response:
    """The request's JSON document, or the problem answer to send instead."""
    if request.content_type != "application/json":
        return problem(415, "Unsupported Media Type",
                       f"expected application/json, got {request.content_type or 'nothing'}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # over the app's client_max_size
        return problem(413, "Content Too Large",
                       f"the body exceeds {request.client_max_size} bytes; send smaller batches")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return problem(400, "Bad Request", f"the body is not JSON: {exc}")


async def batch_of(request: web.Request, key: str) -> list | web.Response:
    """The list under ``key`` of a ``{key: [...]}`` body, counted against the client's rate
    limit, or the problem answer instead (400, 413, 415, 429)."""
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        return problem(400, "Bad Request", f'expected an object {{"{key}": [...]}}', path=key)
    unknown = sorted(set(body) - {key})
    if unknown:
        return problem(400, "Bad Request", f"unknown key {unknown[0]!r} in the body",
                       path=unknown[0])
    if len(body[key]) > MAX_EVENTS_PER_REQUEST:
        return problem(413, "Content Too Large", f"{len(body[key])} {key} items in one "
                       f"request; at most {MAX_EVENTS_PER_REQUEST}")
    refusal = over_budget(request, SOURCE, len(body[key]))
    return body[key] if refusal is None else refusal


async def post_events(request: web.Request) -> web.Response:
    started = time.monotonic()
    pipeline: IngestPipeline = request.app["pipeline"]
    items = await batch_of(request, "events")
    if isinstance(items, web.Response):
        return items
    accepted, rejected, dead = [], [], []
    for index, item in enumerate(items):
        try:
            accepted.append(parse_json_event(item, index))
        except EventRejected as exc:
            rejected.append({"index": index, "path": exc.path, "reason": exc.reason})
            dead.append((item, exc.path, exc.reason))
    try:
        await pipeline.submit(SOURCE, accepted, started)
    except Refused as exc:
        return unavailable(exc)
    await pipeline.dead_letter(SOURCE, dead)
    return web.json_response({"accepted": len(accepted), "rejected": rejected})


async def post_feedback(request: web.Request) -> web.Response:
    """Quality scores for earlier events: kept durably for the processor to join."""
    pipeline: IngestPipeline = request.app["pipeline"]
    items = await batch_of(request, "feedback")
    if isinstance(items, web.Response):
        return items
    received = time.time_ns()
    accepted, rejected = [], []
    for index, item in enumerate(items):
        try:
            accepted.append(encode_feedback(parse_feedback(item, index, received)))
        except EventRejected as exc:
            rejected.append({"index": index, "path": exc.path, "reason": exc.reason})
    if accepted:
        try:
            await pipeline.storage.append(FEEDBACK_LOG, accepted)
        except StorageFailure as exc:
            return unavailable(NotDurable(str(exc)))
    return web.json_response({"accepted": len(accepted), "rejected": rejected})
