#!/usr/bin/env python3
"""Benchmark optimizerd's supervisor: start, crash recovery, stop, idle cost, control round trip.

    python scripts/bench_supervisor.py                 # every measurement (about 5 min)
    python scripts/bench_supervisor.py --quick         # fewer repetitions, a smoke run
    python scripts/bench_supervisor.py --only crash    # one measurement
    python scripts/bench_supervisor.py --compare       # also supervisord and circusd (about
                                                       # 13 min; pip installs both into a
                                                       # throwaway venv)

Every daemon runs in its own temporary directory with free TCP ports, in its own session
(process group). Every process the script starts is tracked by pid and killed at the end, also on
an error or Ctrl-C. docs/benchmarks.md describes the method and the figures of a full run.

Measurements (``--only NAME``):
  start    the six default services: launch of `optimizerd start` to the READY=1 datagram on our
           own NOTIFY_SOCKET (AF_UNIX DGRAM); then `optimizerctl stop` time
  stubs6   the same with 6 stub services (built-ins disabled)
  stubs50  the same with 50 stub services
  stop     start and stubs6 again, reporting their stop figures
  crash    SIGKILL of collector and of a stub: kill-to-noticed and kill-to-replacement-READY,
           read from the daemon's --json-logs timestamps; a few kills cross-checked by polling
           the raw control socket
  idle     CPU (% of one core) and RSS of the supervisor and of the fork server, 30 s idle,
           heartbeats every 1 s; for the six services, 6 stubs and 50 stubs
  status   `optimizerctl status` whole command (subprocess) and raw socket round trip
  orphans  SIGKILL the supervisor: are its workers gone, and how soon
"""
from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import tomli_w
import zmq

from ipc import messages as m

BIN = os.path.dirname(sys.executable)


def console_script(name: str) -> str:
    """The real console script next to this interpreter, not a pyenv shim (the shim alone costs
    about 50 ms per call on this machine; `status` measures that separately)."""
    direct = os.path.join(BIN, name)
    return direct if os.access(direct, os.X_OK) else (shutil.which(name) or name)


OPTIMIZERD = console_script("optimizerd")
OPTIMIZERCTL = console_script("optimizerctl")
BUILTINS = ("storage", "collector", "processor", "rest_api", "grpc_api", "integrations")
EXTRA_PRELOAD: list[str] = []  # --extra-preload: appended to supervisor.preload (what-if runs)

MEASUREMENTS = ("start", "stubs6", "stubs50", "stop", "crash", "idle", "status", "orphans")


# --- small helpers -----------------------------------------------------------------------------

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p95 of 20 samples is the 19th smallest)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def ms(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1000:.1f} ms"


def sec(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f} s"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / (1 << 20):.1f} MiB"


def summary(xs: list[float], unit: Callable[[float], str] = sec) -> str:
    if not xs:
        return "no samples"
    return (f"median {unit(median(xs))}, min {unit(min(xs))}, max {unit(max(xs))}, "
            f"n={len(xs)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """Our environment without anything that would steer the daemons elsewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LLM_OPTIMIZER", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}


def tool_env() -> dict[str, str]:
    """For supervisord and circusd: also without PYTHONPATH, which may point at this project,
    whose `supervisor` package would shadow supervisord's own."""
    return {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def log_line(text: str) -> None:
    print(text, flush=True)


def utc_iso_to_epoch(ts: str) -> float:
    """'2026-11-25T17:53:24.550Z' (truncated to the ms) -> epoch s, at the middle of that ms."""
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + \
        int(ts[20:23]) / 1000 + 0.0005


def local_comma_to_epoch(ts: str) -> float:
    """supervisord's '2026-11-25 17:53:24,550' (local time, truncated to the ms) -> epoch s."""
    return time.mktime(time.strptime(ts[:19], "%Y-%m-%d %H:%M:%S")) + int(ts[20:23]) / 1000 \
        + 0.0005


# --- process bookkeeping -----------------------------------------------------------------------

class Reaper:
    """Everything we start, so that it can all be killed at the end, by pid."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen] = []
        self.pids: dict[int, float] = {}  # pid -> create_time, to never kill a reused pid
        self.dirs: list[str] = []
        self.markers: list[str] = []  # unique paths: a process whose cmdline has one is ours
        self.keep_dirs = False

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)  # own process group, no terminal Ctrl-C
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(args, **kw)
        self.popens.append(proc)
        self.track(proc.pid)
        return proc

    def track(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self.pids[pid] = psutil.Process(pid).create_time()

    def track_tree(self, pid: int) -> list[psutil.Process]:
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                self.pids[kid.pid] = kid.create_time()
        return kids

    def sweep(self, marker: str) -> list[int]:
        """Kill, by pid, every process whose command line contains ``marker`` (a path unique to
        this run), e.g. children a supervisor started after our last look and left behind."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE and \
                    any(marker in a for a in (p.info["cmdline"] or [])):
                with contextlib.suppress(psutil.Error):
                    p.kill()
                found.append(p.info["pid"])
        return found

    def tempdir(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=f"bench-sup-{prefix}")
        self.dirs.append(path)
        return path

    def alive(self, pid: int) -> bool:
        created = self.pids.get(pid)
        try:
            p = psutil.Process(pid)
            return (created is None or abs(p.create_time() - created) < 0.01) and \
                p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def cleanup(self) -> None:
        for proc in self.popens:  # whole process groups first (the daemons' sessions)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in list(self.pids):  # then every pid seen, e.g. circus children in own sessions
            if self.alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for marker in self.markers:
            self.sweep(marker)
        for proc in self.popens:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        deadline = time.monotonic() + 3.0  # SIGKILLed processes take a moment to be gone
        while (left := [pid for pid in self.pids if self.alive(pid)]) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            log_line(f"WARNING: still alive after clean-up: {left}")
        if not self.keep_dirs:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)


REAPER = Reaper()


def timed_ctl(args: list[str], daemon_pid: int, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> tuple[float, float, str, float]:
    """Run a control command that stops a daemon; (command wall s, daemon gone s, output, wall
    clock at launch), both times from the launch of the command, the daemon's exit seen through
    its own pidfd."""
    daemon_fd = os.pidfd_open(daemon_pid)
    t0_wall = time.time()
    t0 = time.monotonic()
    ctl = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env or clean_env())
    ctl_fd = os.pidfd_open(ctl.pid)
    t_ctl = t_gone = math.nan
    pending = {ctl_fd, daemon_fd}
    deadline = t0 + timeout
    try:
        while pending and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pending), [], [], max(0, deadline - time.monotonic()))
            now = time.monotonic()
            for fd in ready:
                pending.discard(fd)
                if fd == ctl_fd:
                    t_ctl = now - t0
                else:
                    t_gone = now - t0
    finally:
        os.close(ctl_fd)
        os.close(daemon_fd)
    out = ctl.communicate(timeout=5)[0].decode(errors="replace")
    return t_ctl, t_gone, out, t0_wall


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user+system from psutil, 10 ms ticks; sum of every thread's schedstat run time, ns)."""
    p = psutil.Process(pid)
    t = p.cpu_times()
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            ns += int(f.read().split()[0])
    return t.user + t.system, ns / 1e9


