"""HTTP concerns around every operation: tracing, metrics, the in-flight bound and request
timeout, CORS, response compression, and storage failures as 503 problems.

Streams (SSE) are exempt from the timeout and the in-flight bound: they are long by design and
bounded by their own per-client queue.
"""
from __future__ import annotations

import asyncio
import gzip
import re
from collections import OrderedDict
import time
from collections.abc import Collection

import brotli
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import Counter, Gauge, Histogram

from ipc import storage as s
from workers import tracing
from workers.rest_api.problems import Problem, request_id

REQUESTS = Counter("rest_api_requests", "REST requests answered, by route, method and status.",
                   ["route", "method", "status"])
LATENCY = Histogram("rest_api_request_seconds", "REST request handling time, by route.",
                    ["route"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5,
                                        5, 10, 30))
IN_FLIGHT = Gauge("rest_api_in_flight", "REST requests being handled.",
                  multiprocess_mode="livesum")
COMPRESS_MIN_BYTES = 1024
COMPRESSED_MEMO = 32  # answers of at most MEMO_MAX_BODY bytes: about 10 MB at most
MEMO_MAX_BODY = 256 * 1024
_CODING = re.compile(
    r"(?:^|,)\s*(?P<name>[a-z0-9*-]+)\s*(?:;\s*q\s*=\s*(?P<q>[0-9.]+))?\s*(?=,|$)")
_compressed: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()


def route_label(request: web.Request) -> str:
    """The route template, never the raw path: ids in paths must not explode the series."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def is_stream(request: web.Request) -> bool:
    return request.path.endswith("/stream")


def make_limits(max_in_flight: int, timeout_s: float) -> Middleware:
    """Metrics, ``max_in_flight`` (503 + Retry-After beyond) and ``request_timeout_s``."""
    in_flight = 0

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        started = time.perf_counter()
        stream = is_stream(request)
        try:
            if stream:
                response = await handler(request)
            else:
                if in_flight >= max_in_flight:
                    raise Problem(503, "Service Unavailable", f"{max_in_flight} "
                                  "requests already in flight; retry shortly", retry_after=1,
                                  type_suffix="overloaded")
                in_flight += 1
                IN_FLIGHT.inc()
                try:
                    async with asyncio.timeout(timeout_s):
                        response = await handler(request)
                except TimeoutError:
                    raise Problem(503, "Service Unavailable", f"the request took longer than "
                                  f"{timeout_s:g} s", retry_after=1,
                                  type_suffix="timeout") from None
                finally:
                    in_flight -= 1
                    IN_FLIGHT.dec()
        except Problem as exc:
            response = exc.response(request)
        route = route_label(request)
        REQUESTS.labels(route, request.method, str(response.status)).inc()
        if not stream:
            LATENCY.labels(route).observe(time.perf_counter() - started)
        return response

    return limits


@web.middleware
async def traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost, installed only when tracing is on: a server span per request, continuing the
    client's trace when it sends a ``traceparent`` header."""
    route = route_label(request)
    name = request.method if route == "unmatched" else f"{request.method} {route}"
    with tracing.server_span(name, request.headers, {
            "http.request.method": request.method, "http.route": route,
            "url.path": request.path, "optimizer.request_id": request_id(request)}) as span:
        status = None  # another exception is recorded on the span as it passes
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:  # redirects, and errors met outside problem_middleware
            status = exc.status
            raise
        finally:
            if status is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    tracing.fail(span, f"HTTP {status}")
    return response


@web.middleware
async def storage_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside problem_middleware: an unreachable or refusing storage is 503, not 500."""
    try:
        return await handler(request)
    except (s.Unavailable, s.StorageTimeout) as exc:
        raise Problem(503, "Service Unavailable", f"storage: {exc}", retry_after=1,
                      type_suffix="storage-unavailable") from None


def make_cors(origins: Collection[str]) -> Middleware:
    """Exact-origin CORS; preflights are answered here, before routing."""
    allowed = frozenset(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or origin not in allowed:
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE",
                "Access-Control-Allow-Headers": "Authorization, X-API-Key, Content-Type, "
                                                "X-Request-Id, Last-Event-ID",
                "Access-Control-Max-Age": "600"})
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        response.headers.add("Vary", "Origin")
        return response

    return cors


def _accepted_codings(accept_encoding: str) -> set[str]:
    """The content codings an Accept-Encoding header accepts (q above 0)."""
    accepted = set()
    for found in _CODING.finditer(accept_encoding.lower()):
        try:
            if found["q"] is None or float(found["q"]) > 0:
                accepted.add(found["name"])
        except ValueError:
            continue
    return accepted


def _compress(body: bytes, coding: str) -> bytes:
    """``body`` in ``coding``; the latest answers are memoized, so a page that the response
    cache serves many times is compressed once (a cached body is the same bytes object, whose
    hash Python keeps)."""
    key = (coding, body)
    done = _compressed.get(key)
    if done is None:
        done = (brotli.compress(body, quality=4) if coding == "br"
                else gzip.compress(body, compresslevel=6, mtime=0))
        if len(body) > MEMO_MAX_BODY:
            return done
        _compressed[key] = done
        while len(_compressed) > COMPRESSED_MEMO:
            _compressed.popitem(last=False)
    else:
        _compressed.move_to_end(key)
    return done


@web.middleware
async def compression(request: web.Request, handler: Handler) -> web.StreamResponse:
    """br when the client takes it, else gzip when it takes that; small and streamed answers
    are sent as they are."""
    response = await handler(request)
    if (not isinstance(response, web.Response) or response.prepared
            or response.body is None or not isinstance(response.body, bytes)
            or len(response.body) < COMPRESS_MIN_BYTES
            or "Content-Encoding" in response.headers):
        return response
    accepted = _accepted_codings(request.headers.get("Accept-Encoding", ""))
    coding = "br" if "br" in accepted else "gzip" if "gzip" in accepted else None
    response.headers.add("Vary", "Accept-Encoding")
    if coding is not None:
        response.body = _compress(response.body, coding)
        response.headers["Content-Encoding"] = coding
    return response
