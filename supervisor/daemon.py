"""optimizerd's main loop: one thread, one poller, a deadline heap.

The poller watches the workers' ROUTER socket, the control ROUTER socket, the signal wakeup fd,
every worker's exit sentinel and output pipes, the admin thread's wakeup fd and (optionally) an
inotify fd on the config file. Its timeout is the time to the earliest timer, so an idle
supervisor sleeps. Signal handlers only write to the wakeup fd; the loop does the work.
"""
from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from ipc import messages as m
from ipc.config import Config
from ipc.config_loader import config_hash, load_config
from ipc.endpoints import (CONTROL_SOCKET, METRICS_DIR, PID_FILE, WORKERS_SOCKET, data_dir,
                           endpoint, ensure_private_dir, runtime_dir, socket_path)
from ipc.logrecords import configure_logging
from supervisor.admin_http import AdminServer
from supervisor.childlogs import ChildOutput
from supervisor.config_watch import ConfigWatch
from supervisor.control import ControlCommands
from supervisor.instance import ServiceInstance
from supervisor.loop_poller import LoopPoller
from supervisor.metrics import mark_process_dead, reset_multiprocess_dir
from supervisor.sdnotify import SystemdNotifier
from supervisor.spawner import SpawnedProcess, Spawner
from supervisor.status import Snapshot, instance_status, supervisor_status
from supervisor.supervision import Hooks, Supervision
from supervisor.timers import Timers

log = logging.getLogger("optimizerd.daemon")
RESOURCE_SAMPLE_INTERVAL = 2.0
SNAPSHOT_WAIT = 5.0


class AlreadyRunning(RuntimeError):
    pass