@dataclass
class IdleResult:
    label: str
    window: float
    cpu_pct: float         # psutil cpu_times
    cpu_pct_sched: float   # schedstat, ns resolution
    rss_end: int
    rss_max: int
    uss: int | None

    def line(self) -> str:
        return (f"{self.label}: CPU {self.cpu_pct:.3f}% of a core (psutil cpu_times), "
                f"{self.cpu_pct_sched:.3f}% (schedstat); RSS {mib(self.rss_end)} "
                f"(max {mib(self.rss_max)}), USS {mib(self.uss)}")


def measure_idle(pids: dict[str, int], window: float, group: dict[str, list[int]] | None = None
                 ) -> tuple[dict[str, IdleResult], dict[str, float]]:
    """CPU and RSS of each pid over ``window`` seconds, RSS sampled every second. ``group``:
    labelled lists of pids whose summed CPU is reported too (e.g. all workers)."""
    group = group or {}
    start = {k: process_cpu_seconds(p) for k, p in pids.items()}
    gstart = {k: sum(psutil.Process(p).cpu_times().user + psutil.Process(p).cpu_times().system
                     for p in ps) for k, ps in group.items()}
    rss_max = {k: 0 for k in pids}
    t0 = time.monotonic()
    while (left := t0 + window - time.monotonic()) > 0:
        for k, p in pids.items():
            rss_max[k] = max(rss_max[k], psutil.Process(p).memory_info().rss)
        time.sleep(min(1.0, left))
    wall = time.monotonic() - t0
    out = {}
    for k, p in pids.items():
        end = process_cpu_seconds(p)
        proc = psutil.Process(p)
        rss = proc.memory_info().rss
        try:
            uss = proc.memory_full_info().uss
        except psutil.Error:
            uss = None
        out[k] = IdleResult(k, wall, (end[0] - start[k][0]) / wall * 100,
                            (end[1] - start[k][1]) / wall * 100, rss, max(rss_max[k], rss), uss)
    gout = {}
    for k, ps in group.items():
        total = sum(psutil.Process(p).cpu_times().user + psutil.Process(p).cpu_times().system
                    for p in ps)
        gout[k] = (total - gstart[k]) / wall * 100
    return out, gout


# --- log tails ---------------------------------------------------------------------------------

