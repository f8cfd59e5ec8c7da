"""supervisord and circusd over N stand-in children, driven like optimizerd: started, a child
SIGKILLed, stopped, killed. Both come from PyPI into a venv of their own."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from benchsup.dealer import DealerClient
from benchsup.env import free_port, tool_env
from benchsup.figures import log_line
from benchsup.logs import LineTail, parse_supervisord_log
from benchsup.processes import REAPER, timed_ctl

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


class OtherDaemon:
    """What supervisord and circusd share: a config of N children, a process, a clean stop by
    their control command after which stub children must be gone."""

    name = ""
    ctl_name = ""

    def __init__(self, venv: Venv, n: int):
        self.venv, self.n = venv, n
        self.dir = REAPER.tempdir(f"{self.name}{n}-")
        self.proc: subprocess.Popen | None = None

    def write_conf(self, filename: str, lines: list[str]) -> str:
        path = os.path.join(self.dir, filename)
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    def ctl(self, *args: str) -> list[str]:
        raise NotImplementedError

    def ctl_status(self) -> list[str]:
        return self.ctl("status")

    def stop_with(self, command: str) -> tuple[float, float, int]:
        """(control command wall s, daemon gone s, stub children still running after it)."""
        REAPER.track_tree(self.proc.pid)
        t_ctl, t_gone, *_ = timed_ctl(self.ctl(command), self.proc.pid, env=tool_env())
        self.proc.wait(timeout=30)
        time.sleep(0.3)
        return t_ctl, t_gone, len(REAPER.sweep(self.venv.stub))  # left behind, now killed

    def kill(self) -> None:
        REAPER.kill_tree(self.proc)


class Supervisord(OtherDaemon):
    """supervisord -n with N [program:stubK]; timed from its own log (ms timestamps), never by
    polling it: an XML-RPC request wakes its 1 s poll loop and would flatter its latencies."""

    name = "supervisord"
    ctl_name = "supervisorctl"

    def __init__(self, venv: Venv, n: int, startsecs: int = 1):
        super().__init__(venv, n)
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
        self.conf = self.write_conf("supervisord.conf", lines)
        self.tail = LineTail(self.log, parse_supervisord_log)

    def ctl(self, *args: str) -> list[str]:
        return [self.venv.bin("supervisorctl"), "-c", self.conf, *args]

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

    def stop(self) -> tuple[float, float, int]:
        return self.stop_with("shutdown")


class CircusClient(DealerClient):
    def call(self, command: str, timeout: float = 5.0, **props: Any) -> dict:
        rid = uuid.uuid4().hex

        def answer(data: bytes) -> dict | None:
            reply = json.loads(data)
            return reply if reply.get("id") == rid else None
        return self.round_trip(json.dumps({"id": rid, "command": command,
                                           "properties": props}).encode(),
                               answer, timeout, f"circusd: no reply to {command}")


class Circusd(OtherDaemon):
    """circusd with N [watcher:stubK] of one process each. Its log has no milliseconds, so it is
    timed by polling its control socket every 10 ms (its own timers, not our requests, decide
    when it reaps and respawns: a periodic manage_watchers every check_delay = 1 s)."""

    name = "circusd"
    ctl_name = "circusctl"

    def __init__(self, venv: Venv, n: int):
        super().__init__(venv, n)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        lines = ["[circus]", f"endpoint = {self.endpoint}",
                 f"pubsub_endpoint = tcp://127.0.0.1:{free_port()}",
                 # no stats_endpoint: setting one silently turns statsd (circusd-stats) on
                 "statsd = False",
                 f"logoutput = {os.path.join(self.dir, 'circus.log')}", ""]
        for i in range(n):
            lines += [f"[watcher:stub{i}]", f"cmd = {venv.bin('python')}", f"args = {venv.stub}",
                      "numprocesses = 1", ""]
        self.conf = self.write_conf("circus.ini", lines)
        self.client: CircusClient | None = None

    def ctl(self, *args: str) -> list[str]:
        return [self.venv.bin("circusctl"), "--endpoint", self.endpoint, *args]

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

    def close_client(self) -> None:
        if self.client:
            self.client.close()
            self.client = None

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

    def stop(self) -> tuple[float, float, int]:
        REAPER.track_tree(self.proc.pid)
        self.close_client()
        return self.stop_with("quit")

    def kill(self) -> None:
        self.close_client()
        super().kill()
