"""The one base every service runs on: the worker side of the supervisor protocol.

A worker process connects a DEALER socket to the supervisor's ``workers.sock``, says HELLO,
runs its service's ``start()``, says READY, and then sends heartbeats from its own asyncio loop,
the loop that does the work, so a wedged worker goes silent and is restarted. It applies RELOAD
live or asks for a restart, answers admin calls, and on STOP (or SIGTERM) finishes in-flight
work within the deadline. If the supervisor stops answering heartbeats, it exits by itself.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import Counter

from ipc import messages as m
from ipc.config import Config, ServiceSection, worker_view
from ipc.endpoints import WORKERS_SOCKET, endpoint
from ipc.logrecords import LEVELS, configure_logging
from workers import tracing

log = logging.getLogger("workers.runtime")
# Written to <runtime_dir>/metrics (multiprocess mode) and served by the supervisor's /metrics.
HEARTBEATS = Counter("optimizer_worker_heartbeats", "Heartbeats sent by worker processes.",
                     ["service"])


class WorkerContext:
    """What a service's code may read about where and how it runs."""

    def __init__(self, spec: m.WorkerSpec, config: Config):
        self.service, self.instance, self.token = spec.service, spec.instance, spec.token
        self.runtime_dir, self.data_dir = spec.runtime_dir, spec.data_dir
        self.config = config
        self.section: ServiceSection = config.service_sections()[spec.service]
        self.started_at = time.monotonic()


class Worker:
    """Base class of a service. Override what the service needs; every hook is optional.

    ``start`` runs before READY; raising from it makes the process exit with an error (and be
    restarted with backoff). ``stop`` must finish in-flight work; it is cancelled at the deadline.
    """

    # The event loop the service runs on: None for asyncio's own.
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None

    def __init__(self, context: WorkerContext):
        self.context = context
        self.log = logging.getLogger(f"workers.{context.service}")

    async def start(self) -> None:
        """Open resources and start serving."""

    async def stop(self) -> None:
        """Finish in-flight work and close resources."""

    def health(self) -> tuple[m.Health, str]:
        """(ok | degraded | unhealthy, reason), sent with every heartbeat."""
        return "ok", ""

    def status(self) -> dict[str, Any]:
        """A small status payload for `optimizerctl status SERVICE`."""
        return {}

    async def reload(self, new: Config) -> bool:
        """Apply a changed config live and return True, or return False to be restarted.

        The default applies a change only when this service's own section is unchanged (the
        runtime itself applies the log level).
        """
        section = new.service_sections().get(self.context.service)
        return section is not None and worker_view(section) == worker_view(self.context.section)

    async def admin(self, command: str, args: dict[str, Any]) -> Any:
        """Answer an admin call forwarded by the supervisor (optimizerctl call)."""
        if command == "info":
            return {"service": self.context.service, "instance": self.context.instance,
                    "pid": os.getpid(),
                    "uptime_s": round(time.monotonic() - self.context.started_at, 3),
                    "health": self.health()[0], "status": self.status()}
        raise LookupError(f"{self.context.service} has no admin command {command!r}")


def load_worker_class(entrypoint: str) -> type[Worker]:
    module_name, _, class_name = entrypoint.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise TypeError(f"{entrypoint} is not a workers.runtime.Worker subclass")
    return cls