class LineTail:
    """Reads a log file as it grows; ``parse`` turns a line into a record or None."""

    def __init__(self, path: str, parse: Callable[[str], Any]):
        self.path, self.parse = path, parse
        self.f = None
        self.buf = b""
        self.records: list[Any] = []
        self.pos = 0  # records before pos were consumed by wait_for

    def read(self) -> None:
        if self.f is None:
            try:
                self.f = open(self.path, "rb")  # noqa: SIM115 - kept open while tailing
            except FileNotFoundError:
                return
        chunk = self.f.read()
        if not chunk:
            return
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            rec = self.parse(line.decode(errors="replace"))
            if rec is not None:
                self.records.append(rec)

    def skip(self) -> None:
        self.read()
        self.pos = len(self.records)

    def wait_for(self, pred: Callable[[Any], bool], timeout: float, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.read()
            while self.pos < len(self.records):
                rec = self.records[self.pos]
                self.pos += 1
                if pred(rec):
                    return rec
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: no {what or 'matching line'} within {timeout} s")
            time.sleep(0.005)


def parse_json_log(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if "ts" in rec and "msg" in rec:
        rec["t"] = utc_iso_to_epoch(rec["ts"])
        return rec
    return None


SUPD_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (.*)$")


def parse_supervisord_log(line: str) -> dict | None:
    mt = SUPD_LINE.match(line)
    if not mt:
        return None
    return {"t": local_comma_to_epoch(mt.group(1)), "level": mt.group(2), "msg": mt.group(3)}


# --- optimizerd --------------------------------------------------------------------------------

class RawClient:
    """The control protocol without optimizerctl: a DEALER, a msgpack Request, a Reply."""

    def __init__(self, runtime: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect("ipc://" + os.path.join(runtime, "control.sock"))
        self.ids = iter(range(1, 1 << 62))

    def call(self, command: str, body: dict | None = None, timeout: float = 10.0) -> m.Reply:
        rid = next(self.ids)
        self.sock.send(m.encode(m.Request(id=rid, command=command, body=body or {})))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            reply = m.decode_reply(self.sock.recv())
            if reply.id == rid:
                return reply
        raise TimeoutError(f"no reply to {command} within {timeout} s")

    def status(self) -> dict:
        reply = self.call("status")
        assert reply.ok, reply.error
        return reply.result

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class Optimizerd:
    """One optimizerd in a temp dir of its own, with free ports."""

    def __init__(self, label: str, stubs: int = 0, builtins: bool = True,
                 supervisor: dict | None = None):
        self.label = label
        self.dir = REAPER.tempdir(f"optimizerd-{label}-")
        self.runtime = os.path.join(self.dir, "run")
        self.cfg = os.path.join(self.dir, "optimizerd.toml")
        self.log = os.path.join(self.dir, "optimizerd.log")
        self.notify_path = os.path.join(self.dir, "notify.sock")
        sup: dict[str, Any] = {"runtime_dir": self.runtime,
                               "data_dir": os.path.join(self.dir, "data"), **(supervisor or {})}
        if EXTRA_PRELOAD:
            from ipc.config import DEFAULT_PRELOAD
            sup["preload"] = [*DEFAULT_PRELOAD, *EXTRA_PRELOAD]
        doc: dict[str, Any] = {
            "supervisor": sup,
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
        }
        if builtins:
            doc["collector"] = {"listen": f"127.0.0.1:{free_port()}",
                                "otlp_grpc_listen": f"127.0.0.1:{free_port()}"}
            doc["rest_api"] = {"listen": f"127.0.0.1:{free_port()}"}
            doc["grpc_api"] = {"listen": f"127.0.0.1:{free_port()}"}
        else:
            for name in BUILTINS:
                doc[name] = {"enabled": False}
        if stubs:
            names = ["stub"] if stubs == 1 else [f"stub{i}" for i in range(stubs)]
            doc["services"] = {n: {"entrypoint": "workers.stub:StubWorker", "settings": {}}
                               for n in names}
        with open(self.cfg, "wb") as f:
            tomli_w.dump(doc, f)
        self.n_services = (6 if builtins else 0) + stubs
        self.proc: subprocess.Popen | None = None
        self.tail = LineTail(self.log, parse_json_log)
        self._raw: RawClient | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> float:
        """Launch and wait for READY=1; returns launch-to-READY seconds."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        listener.bind(self.notify_path)
        env = clean_env()
        env["NOTIFY_SOCKET"] = self.notify_path
        try:
            with open(self.log, "wb") as logf:
                t0 = time.monotonic()
                self.proc = REAPER.popen([OPTIMIZERD, "start", "-c", self.cfg, "--json-logs"],
                                         env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
            deadline = t0 + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.label}: no READY=1 within {timeout} s; "
                                       f"see {self.log}")
                if select.select([listener], [], [], min(left, 0.2))[0]:
                    data = listener.recv(4096)
                    t1 = time.monotonic()
                    if b"READY=1" in data.split(b"\n"):
                        break
                elif self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label}: optimizerd exited with "
                                       f"{self.proc.returncode} before READY:\n" + self.log_tail())
        finally:
            listener.close()
        REAPER.track_tree(self.pid)
        return t1 - t0

    def log_tail(self, n: int = 20) -> str:
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def all_ready_line(self) -> float | None:
        """The daemon's own 'all N services ready in X s' figure (from Daemon.__init__)."""
        self.tail.read()
        for rec in self.tail.records:
            mt = re.match(r"all \d+ services ready in ([\d.]+) s", rec["msg"])
            if mt:
                return float(mt.group(1))
        return None

    @property
    def raw(self) -> RawClient:
        if self._raw is None:
            self._raw = RawClient(self.runtime)
        return self._raw

    def service(self, name: str) -> dict:
        for s in self.raw.status()["services"]:
            if s["name"] == name:
                return s
        raise KeyError(name)

    def helpers(self) -> dict[str, int]:
        """The fork server's and the resource tracker's pids (children of the supervisor)."""
        out = {}
        for kid in psutil.Process(self.pid).children():
            cmd = " ".join(kid.cmdline())
            if "forkserver" in cmd:
                out["fork server"] = kid.pid
            elif "resource_tracker" in cmd:
                out["resource tracker"] = kid.pid
        return out

    def worker_pids(self) -> list[int]:
        return [s["pid"] for s in self.raw.status()["services"] if s["pid"]]

    def stop(self) -> tuple[float, float, dict[str, float]]:
        """`optimizerctl stop`: (command wall s, daemon pid gone s, breakdown from the log)."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        kids = [k.pid for k in REAPER.track_tree(self.pid)]
        t_ctl, t_gone, out, t0_wall = timed_ctl([OPTIMIZERCTL, "-c", self.cfg, "stop"],
                                                self.pid)
        self.proc.wait(timeout=10)
        time.sleep(0.3)
        left = [p for p in kids if REAPER.alive(p)]
        if left:
            log_line(f"  PROCESSES LEFT RUNNING after optimizerctl stop: {left}")
        self.tail.read()
        recs = self.tail.records
        begin = next((r["t"] for r in recs if r["msg"].startswith("stopping all services")), None)
        stopped = [r["t"] for r in recs if begin and r["t"] >= begin - 0.001
                   and re.match(r"\w+: \w+ -> stopped", r["msg"])]
        end = next((r["t"] for r in recs if r["msg"] == "optimizerd stopped"), None)
        breakdown = {}
        if begin:
            breakdown["request_received"] = begin - t0_wall
        if end:
            breakdown["exit_after_log"] = t_gone - (end - t0_wall)
        if begin and stopped:
            breakdown["services_stopped"] = max(stopped) - begin
        if stopped and end:
            breakdown["teardown"] = end - max(stopped)
        if "stopped" not in out:
            log_line(f"  (optimizerctl stop said: {out.strip()})")
        return t_ctl, t_gone, breakdown

    def kill(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self.proc and self.proc.poll() is None:
            REAPER.track_tree(self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


# --- the measurements of optimizerd ------------------------------------------------------------

@dataclass
class Bench:
    quick: bool
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def reps(self) -> int:
        return 2 if self.quick else 5

    def put(self, key: str, value: Any) -> Any:
        self.results[key] = value
        return value


def run_start(b: Bench, key: str, title: str, make: Callable[[], Optimizerd]) -> None:
    log_line(f"\n== {title}: launch of `optimizerd start` -> READY=1, then `optimizerctl stop` "
             f"({loadavg()})")
    starts, inner, ctl, gone, svc_stop, teardown = [], [], [], [], [], []
    received, exit_after = [], []
    for i in range(b.reps):
        d = make()
        try:
            starts.append(d.start())
            own = d.all_ready_line()
            if own is not None:
                inner.append(own)
            time.sleep(1.0)  # let it settle: first heartbeats, first resource sample
            t_ctl, t_gone, bd = d.stop()
            ctl.append(t_ctl)
            gone.append(t_gone)
            if "services_stopped" in bd:
                svc_stop.append(bd["services_stopped"])
            if "teardown" in bd:
                teardown.append(bd["teardown"])
            if "request_received" in bd:
                received.append(bd["request_received"])
            if "exit_after_log" in bd:
                exit_after.append(bd["exit_after_log"])
            log_line(f"  run {i + 1}: READY=1 after {sec(starts[-1])} (daemon's own figure "
                     f"{own} s); stop: optimizerctl {sec(t_ctl)}, pid gone {sec(t_gone)}, "
                     f"stop received {ms(bd.get('request_received'))} after the launch of "
                     f"optimizerctl, services stopped {ms(bd.get('services_stopped'))} later, "
                     f"teardown {ms(bd.get('teardown'))}, exit {ms(bd.get('exit_after_log'))}")
        finally:
            d.kill()
    log_line(f"  start-to-READY=1:               {summary(starts)}")
    log_line(f"  daemon's 'all ready in' figure:  {summary(inner)}  (from its __init__, "
             f"so without interpreter start and imports)")
    log_line(f"  stop (optimizerctl stop wall):   {summary(ctl)}")
    log_line(f"  stop (until daemon pid gone):    {summary(gone)}")
    log_line(f"  breakdown (log timestamps): optimizerctl launch -> 'stopping all services': "
             f"{summary(received, ms)}")
    log_line(f"    'stopping all' -> last service stopped: {summary(svc_stop, ms)}")
    log_line(f"    last stopped -> 'optimizerd stopped' (teardown): {summary(teardown, ms)}")
    log_line(f"    'optimizerd stopped' -> pid gone (interpreter exit): {summary(exit_after, ms)}")
    b.put(key, {"start": starts, "daemon_ready": inner, "stop_ctl": ctl, "stop_gone": gone,
                "services_stopped": svc_stop, "teardown": teardown,
                "request_received": received, "exit_after_log": exit_after})


def crash_cycle(d: Optimizerd, name: str, settle: float) -> dict[str, float]:
    """SIGKILL the READY process of ``name``; times read from the daemon's log timestamps."""
    tail = d.tail
    svc = d.service(name)
    assert svc["state"] == "ready", svc
    pid = svc["pid"]
    tail.skip()
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    def transition(text: str) -> dict:
        return tail.wait_for(lambda r: r.get("logger") == "optimizerd.supervisor"
                             and r["msg"].startswith(f"{name}: {text}"), 10, f"{name}: {text}")
    noticed = transition("ready -> backoff")
    delay = float(re.search(r"restarting in ([\d.]+) s", noticed["msg"]).group(1))
    spawned = transition("stopped -> starting")
    ready = transition("starting -> ready")
    time.sleep(settle)  # > stable_after: the next kill is again a first failure
    return {"noticed": noticed["t"] - t_kill, "backoff": delay,
            "respawn": spawned["t"] - t_kill, "ready": ready["t"] - t_kill,
            "spawn_to_ready": ready["t"] - spawned["t"]}


def crash_cycle_polled(d: Optimizerd, name: str, settle: float) -> dict[str, float]:
    """The same, timed by polling status on the raw control socket every ~1 ms."""
    svc = d.service(name)
    assert svc["state"] == "ready", svc
    pid = svc["pid"]
    noticed = None
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while True:
        s = d.service(name)
        now = time.monotonic() - t0
        if noticed is None and (s["state"] != "ready" or s["pid"] != pid):
            noticed = now
        if s["state"] == "ready" and s["pid"] not in (None, pid):
            break
        if now > 10:
            raise TimeoutError(f"{name} not replaced within 10 s")
        time.sleep(0.001)
    time.sleep(settle)
    return {"noticed": noticed, "ready": now}


def run_crash(b: Bench) -> None:
    kills = 5 if b.quick else 20
    polled = 2 if b.quick else 5
    settle = 0.3
    log_line(f"\n== crash: SIGKILL a READY worker, {kills} times per service ({loadavg()})")
    log_line("  config: max_restarts=1000, backoff_base=0.1 (default), stable_after=0.05, "
             f"kills spaced {settle} s after the previous replacement was READY, so every "
             "restart is a first failure at the default first backoff (0.1 s +-20% jitter)")
    d = Optimizerd("crash", stubs=1, supervisor={"max_restarts": 1000, "stable_after": 0.05})
    try:
        d.start()
        time.sleep(0.5)
        for name in ("collector", "stub"):
            samples = [crash_cycle(d, name, settle) for _ in range(kills)]
            cols = {k: [s[k] for s in samples] for k in samples[0]}
            log_line(f"  {name} (log timestamps, 1 ms resolution, n={kills}):")
            log_line(f"    kill -> noticed (ready -> backoff):  median "
                     f"{ms(median(cols['noticed']))}, p95 {ms(pct(cols['noticed'], 95))}, "
                     f"max {ms(max(cols['noticed']))}")
            wait = [s["respawn"] - s["noticed"] for s in samples]
            log_line(f"    backoff (noticed -> respawned):      median {ms(median(wait))}, "
                     f"min {ms(min(wait))}, max {ms(max(wait))} (planned "
                     f"{min(cols['backoff']):.2f}-{max(cols['backoff']):.2f} s)")
            log_line(f"    kill -> replacement spawned:         median "
                     f"{ms(median(cols['respawn']))}, p95 {ms(pct(cols['respawn'], 95))}")
            log_line(f"    spawn -> replacement READY:          median "
                     f"{ms(median(cols['spawn_to_ready']))}, p95 "
                     f"{ms(pct(cols['spawn_to_ready'], 95))}")
            log_line(f"    kill -> replacement READY:           median {ms(median(cols['ready']))}"
                     f", p95 {ms(pct(cols['ready'], 95))}, max {ms(max(cols['ready']))}")
            ps = [crash_cycle_polled(d, name, settle) for _ in range(polled)]
            log_line(f"    cross-check by polling raw status every ~1 ms (n={polled}): noticed "
                     f"median {ms(median([p['noticed'] for p in ps]))}, replacement READY median "
                     f"{ms(median([p['ready'] for p in ps]))}")
            b.put(f"crash_{name}", {"log": samples, "polled": ps})
    finally:
        d.kill()


def run_idle(b: Bench) -> None:
    window = 5.0 if b.quick else 30.0
    log_line(f"\n== idle: {window:g} s after READY (+3 s settling), heartbeats every 1 s")
    for key, title, make in (
            ("idle_six", "six services", lambda: Optimizerd("idle6svc")),
            ("idle_stubs6", "6 stubs", lambda: Optimizerd("idle6", stubs=6, builtins=False)),
            ("idle_stubs50", "50 stubs", lambda: Optimizerd("idle50", stubs=50, builtins=False))):
        d = make()
        try:
            d.start()
            time.sleep(3.0)
            pids = {"supervisor": d.pid, **d.helpers()}
            workers = d.worker_pids()
            log_line(f"  {title} ({loadavg()}):")
            res, groups = measure_idle(pids, window, {"workers": workers})
            for r in res.values():
                log_line("    " + r.line())
            log_line(f"    all {len(workers)} workers together: CPU {groups['workers']:.2f}% "
                     "of a core")
            b.put(key, {k: vars(v) for k, v in res.items()} | {"workers_cpu_pct":
                                                                 groups["workers"]})
        finally:
            d.kill()


def run_status(b: Bench) -> None:
    whole_n = 5 if b.quick else 20
    raw_n = 200 if b.quick else 1000
    log_line(f"\n== status: `optimizerctl status` round trip, six services ({loadavg()})")
    d = Optimizerd("status")
    try:
        d.start()
        time.sleep(1.0)
        env = clean_env()

        def timed(args: list[str], n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.monotonic()
                r = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env=env, timeout=30, check=False)
                out.append(time.monotonic() - t0)
                if r.returncode != 0:
                    raise RuntimeError(f"{args}: exit {r.returncode}: {r.stderr.decode()}")
            return out

        whole = timed([OPTIMIZERCTL, "-c", d.cfg, "status"], whole_n)
        log_line(f"  whole command ({OPTIMIZERCTL} -c CFG status): {summary(whole, ms)}, "
                 f"p95 {ms(pct(whole, 95))}")
        json_whole = timed([OPTIMIZERCTL, "--runtime-dir", d.runtime, "status", "--json"],
                           whole_n)
        log_line(f"  whole command (--runtime-dir DIR status --json): {summary(json_whole, ms)}")
        # pyenv puts its version's bin first on PATH for us, so look for its shim by name
        shim = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                            "shims", "optimizerctl")
        shim_t = []
        if os.access(shim, os.X_OK):
            shim_t = timed([shim, "-c", d.cfg, "status"], min(whole_n, 10))
            log_line(f"  through the PATH entry {shim} (a pyenv shim): {summary(shim_t, ms)}")
        base = timed([sys.executable, "-c", "pass"], 10)
        imp = timed([sys.executable, "-c", "import supervisor.ctl"], 10)
        log_line(f"  for reference: `python -c pass` {summary(base, ms)}; "
                 f"`python -c 'import supervisor.ctl'` {summary(imp, ms)}")

        raw = d.raw
        for _ in range(50):
            raw.status()  # warm-up
        lat = []
        for _ in range(raw_n):
            t0 = time.perf_counter()
            raw.status()
            lat.append(time.perf_counter() - t0)
        log_line(f"  raw socket (one DEALER, msgpack Request 'status' -> Reply, n={raw_n}): "
                 f"median {ms(median(lat))}, p99 {ms(pct(lat, 99))}, max {ms(max(lat))}")
        fresh = []
        for _ in range(raw_n // 5):
            t0 = time.perf_counter()
            c = RawClient(d.runtime)
            c.status()
            c.close()
            fresh.append(time.perf_counter() - t0)
        log_line(f"  raw socket, new context+socket per request (what optimizerctl does, "
                 f"n={len(fresh)}): median {ms(median(fresh))}, p99 {ms(pct(fresh, 99))}")
        b.put("status", {"whole": whole, "json_whole": json_whole, "shim": shim_t,
                         "python_pass": base, "import_ctl": imp, "raw": lat, "raw_fresh": fresh})
    finally:
        d.kill()


def orphan_check(label: str, daemon: subprocess.Popen, expect: int) -> dict[str, Any]:
    """SIGKILL a supervisor; are its descendants gone, and after how long?"""
    kids = REAPER.track_tree(daemon.pid)
    pids = [k.pid for k in kids]
    t0 = time.monotonic()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(timeout=10)
    gone_at = None
    alive: list[int] = []
    while time.monotonic() - t0 < 3.0:
        alive = [p for p in pids if REAPER.alive(p)]
        if not alive:
            gone_at = time.monotonic() - t0
            break
        time.sleep(0.005)
    result = {"descendants": len(pids), "left_after_3s": len(alive), "all_gone_s": gone_at}
    log_line(f"  {label}: {len(pids)} descendants (expected >= {expect}); after SIGKILL of the "
             f"supervisor: " + (f"all gone after {ms(gone_at)}" if gone_at is not None else
                                f"{len(alive)} still running after 3 s"))
    return result


def run_orphans(b: Bench) -> None:
    log_line("\n== orphans: SIGKILL the supervisor of 6 stubs")
    d = Optimizerd("orphans", stubs=6, builtins=False)
    try:
        d.start()
        time.sleep(0.5)
        b.put("orphans", orphan_check("optimizerd", d.proc, 6))
    finally:
        d.kill()


# --- supervisord and circusd -------------------------------------------------------------------

STUB_CHILD = '''\
"""Stand-in for workers.stub:StubWorker under supervisord/circusd: an asyncio loop that wakes
every 0.1 s like the stub's tick task. It imports no zmq, msgspec or prometheus_client and speaks
no supervisor protocol, so it is lighter than our stub (about 10 MiB RSS instead of 40)."""
import asyncio


async def main():
    while True:
        await asyncio.sleep(0.1)


asyncio.run(main())
'''


class Venv:
    def __init__(self, path: str | None):
        self.given = path

    def ensure(self) -> str:
        if self.given and os.path.exists(os.path.join(self.given, "bin", "supervisord")) and \
                os.path.exists(os.path.join(self.given, "bin", "circusd")):
            log_line(f"  using existing venv {self.given}")
            self.path = self.given
        else:
            self.path = self.given or os.path.join(REAPER.tempdir("venv-"), "venv")
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "venv", self.path], check=True, env=tool_env())
            subprocess.run([os.path.join(self.path, "bin", "pip"), "install", "-q",
                            "--disable-pip-version-check", "supervisor", "circus"],
                           check=True, stdout=subprocess.DEVNULL, env=tool_env())
            log_line(f"  venv with supervisor and circus at {self.path} "
                     f"({time.monotonic() - t0:.0f} s)")
        out = subprocess.run([self.bin("python"), "-c",
                              ("import importlib.metadata as md;"
                               "print(md.version('supervisor'), md.version('circus'))")],
                             capture_output=True, text=True, check=True,
                             env=tool_env()).stdout.split()
        self.versions = {"supervisor": out[0], "circus": out[1]}
        log_line(f"  supervisor {out[0]}, circus {out[1]}")
        self.stub = os.path.join(REAPER.tempdir("stubchild-"), "stub_child.py")
        with open(self.stub, "w") as f:
            f.write(STUB_CHILD)
        REAPER.markers.append(self.stub)
        return self.path

    def bin(self, name: str) -> str:
        return os.path.join(self.path, "bin", name)


def left_behind(venv: Venv) -> int:
    """After a clean stop of supervisord/circusd: how many stub children still run (killed)."""
    time.sleep(0.3)
    return len(REAPER.sweep(venv.stub))


class Supervisord:
    """supervisord -n with N [program:stubK]; timed from its own log (ms timestamps), never by
    polling it: an XML-RPC request wakes its 1 s poll loop and would flatter its latencies."""

    name = "supervisord"

    def __init__(self, venv: Venv, n: int, startsecs: int = 1):
        self.venv, self.n = venv, n
        self.dir = REAPER.tempdir(f"supervisord{n}-")
        self.conf = os.path.join(self.dir, "supervisord.conf")
        self.log = os.path.join(self.dir, "supervisord.log")
        sock = os.path.join(self.dir, "supervisor.sock")
        os.makedirs(os.path.join(self.dir, "childlogs"))
        lines = [
            "[unix_http_server]", f"file={sock}", "",
            "[supervisord]", "nodaemon=true", f"logfile={self.log}", "loglevel=info",
            f"pidfile={os.path.join(self.dir, 'supervisord.pid')}",
            f"childlogdir={os.path.join(self.dir, 'childlogs')}", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{sock}", ""]
        for i in range(n):
            lines += [f"[program:stub{i}]", f"command={venv.bin('python')} {venv.stub}",
                      "autorestart=true", f"startsecs={startsecs}", ""]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))
        self.tail = LineTail(self.log, parse_supervisord_log)
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.time()
        self.proc = REAPER.popen([self.venv.bin("supervisord"), "-n", "-c", self.conf],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=tool_env())
        running: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while len(running) < self.n:
            try:
                rec = self.tail.wait_for(lambda r: "entered RUNNING state" in r["msg"], 0.5,
                                         "RUNNING")
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"supervisord exited with {self.proc.returncode}; "
                                       f"see {self.log}") from None
                if time.monotonic() > deadline:
                    raise
                continue
            name = re.search(r"success: (\S+) entered", rec["msg"]).group(1)
            running[name] = rec["t"]
        REAPER.track_tree(self.proc.pid)
        return max(running.values()) - t0

    def child_pid(self, name: str) -> int:
        self.tail.read()
        for rec in reversed(self.tail.records):
            mt = re.match(rf"spawned: '{name}' with pid (\d+)", rec["msg"])
            if mt:
                return int(mt.group(1))
        raise KeyError(name)

    def crash_cycle(self, name: str, settle: float) -> dict[str, float]:
        pid = self.child_pid(name)
        self.tail.skip()
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        exited = self.tail.wait_for(lambda r: r["msg"].startswith(f"exited: {name} "), 10, "exit")
        spawned = self.tail.wait_for(lambda r: r["msg"].startswith(f"spawned: '{name}'"), 10,
                                     "spawn")
        ready = self.tail.wait_for(lambda r: r["msg"].startswith(f"success: {name} entered"), 10,
                                   "RUNNING")
        REAPER.track_tree(self.proc.pid)
        time.sleep(settle)
        return {"noticed": exited["t"] - t_kill, "respawn": spawned["t"] - t_kill,
                "ready": ready["t"] - t_kill}

    def ctl_status(self) -> list[str]:
        return [self.venv.bin("supervisorctl"), "-c", self.conf, "status"]

    def stop(self) -> tuple[float, float, int]:
        REAPER.track_tree(self.proc.pid)
        t_ctl, t_gone, *_ = timed_ctl([self.venv.bin("supervisorctl"), "-c", self.conf,
                                      "shutdown"], self.proc.pid, env=tool_env())
        self.proc.wait(timeout=30)
        return t_ctl, t_gone, left_behind(self.venv)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            REAPER.track_tree(self.proc.pid)
            for kid in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kid.kill()
            self.proc.kill()
            self.proc.wait(timeout=10)


