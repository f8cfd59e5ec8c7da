"""One optimizerd in a directory of its own, with free ports: started until READY=1, asked over
its raw control socket, stopped with `optimizerctl stop`, or killed."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from typing import Any

import psutil
import tomli_w

from benchsup.dealer import DealerClient
from benchsup.env import OPTIMIZERCTL, OPTIMIZERD, clean_env, free_port
from benchsup.figures import log_line
from benchsup.logs import LineTail, parse_json_log
from benchsup.notify import NotifyListener
from benchsup.processes import REAPER, timed_ctl
from ipc import messages as m

BUILTINS = ("storage", "collector", "processor", "rest_api", "grpc_api", "integrations")


class RawClient(DealerClient):
    """The control protocol without optimizerctl: a DEALER, a msgpack Request, a Reply."""

    def __init__(self, runtime: str):
        super().__init__("ipc://" + os.path.join(runtime, "control.sock"))
        self.ids = iter(range(1, 1 << 62))

    def call(self, command: str, body: dict | None = None, timeout: float = 10.0) -> m.Reply:
        rid = next(self.ids)

        def answer(data: bytes) -> m.Reply | None:
            reply = m.decode_reply(data)
            return reply if reply.id == rid else None
        return self.round_trip(m.encode(m.Request(id=rid, command=command, body=body or {})),
                               answer, timeout, f"no reply to {command} within {timeout} s")

    def status(self) -> dict:
        reply = self.call("status")
        assert reply.ok, reply.error
        return reply.result


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
        doc: dict[str, Any] = {
            "supervisor": {"runtime_dir": self.runtime,
                           "data_dir": os.path.join(self.dir, "data"), **(supervisor or {})},
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
        with NotifyListener(self.notify_path) as notify:
            env = clean_env()
            env["NOTIFY_SOCKET"] = notify.path
            with open(self.log, "wb") as logf:
                t0 = time.monotonic()
                self.proc = REAPER.popen([OPTIMIZERD, "start", "-c", self.cfg, "--json-logs"],
                                         env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=self.dir)
            t1 = notify.wait_ready(t0 + timeout, lambda: self.proc.poll() is not None)
        if t1 is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: optimizerd exited with "
                                   f"{self.proc.returncode} before READY:\n" + self.log_tail())
            raise TimeoutError(f"{self.label}: no READY=1 within {timeout} s; see {self.log}")
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

    def close_raw(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

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
        self.close_raw()
        kids = [k.pid for k in REAPER.track_tree(self.pid)]
        t_ctl, t_gone, out, t0_wall = timed_ctl([OPTIMIZERCTL, "-c", self.cfg, "stop"],
                                                self.pid)
        self.proc.wait(timeout=10)
        time.sleep(0.3)
        left = [p for p in kids if REAPER.alive(p)]
        if left:
            log_line(f"  PROCESSES LEFT RUNNING after optimizerctl stop: {left}")
        if "stopped" not in out:
            log_line(f"  (optimizerctl stop said: {out.strip()})")
        return t_ctl, t_gone, self.stop_breakdown(t0_wall, t_gone)

    def stop_breakdown(self, t0_wall: float, t_gone: float) -> dict[str, float]:
        """The stop's parts from the log's timestamps, ``t0_wall`` the launch of optimizerctl."""
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
        return breakdown

    def kill(self) -> None:
        self.close_raw()
        if self.proc and self.proc.poll() is None:
            REAPER.track_tree(self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