class WorkerRuntime:
    """Drives one Worker: the protocol loop, heartbeats, stop and reload."""

    def __init__(self, spec: m.WorkerSpec, config: Config, worker: Worker):
        self.spec, self.config, self.worker = spec, config, worker
        sup = config.supervisor
        self.heartbeat_interval = sup.heartbeat_interval
        # Exit on our own when the supervisor has been silent for this long.
        self.silence_timeout = max(3 * sup.heartbeat_timeout, m.MIN_SILENCE_TIMEOUT)
        self.last_heard = time.monotonic()
        self.seq = 0
        self.stopping = asyncio.Event()
        self.stop_deadline = sup.shutdown_timeout
        self.exit_code = 0
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * m.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.IDENTITY, spec.token.encode())
        self.sock.connect(endpoint(spec.runtime_dir, WORKERS_SOCKET))
        self.tasks: list[asyncio.Task] = []

    async def send(self, message: m.Message) -> None:
        await self.sock.send(m.encode(message))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, 2.0, "SIGTERM")
        self.watch_supervisor(loop)
        token = self.spec.token
        await self.send(m.Hello(service=self.spec.service, instance=self.spec.instance,
                                pid=os.getpid(), token=token))
        # start() first: it runs up to its first await before the first heartbeat asks health().
        starting = asyncio.create_task(self.worker.start())
        self.tasks = [asyncio.create_task(self.receive_loop()),
                      asyncio.create_task(self.heartbeat_loop())]
        stop_requested = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # STOP or SIGTERM before READY: nothing is in flight yet, so drop the start rather
            # than make the supervisor wait for it (and then kill us).
            log.info("start of %s cancelled: stopping before ready", self.spec.service)
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await self.shutdown_tasks()
            return self.exit_code
        try:
            starting.result()
        except Exception:
            log.exception("start of %s failed", self.spec.service)
            stop_requested.cancel()
            await self.shutdown_tasks()
            return 1
        await self.send(m.Ready(token=token))
        log.debug("ready")
        await stop_requested
        try:
            await asyncio.wait_for(self.worker.stop(), self.stop_deadline)
        except TimeoutError:
            log.warning("stop did not finish within %.1f s; exiting anyway", self.stop_deadline)
            self.exit_code = self.exit_code or 1
        except Exception:
            log.exception("stop of %s failed", self.spec.service)
            self.exit_code = self.exit_code or 1
        await self.shutdown_tasks()
        return self.exit_code

    def watch_supervisor(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop at once when the supervisor process ends (a pidfd turns readable)."""
        try:
            fd = os.pidfd_open(self.spec.supervisor_pid)
        except ProcessLookupError:
            self.request_stop(2.0, "supervisor gone", exit_code=3)
            return
        except OSError as exc:  # pidfd needs Linux 5.3; the silence timeout still applies
            log.warning("cannot watch the supervisor's pid: %s", exc)
            return
        loop.add_reader(fd, self.request_stop, 2.0, "supervisor gone", 3)

    async def shutdown_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.sock.close(linger=500)
        self.ctx.term()

    def request_stop(self, deadline_s: float, why: str, exit_code: int = 0) -> None:
        if not self.stopping.is_set():
            log.info("stopping (%s), deadline %.1f s", why, deadline_s)
            self.stop_deadline = deadline_s
            self.exit_code = exit_code
            self.stopping.set()

    async def heartbeat_loop(self) -> None:
        sent = HEARTBEATS.labels(service=self.spec.service)
        while True:
            if time.monotonic() - self.last_heard > self.silence_timeout:
                log.error("supervisor silent for %.0f s; exiting", self.silence_timeout)
                self.request_stop(2.0, "supervisor silent", exit_code=3)
            try:  # an exception must not end the heartbeats: it is reported, not hidden
                health, reason = self.worker.health()
            except Exception as exc:
                log.exception("health() failed")
                health, reason = "unhealthy", f"health() failed: {exc}"
            try:
                status = self.worker.status()
            except Exception as exc:
                log.exception("status() failed")
                health, reason, status = "unhealthy", f"status() failed: {exc}", {}
            self.seq += 1
            await self.send(m.Heartbeat(token=self.spec.token, seq=self.seq, health=health,
                                        reason=reason, status=status))
            sent.inc()
            # Beat on the interval's multiples of the shared monotonic clock: every worker then
            # beats at the same instant and the supervisor wakes once for all of them.
            interval = self.heartbeat_interval
            await asyncio.sleep(interval - time.monotonic() % interval)

    async def receive_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            self.last_heard = time.monotonic()
            if len(frames) != 1:
                log.warning("dropped a message of %d frames from the supervisor", len(frames))
                continue
            try:
                message = m.decode_supervisor_message(frames[0])
            except m.ProtocolError as exc:
                log.warning("dropped a bad message from the supervisor: %s", exc)
                continue
            await self.dispatch(message)

    async def dispatch(self, message: m.SupervisorMessage) -> None:
        if isinstance(message, m.HeartbeatAck):
            return
        if isinstance(message, m.Stop):
            self.request_stop(message.deadline_s, "STOP from supervisor")
        elif isinstance(message, m.Reload):
            await self.apply_reload(message.config)
        elif isinstance(message, m.AdminCall):
            asyncio.create_task(self.answer_admin(message))

    async def apply_reload(self, raw: dict[str, Any]) -> None:
        try:
            new = msgspec.convert(raw, Config)
            if tracing.settings(new) != tracing.settings(self.config):
                applied, reason = False, "tracing settings change needs a restart"
            else:
                applied = await self.worker.reload(new)
                reason = "" if applied else "change needs a restart"
        except Exception as exc:
            log.exception("reload failed")
            applied, reason = False, f"reload failed: {exc}"
        if applied:
            logging.getLogger().setLevel(LEVELS[new.observability.log_level])
            self.heartbeat_interval = new.supervisor.heartbeat_interval
            self.config = new
            self.worker.context.config = new
            self.worker.context.section = new.service_sections()[self.spec.service]
        await self.send(m.ReloadResult(token=self.spec.token, applied=applied, reason=reason))

    async def answer_admin(self, call: m.AdminCall) -> None:
        carrier = {"traceparent": call.trace} if call.trace else None
        try:
            with tracing.server_span(f"admin {call.command}", carrier, {
                    "admin.service": self.spec.service, "admin.command": call.command}):
                result = await self.worker.admin(call.command, call.args)
            reply = m.AdminReply(token=self.spec.token, request_id=call.request_id, ok=True,
                                 result=msgspec.to_builtins(result))
        except Exception as exc:
            log.info("admin %s failed: %s", call.command, exc)
            reply = m.AdminReply(token=self.spec.token, request_id=call.request_id, ok=False,
                                 error=str(exc))
        await self.send(reply)


def run_worker(spec_bytes: bytes, stdout: Any, stderr: Any) -> None:
    """Entry point of a worker process, called in the fork server's fresh child.

    ``stdout``/``stderr`` are multiprocess Connections wrapping the write ends of the
    supervisor's pipes for this process.
    """
    from workers.process import prepare_worker_process

    spec = m.decode_spec(spec_bytes)
    config = msgspec.convert(spec.config, Config)
    title = spec.service if config.service_sections()[spec.service].processes == 1 \
        else f"{spec.service}#{spec.instance}"
    prepare_worker_process(title, os.dup(stdout.fileno()), os.dup(stderr.fileno()))
    stdout.close()
    stderr.close()
    configure_logging(spec.service, config.observability.log_level, json_lines=True)
    code = 1
    try:
        tracing.setup(config, spec.service, spec.instance)
        worker = load_worker_class(spec.entrypoint)(WorkerContext(spec, config))
        with asyncio.Runner(loop_factory=worker.loop_factory) as runner:
            code = runner.run(WorkerRuntime(spec, config, worker).run())
    except Exception:
        log.exception("worker %s crashed", spec.service)
    finally:
        tracing.shutdown()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