class Daemon(Hooks):
    def __init__(self, config: Config, config_path: str | None,
                 load: Callable[[], Config] | None = None):
        self.config, self.config_path = config, config_path
        # How a reload reads the config: the file and environment, plus whatever the command
        # line overrode at start (raises ConfigError).
        self.load_config = load or (lambda: load_config(config_path))
        self.runtime = runtime_dir(config)
        self.data = data_dir(config)
        self.metrics_dir = os.path.join(self.runtime, METRICS_DIR)
        self.started_at = time.monotonic()
        self.state = "starting"  # starting, running, reloading, stopping
        self.reloads = {"ok": 0, "error": 0}
        self.timers = Timers()
        self.outputs: dict[int, ChildOutput] = {}
        self.sentinels: dict[int, SpawnedProcess] = {}
        self.done = False
        self.exit_code = 0
        self.snapshot_requests: queue.SimpleQueue = queue.SimpleQueue()

    # --- Hooks for Supervision -------------------------------------------------------------

    def send(self, token: str, message: m.Message) -> None:
        try:
            self.workers.send_multipart([token.encode(), m.encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the process is gone or not connected yet
            log.debug("cannot send %s to %s: %s", type(message).__name__, token, exc)

    def watch_process(self, proc: SpawnedProcess) -> None:
        inst = self.supervision.by_sentinel[proc.sentinel]
        self.sentinels[proc.sentinel] = proc
        self.poller.register(proc.sentinel, zmq.POLLIN)
        for fd, stream in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            self.outputs[fd] = ChildOutput(fd, inst.label, proc.pid, stream)
            self.poller.register(fd, zmq.POLLIN)

    def process_gone(self, proc: SpawnedProcess) -> None:
        self.poller.unregister(proc.sentinel)
        self.sentinels.pop(proc.sentinel, None)
        mark_process_dead(self.metrics_dir, proc.pid)
        proc.process.close()

    def worker_spec(self, inst: ServiceInstance) -> bytes:
        return m.encode_spec(m.WorkerSpec(
            service=inst.service, instance=inst.index, token=inst.token,
            entrypoint=inst.section.entrypoint, runtime_dir=self.runtime, data_dir=self.data,
            config=self.config_doc(), supervisor_pid=os.getpid()))

    # --- set-up and tear-down --------------------------------------------------------------

    def lock_pid_file(self) -> None:
        path = os.path.join(self.runtime, PID_FILE)
        self.pid_file = open(path, "a+")
        try:
            fcntl.flock(self.pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.pid_file.seek(0)
            other = self.pid_file.read().strip() or "?"
            self.pid_file.close()
            raise AlreadyRunning(f"optimizerd is already running (pid {other}) with runtime_dir "
                                 f"{self.runtime}") from None
        self.pid_file.seek(0)
        self.pid_file.truncate()
        self.pid_file.write(f"{os.getpid()}\n")
        self.pid_file.flush()

    def bind(self, kind: int, name: str) -> zmq.Socket:
        path = socket_path(self.runtime, name)
        if os.path.exists(path):
            os.unlink(path)  # stale: we hold the pid file lock, nobody else serves it
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * m.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        old_umask = os.umask(0o177)
        try:
            sock.bind(endpoint(self.runtime, name))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        return sock

    def setup(self) -> None:
        ensure_private_dir(self.runtime)
        os.makedirs(self.data, mode=0o700, exist_ok=True)
        self.lock_pid_file()
        # Bind the admin port first: if it is taken, fail before anything was started.
        self.admin = AdminServer(self.config.admin.listen, self.request_snapshot,
                                 self.metrics_dir)
        reset_multiprocess_dir(self.metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        self.notifier = SystemdNotifier()
        self.spawner = Spawner(self.config.supervisor.preload)
        self.spawner.warm_up()  # the fork server imports while we set up the rest
        self.ctx = zmq.Context()
        self.workers = self.bind(zmq.ROUTER, WORKERS_SOCKET)
        self.control_sock = self.bind(zmq.ROUTER, CONTROL_SOCKET)
        self.signal_r, self.signal_w = socket.socketpair()
        self.wake_r, self.wake_w = socket.socketpair()
        for s in (self.signal_r, self.signal_w, self.wake_r, self.wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self.signal_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number
        self.poller = LoopPoller()
        for item in (self.workers, self.control_sock, self.signal_r.fileno(),
                     self.wake_r.fileno()):
            self.poller.register(item, zmq.POLLIN)
        self.supervision = Supervision(self.config, self.spawner, self, self.timers)
        self.control = ControlCommands(self)
        self.admin.start()
        self.watch = ConfigWatch(self.config_path, self.poller, self.timers,
                                 lambda: self.control.reload(None, "config file changed"))
        self.watch.enable(self.config.supervisor.watch_config)
        if self.notifier.watchdog_interval:
            self.pet_watchdog()
        self.timers.at(time.monotonic() + 0.5, self.sample_resources)
        log.info("optimizerd %d starting %d services (runtime_dir %s)", os.getpid(),
                 len(self.supervision.all_instances()), self.runtime)

    def teardown(self) -> None:
        self.control.fail_pending("optimizerd is shutting down")
        self.watch.close()
        self.admin.close()
        signal.set_wakeup_fd(-1)
        for fd in list(self.outputs):  # whatever the workers wrote last
            self.drain_output(fd)
        self.workers.close()
        self.control_sock.close()
        self.ctx.term()
        self.poller.close()
        self.spawner.close()
        for name in (WORKERS_SOCKET, CONTROL_SOCKET, PID_FILE):
            try:
                os.unlink(socket_path(self.runtime, name))
            except FileNotFoundError:
                pass
        self.pid_file.close()
        self.notifier.close()

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        try:
            self.supervision.reconcile()
            while not self.done:
                self.loop_once()
        finally:
            self.teardown()
        log.info("optimizerd stopped")
        return self.exit_code

    def loop_once(self) -> None:
        due = self.timers.next_due()
        timeout = None if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
        events = self.poller.poll(timeout)
        for item, _ in events:
            if item is self.workers:
                self.drain_workers()
            elif item is self.control_sock:
                self.control.drain(self.control_sock)
            elif item == self.signal_r.fileno():
                self.on_signals()
            elif item == self.wake_r.fileno():
                self.answer_snapshot_requests()
            elif item in self.sentinels:
                self.supervision.on_exit(item)
            elif item in self.outputs:
                if not self.outputs[item].on_readable():
                    self.close_output(item)
            elif self.watch.owns(item):
                self.watch.on_readable()
        self.timers.run_due(time.monotonic())
        self.supervision.reconcile()
        self.control.check_pending()
        self.after_changes()

    def after_changes(self) -> None:
        """State-dependent steps: first READY=1, and the end of a shutdown."""
        if self.state == "starting" and self.supervision.all_ready():
            self.state = "running"
            took = time.monotonic() - self.started_at
            n = len(self.supervision.all_instances())
            log.info("all %d services ready in %.2f s", n, took)
            self.notifier.ready(f"{n} services ready")
        if self.state == "stopping" and self.supervision.all_stopped():
            self.control.finish_stop()
            self.done = True

    # --- events ----------------------------------------------------------------------------

    def drain_workers(self) -> None:
        while True:
            try:
                frames = self.workers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                log.warning("workers.sock: dropped a message of %d frames", len(frames))
                continue
            identity, payload = frames
            try:
                message = m.decode_worker_message(payload)
            except m.ProtocolError as exc:
                log.warning("workers.sock: dropped a bad message: %s", exc)
                continue
            if message.token.encode() != identity:
                log.warning("workers.sock: dropped a message whose token does not match its "
                            "sender")
                continue
            inst = self.supervision.on_message(message)
            if inst is not None and isinstance(message, m.AdminReply):
                self.control.on_admin_reply(message)

    def on_signals(self) -> None:
        try:
            data = self.signal_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(signum).name
                if self.state == "stopping" and signum == signal.SIGINT:
                    log.warning("second SIGINT: killing every worker now")
                    for inst in self.supervision.all_instances():
                        self.supervision.signal(inst, signal.SIGKILL)
                self.begin_shutdown(name)
            elif signum == signal.SIGHUP:
                self.control.reload(None, "SIGHUP")

    def begin_shutdown(self, why: str) -> None:
        if self.state == "stopping":
            return
        log.info("stopping all services (%s)", why)
        self.state = "stopping"
        self.notifier.stopping()
        self.watch.enable(False)
        self.supervision.stop_all()

    def close_output(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.outputs.pop(fd).close()

    def drain_output(self, fd: int) -> None:
        self.outputs[fd].drain()
        self.close_output(fd)

    def pet_watchdog(self) -> None:
        self.notifier.watchdog()
        self.timers.at(time.monotonic() + self.notifier.watchdog_interval, self.pet_watchdog)

    def sample_resources(self) -> None:
        self.supervision.sample_resources()
        self.timers.at(time.monotonic() + RESOURCE_SAMPLE_INTERVAL, self.sample_resources)

    # --- status ----------------------------------------------------------------------------

    def status_document(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        samples = self.supervision.samples
        sup = supervisor_status(self.state, self.started_at, config_hash(self.config),
                                self.config_path, self.state != "stopping"
                                and self.supervision.all_ready(), now)
        sup["reloads"] = dict(self.reloads)
        return {"supervisor": sup,
                "services": [instance_status(i, now, samples.get(i.pid or -1))
                             for i in self.supervision.all_instances()]}

    def request_snapshot(self) -> dict[str, Any]:
        """Called from the admin thread: ask the loop for a snapshot and wait for it."""
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self.snapshot_requests.put(answer)
        try:
            self.wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the loop is already being woken
        snapshot: Snapshot = answer.get(timeout=SNAPSHOT_WAIT)
        return snapshot.at(time.monotonic())

    def answer_snapshot_requests(self) -> None:
        try:
            self.wake_r.recv(4096)
        except BlockingIOError:
            pass
        snapshot = None
        while True:
            try:
                answer = self.snapshot_requests.get_nowait()
            except queue.Empty:
                return
            if snapshot is None:
                now = time.monotonic()
                snapshot = Snapshot(now, self.status_document(now))
            answer.put(snapshot)

    # --- reload (the work; ControlCommands owns the request side) ----------------------------

    def adopt_config(self, new: Config) -> list[str]:
        """Switch to a validated config; returns notes about what needs a daemon restart."""
        old = self.config
        self.config = new
        obs = new.observability
        if obs != old.observability:
            configure_logging("supervisor", obs.log_level, obs.json_logs)
        notes = []
        if new.admin.listen != old.admin.listen:
            try:
                admin = AdminServer(new.admin.listen, self.request_snapshot, self.metrics_dir)
            except OSError as exc:
                notes.append(f"admin.listen {new.admin.listen}: {exc.strerror}; kept "
                             f"{old.admin.listen}")
                log.error(notes[-1])
            else:
                self.admin.close()
                self.admin = admin
                admin.start()
        self.watch.enable(new.supervisor.watch_config)
        self.supervision.apply_config(new)
        return notes

    def config_doc(self) -> dict[str, Any]:
        return msgspec.to_builtins(self.config)