class CircusClient:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def call(self, command: str, timeout: float = 5.0, **props: Any) -> dict:
        rid = uuid.uuid4().hex
        self.sock.send(json.dumps({"id": rid, "command": command,
                                   "properties": props}).encode())
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            reply = json.loads(self.sock.recv())
            if reply.get("id") == rid:
                return reply
        raise TimeoutError(f"circusd: no reply to {command}")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class Circusd:
    """circusd with N [watcher:stubK] of one process each. Its log has no milliseconds, so it is
    timed by polling its control socket every 10 ms (its own timers, not our requests, decide
    when it reaps and respawns: a periodic manage_watchers every check_delay = 1 s)."""

    name = "circusd"

    def __init__(self, venv: Venv, n: int):
        self.venv, self.n = venv, n
        self.dir = REAPER.tempdir(f"circusd{n}-")
        self.conf = os.path.join(self.dir, "circus.ini")
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        lines = ["[circus]", f"endpoint = {self.endpoint}",
                 f"pubsub_endpoint = tcp://127.0.0.1:{free_port()}",
                 # no stats_endpoint: setting one silently turns statsd (circusd-stats) on
                 "statsd = False",
                 f"logoutput = {os.path.join(self.dir, 'circus.log')}", ""]
        for i in range(n):
            lines += [f"[watcher:stub{i}]", f"cmd = {venv.bin('python')}", f"args = {venv.stub}",
                      "numprocesses = 1", ""]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))
        self.proc: subprocess.Popen | None = None
        self.client: CircusClient | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.proc = REAPER.popen([self.venv.bin("circusd"), self.conf], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=tool_env())
        self.client = CircusClient(self.endpoint)
        deadline = t0 + 60
        while time.monotonic() < deadline:
            try:
                st = self.client.call("status", timeout=0.5).get("statuses", {})
            except TimeoutError:
                st = {}
                self.client.close()  # a DEALER that timed out may hold a stale reply
                self.client = CircusClient(self.endpoint)
            if all(st.get(f"stub{i}") == "active" for i in range(self.n)):
                t1 = time.monotonic()
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"circusd exited with {self.proc.returncode}")
            time.sleep(0.01)
        else:
            raise TimeoutError("circusd: watchers not all active within 60 s")
        kids = REAPER.track_tree(self.proc.pid)
        stubs = [k for k in kids if any("stub_child" in a for a in k.cmdline())]
        if len(stubs) != self.n:
            log_line(f"  (circusd: {len(stubs)} stub processes when all watchers were active)")
        return t1 - t0

    def child_pid(self, name: str) -> int:
        pids = self.client.call("list", name=name)["pids"]
        return pids[0]

    def crash_cycle(self, name: str, settle: float) -> dict[str, float]:
        pid = self.child_pid(name)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        noticed = None
        while True:
            pids = self.client.call("list", name=name)["pids"]
            now = time.monotonic() - t0
            if noticed is None and pid not in pids:
                noticed = now
            if pids and pid not in pids:
                break
            if now > 10:
                raise TimeoutError(f"circusd did not replace {name}")
            time.sleep(0.01)
        REAPER.track_tree(self.proc.pid)
        time.sleep(settle)
        return {"noticed": noticed, "respawn": now, "ready": now}

    def ctl_status(self) -> list[str]:
        return [self.venv.bin("circusctl"), "--endpoint", self.endpoint, "status"]

    def stop(self) -> tuple[float, float, int]:
        REAPER.track_tree(self.proc.pid)
        if self.client:
            self.client.close()
            self.client = None
        t_ctl, t_gone, *_ = timed_ctl([self.venv.bin("circusctl"), "--endpoint", self.endpoint,
                                      "quit"], self.proc.pid, env=tool_env())
        self.proc.wait(timeout=30)
        return t_ctl, t_gone, left_behind(self.venv)

    def kill(self) -> None:
        if self.client:
            self.client.close()
            self.client = None
        if self.proc and self.proc.poll() is None:
            REAPER.track_tree(self.proc.pid)
            for kid in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kid.kill()
            self.proc.kill()
            self.proc.wait(timeout=10)


