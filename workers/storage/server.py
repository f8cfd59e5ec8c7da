"""The storage worker's request loop: a ROUTER socket, pipelined requests, group commit.

Requests are taken in arrival order. Consecutive writes, from any number of clients, are
gathered into one group and committed with one durable write; a read first flushes the writes
before it, so a client always reads what it wrote. Replies to writes leave only after the group
is durable: an acknowledged write survives a crash.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge, Histogram

from ipc import storage as s
from ipc.messages import MAX_MESSAGE_BYTES, ProtocolError
from workers import tracing
from workers.storage.backend import Backend, StorageFailure, Unavailable, validate

log = logging.getLogger("workers.storage.server")
MAX_GROUP = 2000  # requests taken from the socket before they are worked off
# Refusals that are the storage worker's fault, not the caller's: its spans are marked failed.
SERVER_FAULTS = frozenset({s.StorageErrorCode.UNAVAILABLE, s.StorageErrorCode.TIMEOUT,
                           s.StorageErrorCode.INTERNAL})

OP_SECONDS = Histogram("optimizer_storage_op_seconds", "Storage operation latency in the worker.",
                       ["op"], buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05,
                                        .1, .25, .5, 1, 2.5))
GROUP_SIZE = Histogram("optimizer_storage_write_group_size", "Writes committed together.",
                       buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000))
ERRORS = Counter("optimizer_storage_errors", "Refused or failed storage operations.",
                 ["op", "code"])
LOG_LAG = Gauge("optimizer_storage_log_lag_records",
                "Records appended to a log and not yet committed by a consumer group.",
                ["log", "group"], multiprocess_mode="livemax")


def op_name(op: s.Op) -> str:
    return type(op).__struct_config__.tag


class StorageServer:
    def __init__(self, backend: Backend, ctx: zmq.asyncio.Context, runtime_dir: str,
                 on_document: Callable[[str, str, int], Awaitable[None]] | None = None):
        self.backend = backend
        self.on_document = on_document  # told of every new document version, once durable
        self.path = os.path.join(runtime_dir, s.STORAGE_SOCKET)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a socket left by a killed predecessor
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind("ipc://" + self.path)
        finally:
            os.umask(old_umask)
        self.available = True
        self.served = 0
        self.committed: dict[tuple[str, str], int] = {}  # (log, group) -> offset, for lag
        self.heads: dict[str, int] = {}  # log -> next offset
        # Long polls: log -> reads that found nothing and wait for an append.
        self.parked: dict[str, list[tuple[list[bytes], s.StorageRequest, asyncio.TimerHandle]]] = {}
        # Spans of traced requests, by (client identity, request id), ended by their reply.
        self.spans: dict[tuple[bytes, int], Any] = {}

    def close(self) -> None:
        self.sock.close(linger=1000)

    async def serve(self) -> None:
        while True:
            batch = [await self.sock.recv_multipart()]
            while len(batch) < MAX_GROUP and self.sock.get(zmq.EVENTS) & zmq.POLLIN:
                batch.append(await self.sock.recv_multipart())
            await self.work_off(batch)

    async def work_off(self, batch: list[list[bytes]]) -> None:
        writes: list[tuple[list[bytes], s.StorageRequest]] = []
        for frames in batch:
            request = self.parse(frames)
            if request is None:
                continue
            if isinstance(request.op, s.WRITE_OPS):
                writes.append((frames, request))
                continue
            if writes:
                await self.commit(writes)
                writes = []
            await self.answer_read(frames, request)
        if writes:
            await self.commit(writes)

    def parse(self, frames: list[bytes]) -> s.StorageRequest | None:
        if len(frames) != 2:
            log.warning("storage.sock: dropped a message of %d frames", len(frames))
            return None
        try:
            request = s.decode_request(frames[1])
        except ProtocolError as exc:
            log.warning("storage.sock: bad request: %s", exc)
            ERRORS.labels("unknown", s.StorageErrorCode.BAD_REQUEST.name).inc()
            self.reply(frames, s.StorageReply(id=0, ok=False, error=s.StorageError(
                s.StorageErrorCode.BAD_REQUEST, str(exc))))
            return None
        if request.trace is not None:
            self.trace(frames, request)
        try:
            validate(request.op)
            if not self.available:
                raise Unavailable("the storage backend is unavailable; retrying")
        except StorageFailure as exc:
            self.fail(frames, request, exc)
            return None
        return request

    def trace(self, frames: list[bytes], request: s.StorageRequest) -> None:
        """Start the span of a request sent from a sampled span; ``reply`` ends it."""
        op = request.op
        attributes = {"storage.op": op_name(op)}
        for key in ("ns", "log"):
            value = getattr(op, key, None)
            if value is not None:
                attributes[f"storage.{key}"] = value
        span = tracing.remote_span(request.trace, f"storage.{op_name(op)}", attributes)
        if span is not None:
            self.spans[(frames[0], request.id)] = span

    async def commit(self, writes: list[tuple[list[bytes], s.StorageRequest]]) -> None:
        started = time.perf_counter()
        try:
            results = await self.backend.write([r.op for _, r in writes])
        except StorageFailure as exc:
            log.error("write group of %d failed: %s", len(writes), exc)
            for frames, request in writes:
                self.fail(frames, request, exc)
            return
        except Exception as exc:  # a backend bug must not end the request loop
            log.exception("write group of %d failed", len(writes))
            for frames, request in writes:
                self.fail(frames, request, StorageFailure(f"internal error: {exc}"))
            return
        elapsed = time.perf_counter() - started
        GROUP_SIZE.observe(len(writes))
        if self.spans:
            for frames, request in writes:
                span = self.spans.get((frames[0], request.id))
                if span is not None:
                    span.set_attribute("storage.write_group", len(writes))
        appended = set()
        for (frames, request), result in zip(writes, results, strict=True):
            OP_SECONDS.labels(op_name(request.op)).observe(elapsed)
            if isinstance(result, StorageFailure):
                self.fail(frames, request, result)
            else:
                self.reply(frames, s.StorageReply(id=request.id, ok=True, result=result))
                if isinstance(request.op, s.LogAppend):
                    appended.add(request.op.log)
                    self.heads[request.op.log] = result.next_offset
                elif isinstance(request.op, s.LogCommit):
                    self.committed[(request.op.log, request.op.group)] = request.op.offset
                    appended.add(request.op.log)
                elif isinstance(request.op, s.DocPut) and self.on_document:
                    await self.on_document(request.op.ns, request.op.id, result)
        for log_name in appended:
            await self.update_lag(log_name)
            for frames, request, timer in self.parked.pop(log_name, []):
                timer.cancel()
                await self.answer_read(frames, request, may_wait=False)

    async def update_lag(self, log_name: str) -> None:
        if log_name not in self.heads:
            info = await self.backend.read(s.LogInfo(log=log_name))
            self.heads[log_name] = info.next_offset
        for (log, group), offset in self.committed.items():
            if log == log_name:
                LOG_LAG.labels(log, group).set(self.heads[log_name] - offset)

    def park(self, frames: list[bytes], request: s.StorageRequest) -> None:
        op = request.op
        waiting = self.parked.setdefault(op.log, [])

        def expire() -> None:
            for i, (_, parked, _) in enumerate(waiting):
                if parked is request:
                    del waiting[i]
                    empty = s.LogReadResult([], op.offset)
                    self.reply(frames, s.StorageReply(id=request.id, ok=True, result=empty))
                    return
        timer = asyncio.get_running_loop().call_later(op.wait_ms / 1000, expire)
        waiting.append((frames, request, timer))

    async def answer_read(self, frames: list[bytes], request: s.StorageRequest,
                          may_wait: bool = True) -> None:
        started = time.perf_counter()
        try:
            result = await self.backend.read(request.op)
        except StorageFailure as exc:
            self.fail(frames, request, exc)
            return
        except Exception as exc:
            log.exception("read %s failed", op_name(request.op))
            self.fail(frames, request, StorageFailure(f"internal error: {exc}"))
            return
        OP_SECONDS.labels(op_name(request.op)).observe(time.perf_counter() - started)
        if may_wait and isinstance(request.op, s.LogRead) and request.op.wait_ms \
                and not result.records:
            self.park(frames, request)
            return
        self.reply(frames, s.StorageReply(id=request.id, ok=True, result=result))

    def fail(self, frames: list[bytes], request: s.StorageRequest, exc: StorageFailure) -> None:
        ERRORS.labels(op_name(request.op), exc.code.name).inc()
        self.reply(frames, s.StorageReply(id=request.id, ok=False,
                                          error=s.StorageError(exc.code, str(exc))))

    def reply(self, frames: list[bytes], reply: s.StorageReply) -> None:
        self.served += 1
        if self.spans:
            self.end_span(frames[0], reply)
        sent = self.sock.send_multipart([frames[0], s.encode(reply)], flags=zmq.NOBLOCK)
        if sent.done() and sent.exception() is not None:  # a client that went away
            log.warning("storage.sock: reply to a client failed: %s", sent.exception())

    def end_span(self, client: bytes, reply: s.StorageReply) -> None:
        span = self.spans.pop((client, reply.id), None)
        if span is None:
            return
        if reply.error is not None:
            span.set_attribute("storage.error", reply.error.code.name)
            if reply.error.code in SERVER_FAULTS:
                tracing.fail(span, reply.error.message)
        span.end()

    def status(self) -> dict[str, Any]:
        return {"served": self.served, "available": self.available}
