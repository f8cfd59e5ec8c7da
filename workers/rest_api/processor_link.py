"""Commands to other workers through the supervisor's control socket, as optimizerctl sends them.

The processor owns rollouts and proposals, so the API asks it (``call processor deploy ...``)
rather than touching that state itself. One asyncio DEALER socket carries every request,
matched to its reply by id, so that concurrent HTTP requests do not each open a socket.
An admin command that fails in the worker comes back as ``CommandFailed`` with the worker's
message; the caller maps it to the right HTTP status.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from ipc import messages as m
from ipc.endpoints import CONTROL_SOCKET, endpoint
from workers import tracing
from workers.rest_api.problems import Problem

log = logging.getLogger("workers.rest_api")
DEFAULT_TIMEOUT = 10.0


class CommandFailed(Exception):
    """The worker (or the supervisor) refused the command; ``message`` says why."""

    def __init__(self, code: m.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ControlLink:
    def __init__(self, runtime_dir: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 16 * m.MAX_MESSAGE_BYTES)
        self.sock.connect(endpoint(runtime_dir, CONTROL_SOCKET))
        self.timeout = timeout
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[m.Reply]] = {}
        self.receiver: asyncio.Task[None] | None = None

    async def request(self, command: str, body: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """The command's result; CommandFailed, or a 503/504 problem when nobody answers."""
        if self.receiver is None:
            self.receiver = asyncio.create_task(self._receive(), name="control-link")
        request_id = next(self.ids)
        future: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            await self.sock.send(m.encode(m.Request(id=request_id, command=command,
                                                    body=body or {})))
            reply = await asyncio.wait_for(future, timeout or self.timeout)
        except TimeoutError:
            raise Problem(504, "Gateway Timeout", f"optimizerd did not answer {command!r} in "
                          "time", type_suffix="upstream-timeout") from None
        finally:
            self.pending.pop(request_id, None)
        if reply.ok:
            return reply.result
        error = reply.error or m.ErrorInfo(code=m.ErrorCode.INTERNAL, message="failed")
        if error.code in (m.ErrorCode.WORKER_UNAVAILABLE, m.ErrorCode.TIMEOUT,
                          m.ErrorCode.NO_SUCH_SERVICE):
            raise Problem(503, "Service Unavailable", error.message, retry_after=1,
                          type_suffix="upstream-unavailable")
        raise CommandFailed(error.code, error.message)

    async def call(self, service: str, command: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """An admin command of ``service``'s worker (``optimizerctl call``)."""
        body = {"service": service, "command": command, "args": args or {}}
        trace = tracing.traceparent()
        if trace is not None:
            body["trace"] = trace
        return await self.request("call", body, timeout)

    async def _receive(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                reply = m.decode_reply(frame)
            except m.ProtocolError as exc:
                log.warning("bad control reply dropped: %s", exc)
                continue
            future = self.pending.get(reply.id)
            if future is not None and not future.done():
                future.set_result(reply)

    async def close(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
            self.receiver = None
        self.sock.close()