def run_compare(b: Bench, venv: Venv, only: str | None) -> None:
    log_line(f"\n== compare: supervisord and circusd running the same number of stub children "
             f"({loadavg()})")
    venv.ensure()
    b.put("compare_versions", venv.versions)
    reps = 1 if b.quick else 3
    kills = 3 if b.quick else 20
    window = 5.0 if b.quick else 30.0
    makers: dict[str, Callable[..., Any]] = {
        "supervisord": lambda n, **kw: Supervisord(venv, n, **kw),
        "circusd": lambda n, **kw: Circusd(venv, n)}
    want = lambda name: only is None or only == name
    for tool, make in makers.items():
        res: dict[str, Any] = {}
        log_line(f"  -- {tool}")
        for n in (6, 50):
            if not (want(f"stubs{n}") or want("stop")) or (n == 50 and only == "stop"):
                continue
            variants = [{}] if tool == "circusd" else [{"startsecs": 1}, {"startsecs": 0}]
            for kw in variants:
                starts, ctl, gone, left = [], [], [], []
                for _ in range(reps):
                    d = make(n, **kw)
                    try:
                        starts.append(d.start())
                        time.sleep(1.0)
                        t_ctl, t_gone, n_left = d.stop()
                        ctl.append(t_ctl)
                        gone.append(t_gone)
                        left.append(n_left)
                    finally:
                        d.kill()
                tag = f" startsecs={kw['startsecs']}" if kw else ""
                what = "all RUNNING (log)" if tool == "supervisord" else "all watchers active"
                log_line(f"    {n} children{tag}: start -> {what}: {summary(starts)}; stop: "
                         f"ctl {summary(ctl)}; pid gone {summary(gone)}"
                         + (f"; CHILDREN LEFT RUNNING after the stop: {left}" if any(left)
                            else ""))
                res[f"stubs{n}{tag.replace(' ', '_')}"] = {"start": starts, "stop_ctl": ctl,
                                                           "stop_gone": gone, "left": left}
        if want("crash"):
            d = make(6)
            try:
                d.start()
                time.sleep(1.5)
                # A random gap: circusd reaps and respawns from a periodic callback (every
                # check_delay, 5 s in an ini file), so a fixed gap would always hit one phase.
                period = 5.0 if tool == "circusd" else 1.0
                samples = [d.crash_cycle("stub0", 0.3 + random.uniform(0, period))
                           for _ in range(kills)]
            finally:
                d.kill()
            cols = {k: [s[k] for s in samples] for k in samples[0]}
            if tool == "supervisord":
                log_line(f"    SIGKILL of a child (log timestamps, n={kills}): noticed ('exited:')"
                         f" median {ms(median(cols['noticed']))}, respawned ('spawned:') median "
                         f"{ms(median(cols['respawn']))}, replacement RUNNING median "
                         f"{ms(median(cols['ready']))}, p95 {ms(pct(cols['ready'], 95))}, max "
                         f"{ms(max(cols['ready']))}")
            else:  # `list` drops a pid once it is a zombie: circus's own reaping is not seen
                log_line(f"    SIGKILL of a child (polling `list` every 10 ms, n={kills}): new pid "
                         f"listed after median {ms(median(cols['ready']))}, p95 "
                         f"{ms(pct(cols['ready'], 95))}, max {ms(max(cols['ready']))}")
            res["crash"] = samples
        if want("idle"):
            for n in (6, 50):
                d = make(n)
                try:
                    d.start()
                    if isinstance(d, Circusd):
                        d.client.close()  # no client connected while idle
                        d.client = None
                    time.sleep(3.0)
                    r, _ = measure_idle({tool: d.proc.pid}, window)
                    log_line(f"    idle, {n} children, {window:g} s: " + r[tool].line())
                    res[f"idle_stubs{n}"] = vars(r[tool])
                finally:
                    d.kill()
        if want("status"):
            d = make(6)
            try:
                d.start()
                time.sleep(1.0)
                times = []
                for _ in range(5 if b.quick else 20):
                    t0 = time.monotonic()
                    subprocess.run(d.ctl_status(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=tool_env(), timeout=30,
                                   check=False)
                    times.append(time.monotonic() - t0)
            finally:
                d.kill()
            ctl_name = "supervisorctl" if tool == "supervisord" else "circusctl"
            log_line(f"    `{ctl_name} status`, 6 children: {summary(times, ms)}")
            res["status_whole"] = times
        if want("orphans"):
            d = make(6)
            try:
                d.start()
                time.sleep(1.0)
                res["orphans"] = orphan_check(tool, d.proc, 6)
            finally:
                d.kill()
        b.put(f"compare_{tool}", res)


# --- summary -----------------------------------------------------------------------------------

def final_table(b: Bench) -> None:
    r = b.results
    rows: list[tuple[str, str, str, str, str]] = []

    def get(*path: Any) -> Any:
        cur: Any = r
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    def cmp_cell(tool: str, *path: Any, fn: Callable[[Any], float] = median,
                 fmt: Callable[[float], str] = sec, ours: float | None = None) -> str:
        v = get(f"compare_{tool}", *path)
        if v is None:
            return ""
        val = fn(v)
        ratio = f" (x{ours / val:.2f})" if ours is not None and val else ""
        return fmt(val) + ratio

    def row(label: str, target: str, ours: float | None, fmt: Callable[[float], str],
            sup: str = "", cir: str = "") -> None:
        if ours is None:
            return
        rows.append((label, target, fmt(ours), sup, cir))

    if get("start"):
        row("6 services start-to-READY=1 (median)", "<= 1.5 s", median(r["start"]["start"]), sec)
    for n in (6, 50):
        k = f"stubs{n}"
        if get(k):
            ours = median(r[k]["start"])
            row(f"{n} stubs start-to-READY=1 (median)", "<= 1.0 s" if n == 50 else "-", ours, sec,
                cmp_cell("supervisord", f"stubs{n}_startsecs=1", "start", ours=ours),
                cmp_cell("circusd", f"stubs{n}", "start", ours=ours))
            sup0 = cmp_cell("supervisord", f"stubs{n}_startsecs=0", "start", ours=ours)
            if sup0:
                rows.append(("  vs supervisord startsecs=0", "", "", sup0, ""))
    for name, target in (("collector", "<= 20 ms"), ("stub", "<= 20 ms")):
        c = get(f"crash_{name}", "log")
        if c:
            rows.append((f"SIGKILL -> noticed, {name} (median / p95)", target,
                         (f"{ms(median([s['noticed'] for s in c]))} / "
                          f"{ms(pct([s['noticed'] for s in c], 95))}"),
                         cmp_cell("supervisord", "crash", fn=lambda v: median(
                             [s["noticed"] for s in v]), fmt=ms) if name == "stub" else "",
                         ""))
    for name, target in (("collector", "<= 500 ms"), ("stub", "<= 150 ms")):
        c = get(f"crash_{name}", "log")
        if c:
            ready = [s["ready"] for s in c]
            ours = median(ready)
            rows.append((f"SIGKILL -> replacement READY, {name} (median / p95)", target,
                         f"{ms(ours)} / {ms(pct(ready, 95))}",
                         cmp_cell("supervisord", "crash", fn=lambda v: median(
                             [s["ready"] for s in v]), fmt=ms, ours=ours) if name == "stub"
                         else "",
                         cmp_cell("circusd", "crash", fn=lambda v: median(
                             [s["ready"] for s in v]), fmt=ms, ours=ours) if name == "stub"
                         else ""))
    if get("start"):
        row("stop-all, six services: optimizerctl stop (median)", "<= 0.5 s",
            median(r["start"]["stop_ctl"]), sec)
        row("stop-all, six services: until pid gone (median)", "<= 0.5 s",
            median(r["start"]["stop_gone"]), sec)
    if get("stubs6"):
        ours = median(r["stubs6"]["stop_gone"])
        row("stop-all, 6 stubs: until pid gone (median)", "<= 0.5 s", ours, sec,
            cmp_cell("supervisord", "stubs6_startsecs=1", "stop_gone", ours=ours),
            cmp_cell("circusd", "stubs6", "stop_gone", ours=ours))
    if get("stubs50"):
        ours = median(r["stubs50"]["stop_gone"])
        row("stop-all, 50 stubs: until pid gone (median)", "-", ours, sec,
            cmp_cell("supervisord", "stubs50_startsecs=1", "stop_gone", ours=ours),
            cmp_cell("circusd", "stubs50", "stop_gone", ours=ours))
    pctf = lambda x: f"{x:.3f}%"
    for key, label, n in (("idle_six", "six services", None), ("idle_stubs6", "6 stubs", 6),
                          ("idle_stubs50", "50 stubs", 50)):
        if get(key):
            ours = r[key]["supervisor"]["cpu_pct_sched"]
            row(f"idle CPU of supervisor, {label}", "<= 0.2%", ours, pctf,
                cmp_cell("supervisord", f"idle_stubs{n}", fn=lambda v: v["cpu_pct_sched"],
                         fmt=pctf, ours=ours) if n else "",
                cmp_cell("circusd", f"idle_stubs{n}", fn=lambda v: v["cpu_pct_sched"],
                         fmt=pctf, ours=ours) if n else "")
            fs = get(key, "fork server")
            if fs:
                row(f"idle CPU of fork server, {label}", "-", fs["cpu_pct_sched"], pctf)
            ours = r[key]["supervisor"]["rss_max"]
            row(f"RSS of supervisor, {label} (max)", "<= 50 MB", ours, mib,
                cmp_cell("supervisord", f"idle_stubs{n}", fn=lambda v: v["rss_max"], fmt=mib,
                         ours=ours) if n else "",
                cmp_cell("circusd", f"idle_stubs{n}", fn=lambda v: v["rss_max"], fmt=mib,
                         ours=ours) if n else "")
            if fs:
                row(f"RSS of fork server, {label} (max)", "-", fs["rss_max"], mib)
    if get("status"):
        ours = median(r["status"]["whole"])
        row("`optimizerctl status` whole command (median)", "<= 150 ms", ours, ms,
            cmp_cell("supervisord", "status_whole", fmt=ms, ours=ours),
            cmp_cell("circusd", "status_whole", fmt=ms, ours=ours))
        rows.append(("raw status round trip (median / p99)", "<= 1 ms",
                     f"{ms(median(r['status']['raw']))} / {ms(pct(r['status']['raw'], 99))}",
                     "", ""))
    orph = lambda o: ("none left" if o["left_after_3s"] == 0 else
                      f"{o['left_after_3s']} of {o['descendants']} left running")
    if get("orphans"):
        o = r["orphans"]
        rows.append(("SIGKILL of the supervisor: children", "none left", orph(o) + (
            f" ({ms(o['all_gone_s'])})" if o["all_gone_s"] is not None else ""),
            orph(get("compare_supervisord", "orphans")) if get("compare_supervisord", "orphans")
            else "",
            orph(get("compare_circusd", "orphans")) if get("compare_circusd", "orphans") else ""))
    rows = [x for x in rows if x[2] or x[3] or x[4]]
    header = ("measurement", "target", "optimizerd", "supervisord (ours/theirs)",
              "circusd (ours/theirs)")
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(5)]
    log_line("\n== summary")
    for x in [header, tuple("-" * w for w in widths), *rows]:
        log_line("| " + " | ".join(c.ljust(w) for c, w in zip(x, widths)) + " |")


