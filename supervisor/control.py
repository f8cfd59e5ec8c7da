"""The control socket's commands: status, reload, stop, restart, call.

A reply says what was done after it was done: reload answers once every changed service has
applied the change (live or by a restart) or failed, restart once the service is READY again,
stop once every worker has exited. SIGHUP and the config watcher run the same reload path with
nobody to answer.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from ipc import messages as m
from ipc.config_loader import ConfigError, config_hash
from supervisor.reload import plan_reload
from supervisor.states import State
from supervisor.status import instance_detail

if TYPE_CHECKING:
    from supervisor.daemon import Daemon

log = logging.getLogger("optimizerd.control")
Respond = Callable[[m.Reply], None]
RELOAD_DEADLINE = 120.0
RESTART_DEADLINE = 60.0
ADMIN_CALL_DEADLINE = 10.0
MAX_ADMIN_CALL_DEADLINE = 3600.0  # a backup of a large store may take a while
SETTLED = (State.READY, State.FAILED)


@dataclass
class Pending:
    """A command whose reply waits for the supervised processes to get somewhere."""

    respond: Respond | None
    request_id: int
    check: Callable[[], dict[str, Any] | None]  # the result once done, else None
    deadline: float
    what: str
    on_done: Callable[[dict[str, Any] | None], None] | None = None


class ControlCommands:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.pending: list[Pending] = []
        self.stop_waiters: list[tuple[Respond, int]] = []
        self.admin_calls: dict[int, tuple[Respond, int]] = {}
        self.call_ids = itertools.count(1)
        self.reload_in_progress = False
        self.handlers: dict[str, Callable[[m.Request, Respond], None]] = {
            "status": self.status, "reload": self.reload_command, "stop": self.stop,
            "restart": self.restart, "call": self.call}

    # --- socket ----------------------------------------------------------------------------

    def drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # DEALER peers send [id, payload]; REQ peers [id, b"", payload].
            if len(frames) == 2 or (len(frames) == 3 and frames[1] == b""):
                self.handle(sock, frames[0], frames[1:-1], frames[-1])
            else:
                log.warning("control.sock: dropped a message of %d frames", len(frames))

    def handle(self, sock: zmq.Socket, identity: bytes, prefix: list[bytes],
               payload: bytes) -> None:
        def respond(reply: m.Reply) -> None:
            try:
                sock.send_multipart([identity, *prefix, m.encode(reply)], flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.info("control client went away before its reply: %s", exc)

        try:
            request = m.decode_request(payload)
        except m.ProtocolError as exc:
            log.warning("control.sock: dropped a bad request: %s", exc)
            code = (m.ErrorCode.UNSUPPORTED_VERSION if "version" in str(exc)
                    else m.ErrorCode.BAD_REQUEST)
            respond(m.error_reply(0, code, str(exc)))
            return
        handler = self.handlers.get(request.command)
        if handler is None:
            respond(m.error_reply(request.id, m.ErrorCode.UNKNOWN_COMMAND,
                                  f"unknown command {request.command!r}; known: "
                                  + ", ".join(sorted(self.handlers))))
            return
        try:
            handler(request, respond)
        except Exception as exc:
            log.exception("control command %s failed", request.command)
            respond(m.error_reply(request.id, m.ErrorCode.INTERNAL, f"internal error: {exc}"))

    # --- pending replies -------------------------------------------------------------------

    def wait_for(self, pending: Pending) -> None:
        self.pending.append(pending)
        self.daemon.timers.at(pending.deadline, lambda: None)  # wakes the loop to time it out
        self.check_pending()

    def check_pending(self) -> None:
        now = time.monotonic()
        for p in list(self.pending):
            result = p.check()
            if result is None and now < p.deadline:
                continue
            self.pending.remove(p)
            if p.on_done:
                p.on_done(result)
            if p.respond is None:
                continue
            if result is None:
                p.respond(m.error_reply(p.request_id, m.ErrorCode.TIMEOUT,
                                        f"{p.what} did not finish in time; see "
                                        "`optimizerctl status`"))
            else:
                p.respond(m.Reply(id=p.request_id, ok=True, result=result))

    def fail_pending(self, message: str) -> None:
        for p in self.pending:
            if p.on_done:
                p.on_done(None)
            if p.respond:
                p.respond(m.error_reply(p.request_id, m.ErrorCode.BUSY, message))
        self.pending.clear()
        for respond, request_id in self.admin_calls.values():
            respond(m.error_reply(request_id, m.ErrorCode.BUSY, message))
        self.admin_calls.clear()

    # --- commands --------------------------------------------------------------------------

    def instances_of(self, request: m.Request, respond: Respond) -> list | None:
        name = request.body.get("service")
        insts = self.daemon.supervision.instances.get(name) if isinstance(name, str) else None
        if not insts:
            known = ", ".join(self.daemon.supervision.order)
            respond(m.error_reply(request.id, m.ErrorCode.NO_SUCH_SERVICE,
                                  f"no service {name!r}; services: {known}"))
            return None
        return insts

    def status(self, request: m.Request, respond: Respond) -> None:
        doc = self.daemon.status_document()
        if request.body.get("service") is not None:
            insts = self.instances_of(request, respond)
            if insts is None:
                return
            now = time.monotonic()
            samples = self.daemon.supervision.samples
            doc["services"] = [instance_detail(i, now, samples.get(i.pid or -1)) for i in insts]
        respond(m.Reply(id=request.id, ok=True, result=doc))

    def stop(self, request: m.Request, respond: Respond) -> None:
        self.stop_waiters.append((respond, request.id))
        self.daemon.begin_shutdown("optimizerctl stop")

    def finish_stop(self) -> None:
        result = {"stopped": True, "pid": self.daemon.status_document()["supervisor"]["pid"]}
        for respond, request_id in self.stop_waiters:
            respond(m.Reply(id=request_id, ok=True, result=result))
        self.stop_waiters.clear()

    def restart(self, request: m.Request, respond: Respond) -> None:
        insts = self.instances_of(request, respond)
        if insts is None:
            return
        if self.daemon.state == "stopping":
            respond(m.error_reply(request.id, m.ErrorCode.BUSY, "optimizerd is stopping"))
            return
        for inst in insts:
            self.daemon.supervision.restart(inst, "optimizerctl restart")
        name = insts[0].service

        def check() -> dict[str, Any] | None:
            if any(i.state not in SETTLED for i in insts if i.want_running):
                return None
            return {"service": name, "states": [i.state.value for i in insts],
                    "pids": [i.pid for i in insts]}
        self.wait_for(Pending(respond, request.id, check, time.monotonic() + RESTART_DEADLINE,
                              f"restart of {name}"))

    def call(self, request: m.Request, respond: Respond) -> None:
        """Forward an admin command to the worker that owns the state it is about."""
        insts = self.instances_of(request, respond)
        if insts is None:
            return
        ready = [i for i in insts if i.state == State.READY]
        if not ready:
            respond(m.error_reply(request.id, m.ErrorCode.WORKER_UNAVAILABLE,
                                  f"{insts[0].service} is not ready"))
            return
        call_id = next(self.call_ids)
        self.admin_calls[call_id] = (respond, request.id)
        args = request.body.get("args") or {}
        trace = request.body.get("trace")  # the caller's traceparent, passed through
        self.daemon.send(ready[0].token, m.AdminCall(
            request_id=call_id, command=str(request.body.get("command", "")),
            args=args if isinstance(args, dict) else {},
            trace=trace if isinstance(trace, str) else None))

        def expire() -> None:
            waiting = self.admin_calls.pop(call_id, None)
            if waiting:
                waiting[0](m.error_reply(waiting[1], m.ErrorCode.TIMEOUT,
                                         f"{insts[0].service} did not answer in time"))
        deadline = request.body.get("timeout_s", ADMIN_CALL_DEADLINE)
        if not isinstance(deadline, (int, float)) or not 0 < deadline <= MAX_ADMIN_CALL_DEADLINE:
            deadline = ADMIN_CALL_DEADLINE
        self.daemon.timers.at(time.monotonic() + deadline, expire)

    def on_admin_reply(self, reply: m.AdminReply) -> None:
        waiting = self.admin_calls.pop(reply.request_id, None)
        if waiting is None:
            return
        respond, request_id = waiting
        if reply.ok:
            respond(m.Reply(id=request_id, ok=True, result=reply.result))
        else:
            respond(m.error_reply(request_id, m.ErrorCode.BAD_REQUEST, reply.error))

    # --- reload ----------------------------------------------------------------------------

    def reload_command(self, request: m.Request, respond: Respond) -> None:
        self.reload(respond, "optimizerctl reload", request.id)

    def reload(self, respond: Respond | None, source: str, request_id: int = 0) -> None:
        d = self.daemon

        def refuse(code: m.ErrorCode, message: str) -> None:
            log.error("reload (%s) refused: %s", source, message)
            if respond:
                respond(m.error_reply(request_id, code, message))

        if d.state == "stopping":
            return refuse(m.ErrorCode.BUSY, "optimizerd is stopping")
        if self.reload_in_progress:
            return refuse(m.ErrorCode.BUSY, "a reload is already in progress")
        try:
            new = d.load_config()
        except ConfigError as exc:
            d.reloads["error"] += 1
            return refuse(m.ErrorCode.CONFIG_INVALID,
                          f"{exc}; still running on the previous config")
        plan = plan_reload(d.config, new)
        log.info("reload (%s): added %s, removed %s, changed %s", source, plan.added or "-",
                 plan.removed or "-", (plan.to_reload + plan.to_restart) or "-")
        d.notifier.reloading()
        was_running = d.state == "running"
        if was_running:
            d.state = "reloading"
        notes = d.adopt_config(new)
        notes += [f"{key} applies at the next start of optimizerd"
                  for key in plan.needs_daemon_restart]
        sup = d.supervision
        sup.reload_outcomes.clear()
        doc = d.config_doc()
        for name in plan.to_reload:
            for inst in sup.instances[name]:
                if inst.state == State.READY:
                    sup.send_reload(inst, doc)
                elif inst.state == State.STARTING:  # it may have read the old config
                    sup.restart(inst, "reload during start")
                    sup.reload_outcomes[name] = "restarted"
                elif inst.state == State.FAILED:  # a changed config deserves a fresh start
                    sup.restart(inst, "reload: config changed")
                    sup.reload_outcomes[name] = "restarted"
        for name in plan.to_restart:
            for inst in sup.instances[name]:
                sup.restart(inst, "reload: entrypoint changed")
            sup.reload_outcomes[name] = "restarted"
        targets = plan.added + plan.to_reload + plan.to_restart
        self.reload_in_progress = True

        def check() -> dict[str, Any] | None:
            for name in targets:
                for inst in sup.instances.get(name, []):
                    if inst.reload_pending or (inst.want_running and
                                               inst.state not in SETTLED):
                        return None
            if any(name in sup.instances for name in plan.removed):
                return None
            outcomes = sup.reload_outcomes
            return {"config_hash": config_hash(d.config), "added": plan.added,
                    "removed": plan.removed,
                    "reloaded": sorted(n for n, o in outcomes.items() if o == "reloaded"),
                    "restarted": sorted(n for n, o in outcomes.items() if o == "restarted"),
                    "unchanged": plan.unchanged, "notes": notes}

        def done(result: dict[str, Any] | None) -> None:
            self.reload_in_progress = False
            d.reloads["ok" if result is not None else "error"] += 1
            if d.state == "reloading":
                d.state = "running"
                d.notifier.ready("reloaded" if result is not None else "reload incomplete")
            log.info("reload (%s) %s: %s", source, "done" if result else "timed out", result)

        self.wait_for(Pending(respond, request_id, check, time.monotonic() + RELOAD_DEADLINE,
                              "reload", on_done=done))
