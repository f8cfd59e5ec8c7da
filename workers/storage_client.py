"""Clients of the storage worker: asyncio for services, blocking for scripts and tools.

Both speak the protocol of ``ipc.storage`` over a DEALER socket to ``storage.sock`` and may have
many requests in flight (pipelining). A refused request raises the typed ``StorageFailure``
subclass of its error code; no answer within the timeout raises ``StorageTimeout``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from ipc import storage as s
from ipc.messages import MAX_MESSAGE_BYTES, ProtocolError
from workers import tracing

log = logging.getLogger("workers.storage_client")
DEFAULT_TIMEOUT = 5.0


def unwrap(reply: s.StorageReply, op: s.Op) -> Any:
    """The typed result of a reply, or its error raised as the matching StorageFailure."""
    if not reply.ok:
        error = reply.error
        if error is None:
            raise s.StorageFailure("request failed without an error")
        raise s.FAILURES.get(error.code, s.StorageFailure)(error.message)
    return s.result_as(reply, s.RESULT_TYPES[type(op)])


def _configure(sock: zmq.Socket, runtime_dir: str) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 16 * MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect("ipc://" + os.path.join(runtime_dir, s.STORAGE_SOCKET))


class StorageClient:
    """For asyncio code: ``await client.call(op)``, or the helpers below."""

    def __init__(self, runtime_dir: str, ctx: zmq.asyncio.Context | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.timeout = timeout
        self.sock = self.ctx.socket(zmq.DEALER)
        _configure(self.sock, runtime_dir)
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.receiver: asyncio.Task | None = None

    async def call(self, op: s.Op, timeout: float | None = None) -> Any:
        if self.receiver is None:
            self.receiver = asyncio.create_task(self.receive())
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            await self.sock.send(s.encode(s.StorageRequest(id=request_id, op=op,
                                                           trace=tracing.traceparent())))
            reply = await asyncio.wait_for(future, timeout or self.timeout)
        except TimeoutError:
            raise s.StorageTimeout(f"no answer from storage within "
                                   f"{timeout or self.timeout:g} s") from None
        finally:
            self.pending.pop(request_id, None)
        return unwrap(reply, op)

    async def receive(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                reply = s.decode_reply(frame)
            except ProtocolError as exc:
                log.warning("dropped a bad reply from storage: %s", exc)
                continue
            future = self.pending.get(reply.id)
            if future is not None and not future.done():
                future.set_result(reply)

    async def close(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
            await asyncio.gather(self.receiver, return_exceptions=True)
        self.sock.close(linger=0)

    # --- helpers ---------------------------------------------------------------------------

    async def get(self, ns: str, key: bytes) -> bytes | None:
        return await self.call(s.Get(ns=ns, key=key))

    async def put(self, ns: str, key: bytes, value: bytes) -> None:
        await self.call(s.Put(ns=ns, key=key, value=value))

    async def append(self, log_name: str, records: list[bytes]) -> s.AppendResult:
        return await self.call(s.LogAppend(log=log_name, records=records))

    async def read_log(self, log_name: str, offset: int, max_records: int = 500
                       ) -> s.LogReadResult:
        return await self.call(s.LogRead(log=log_name, offset=offset, max_records=max_records))

    async def commit(self, group: str, log_name: str, offset: int) -> None:
        await self.call(s.LogCommit(group=group, log=log_name, offset=offset))

    async def committed(self, group: str, log_name: str) -> int:
        return await self.call(s.LogCommitted(group=group, log=log_name))


class SyncStorageClient:
    """Blocking, for scripts, benchmarks and tests: ``call`` one, ``pipeline`` many."""

    def __init__(self, runtime_dir: str, timeout: float = DEFAULT_TIMEOUT):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        _configure(self.sock, runtime_dir)
        self.timeout = timeout
        self.ids = itertools.count(1)

    def call(self, op: s.Op, timeout: float | None = None) -> Any:
        result = self.pipeline([op], timeout)[0]
        if isinstance(result, s.StorageFailure):
            raise result
        return result

    def pipeline(self, ops: Sequence[s.Op], timeout: float | None = None) -> list[Any]:
        """Send every op, then gather the answers: results, or StorageFailure instances."""
        first = next(self.ids)
        for i, op in enumerate(ops):
            self.sock.send(s.encode(s.StorageRequest(id=first + i, op=op)))
        self.ids = itertools.count(first + len(ops))
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(answers) < len(ops):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise s.StorageTimeout(f"{len(ops) - len(answers)} of {len(ops)} requests "
                                       "unanswered")
            reply = s.decode_reply(self.sock.recv())
            index = reply.id - first
            if 0 <= index < len(ops):
                try:
                    answers[index] = unwrap(reply, ops[index])
                except s.StorageFailure as exc:
                    answers[index] = exc
        return [answers[i] for i in range(len(ops))]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