# --- main --------------------------------------------------------------------------------------

def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({model}), {psutil.virtual_memory().total / (1 << 30):.0f} GiB"
            f", Linux {platform.release()}, Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter idle window")
    ap.add_argument("--only", choices=MEASUREMENTS, help="run one measurement")
    ap.add_argument("--compare", action="store_true",
                    help="also run supervisord and circusd (pip-installed into a temp venv)")
    ap.add_argument("--compare-venv", metavar="DIR",
                    help="venv to create or reuse for --compare (default: a temp dir, removed)")
    ap.add_argument("--json", metavar="FILE", help="write every raw figure to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs)")
    ap.add_argument("--extra-preload", metavar="MODULE", action="append", default=[],
                    help="append MODULE to supervisor.preload of every optimizerd (what-if; "
                         "e.g. supervisor.cli, see docs/benchmarks.md)")
    args = ap.parse_args()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    # SIGINT too: a shell may start us with it ignored (a background job), Ctrl-C must work
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    REAPER.keep_dirs = args.keep
    b = Bench(quick=args.quick)
    log_line(f"bench_supervisor: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {machine()}; "
             f"{loadavg()}")
    import supervisor
    src = os.path.dirname(os.path.dirname(os.path.abspath(supervisor.__file__)))
    commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    EXTRA_PRELOAD.extend(args.extra_preload)
    log_line(f"optimizerd: {OPTIMIZERD}; optimizerctl: {OPTIMIZERCTL}; code from {src}"
             + (f" (git {commit}{', modified' if dirty else ''})" if commit else "")
             + ("; --quick" if args.quick else "")
             + (f"; extra preload {EXTRA_PRELOAD}" if EXTRA_PRELOAD else ""))
    b.put("source", {"dir": src, "commit": commit, "modified": bool(dirty),
                     "extra_preload": EXTRA_PRELOAD})
    b.put("machine", machine())
    b.put("date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    only = args.only
    want = lambda name: only is None or only == name
    code = 0
    try:
        if want("start") or want("stop"):
            run_start(b, "start", "six default services", lambda: Optimizerd("six"))
        if want("stubs6") or want("stop"):
            run_start(b, "stubs6", "6 stubs",
                      lambda: Optimizerd("stubs6", stubs=6, builtins=False))
        if want("stubs50"):
            run_start(b, "stubs50", "50 stubs",
                      lambda: Optimizerd("stubs50", stubs=50, builtins=False))
        if want("crash"):
            run_crash(b)
        if want("idle"):
            run_idle(b)
        if want("status"):
            run_status(b)
        if want("orphans"):
            run_orphans(b)
        if args.compare and only != "start":
            run_compare(b, Venv(args.compare_venv), only)
        final_table(b)
    except KeyboardInterrupt as exc:
        log_line(f"\ninterrupted ({exc or 'Ctrl-C'}); cleaning up")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        REAPER.cleanup()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(b.results, f, indent=1, default=str)
    return code


if __name__ == "__main__":
    sys.exit(main())
