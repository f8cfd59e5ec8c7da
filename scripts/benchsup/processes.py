"""Everything the benchmark starts is tracked by pid and killed at the end; timing a command,
the stop of a daemon, and what is left after a supervisor is SIGKILLed."""
from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import psutil

from benchsup.env import clean_env
from benchsup.figures import log_line, ms


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

    def kill_tree(self, proc: subprocess.Popen | None) -> None:
        """SIGKILL a still running daemon and every descendant it has now."""
        if proc and proc.poll() is None:
            for kid in self.track_tree(proc.pid):
                with contextlib.suppress(psutil.Error):
                    kid.kill()
            proc.kill()
            proc.wait(timeout=10)

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


def time_command(args: list[str], n: int, env: dict[str, str], check: bool = True
                 ) -> list[float]:
    """Wall time of ``n`` runs of a command, one after the other; with ``check`` a failing
    run is an error."""
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        r = subprocess.run(args, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE if check else subprocess.DEVNULL,
                           env=env, timeout=30, check=False)
        out.append(time.monotonic() - t0)
        if check and r.returncode != 0:
            raise RuntimeError(f"{args}: exit {r.returncode}: {r.stderr.decode()}")
    return out


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
