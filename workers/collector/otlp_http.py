"""OTLP/HTTP traces: ``POST /v1/traces`` on the collector's port.

Bodies are ``application/x-protobuf`` (also ``application/protobuf``) or ``application/json``
(OTLP/JSON), optionally with ``Content-Encoding: gzip`` (aiohttp also takes deflate, br and
zstd). aiohttp decompresses in bounded chunks and counts the *decompressed* bytes against the
app's ``client_max_size``, so a compression bomb ends in 413, not in memory exhaustion.

Spans that are LLM calls become events (see ``otlp_mapping``); the answer is an
ExportTraceServiceResponse in the request's encoding, with ``partial_success`` counting the
gen_ai spans rejected (those also go to the dead-letter log). An undecodable body is a 400
problem, another content type 415, a full or non-durable collector 503 and a client over its
rate limit 429, both with Retry-After: the exporter retries, and nothing was acknowledged.
"""
from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import Counter

from workers.collector.json_ingest import over_budget, problem, unavailable
from workers.collector.otlp_mapping import (
    OtlpDecodeError,
    decode_json,
    decode_protobuf,
    map_request,
    response_json,
)
from workers.collector.pipeline import IngestPipeline, Refused

SOURCE = "otlp_http"
PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")
JSON_TYPE = "application/json"
log = logging.getLogger("workers.collector.otlp")

IGNORED_SPANS = Counter("collector_otlp_spans_ignored",
                        "OTLP spans that are not LLM calls (no gen_ai model or usage).",
                        ["source"])


async def post_traces(request: web.Request) -> web.Response:
    started = time.monotonic()
    pipeline: IngestPipeline = request.app["pipeline"]
    content_type = request.content_type
    if content_type not in PROTOBUF_TYPES and content_type != JSON_TYPE:
        return problem(415, "Unsupported Media Type",
                       "expected application/x-protobuf or application/json, got "
                       f"{content_type or 'nothing'}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # over client_max_size, decompressed
        return problem(413, "Content Too Large",
                       f"the body exceeds {request.client_max_size} bytes (decompressed); "
                       "send smaller batches")
    except RequestPayloadError as exc:  # e.g. a gzip body that does not decompress
        return problem(400, "Bad Request", f"the body cannot be read: {exc}")
    try:
        message = decode_json(raw) if content_type == JSON_TYPE else decode_protobuf(raw)
    except OtlpDecodeError as exc:
        return problem(400, "Bad Request", str(exc))
    mapped = map_request(message)
    refusal = over_budget(request, SOURCE, mapped.llm_spans)
    if refusal is not None:
        return refusal
    if mapped.ignored:
        IGNORED_SPANS.labels(SOURCE).inc(mapped.ignored)
    try:
        await pipeline.submit(SOURCE, mapped.events, started)
    except Refused as exc:
        return unavailable(exc)
    await pipeline.dead_letter(SOURCE, mapped.rejected)
    answer = mapped.response()
    if content_type == JSON_TYPE:
        return web.Response(body=response_json(answer), content_type=JSON_TYPE)
    return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF_TYPES[0])
