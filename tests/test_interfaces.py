"""The daemon's outer surfaces: sockets, sd_notify, admin HTTP and optimizerctl."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time

import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from conftest import http_get, stub, wait_until
from ipc import messages as m

pytestmark = pytest.mark.timeout(90)


# --- sockets and garbage -----------------------------------------------------------------------

GARBAGE = [[b""], [b"\xff" * 7], [os.urandom(200)], [b"\x92\x01"], [b"x"] * 9, [b"\xc1"],
           [b"", b"", b""], [b"a", b"b"], [os.urandom(2_000_000)],
           [msgspec.msgpack.encode({"type": "request", "v": 9, "id": 1, "command": "stop"})]]
# Valid messages on the wrong socket, or from a sender that is not who it claims to be.
WORKERS_ONLY = [[msgspec.msgpack.encode({"type": "ready", "v": 1, "token": "forged"})],
                [m.encode(m.Heartbeat(token="forged", seq=1, health="unhealthy"))],
                [m.encode(m.Request(id=1, command="stop"))]]
CONTROL_ONLY = [[m.encode(m.Heartbeat(token="forged", seq=1, health="unhealthy"))]]


def test_runtime_dir_and_sockets_are_private(make_daemon):
    d = make_daemon(services={"a": stub()})
    os.makedirs(d.runtime, mode=0o755)
    os.chmod(d.runtime, 0o755)  # a too-open directory left from before is tightened
    d.start()
    assert stat.S_IMODE(os.stat(d.runtime).st_mode) == 0o700
    for name in ("control.sock", "workers.sock"):
        st = os.stat(os.path.join(d.runtime, name))
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(d.data).st_mode) == 0o700
    with open(os.path.join(d.runtime, "optimizerd.pid")) as f:
        assert int(f.read()) == d.pid


def test_garbage_frames_do_not_hurt_the_daemon(make_daemon):
    d = make_daemon(services={"a": stub(), "b": stub(depends_on=["a"])}).start()
    pids = d.pids()
    ctx = zmq.Context()
    try:
        for name, extra in (("control.sock", CONTROL_ONLY), ("workers.sock", WORKERS_ONLY)):
            for frames in GARBAGE + extra:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 2000)
                s.connect(f"ipc://{d.runtime}/{name}")
                s.send_multipart(frames)
                s.close()
        # One more on each socket, then a status: sent after them on the same loop, so every
        # frame above has been read by the time it is answered.
        doc = d.wait_status(lambda doc: doc, 10)
    finally:
        ctx.term()
    assert d.running()
    assert doc["supervisor"]["ready"] and d.pids() == pids
    assert all(s["restarts"] == 0 and s["health"] == "ok" for s in doc["services"])
    wait_until(lambda: "dropped" in d.output(), 5)
    assert "Traceback" not in d.output()


def control_roundtrip(d, frames: list[bytes], kind: int = zmq.DEALER) -> m.Reply:
    ctx = zmq.Context.instance()
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(f"ipc://{d.runtime}/control.sock")
        s.send_multipart(frames)
        assert s.poll(5000), "no reply"
        return m.decode_reply(s.recv_multipart()[-1])
    finally:
        s.close()


def test_control_socket_answers_bad_requests_with_error_codes(make_daemon):
    d = make_daemon(services={"a": stub()}).start()
    reply = control_roundtrip(d, [b"\xc1garbage"])
    assert not reply.ok and reply.error.code == m.ErrorCode.BAD_REQUEST and reply.id == 0
    future = msgspec.msgpack.encode({"type": "request", "v": 2, "id": 7, "command": "status",
                                     "body": {}, "shiny": True})
    reply = control_roundtrip(d, [future])
    assert reply.error.code == m.ErrorCode.UNSUPPORTED_VERSION
    reply = control_roundtrip(d, [m.encode(m.Request(id=8, command="explode"))])
    assert (reply.id, reply.error.code) == (8, m.ErrorCode.UNKNOWN_COMMAND)
    assert "status" in reply.error.message  # lists the known ones
    for body in ({"service": "nope"}, {"service": ["a"]}, {"service": 5}):
        reply = control_roundtrip(d, [m.encode(m.Request(id=9, command="restart", body=body))])
        assert reply.error.code == m.ErrorCode.NO_SUCH_SERVICE
    reply = control_roundtrip(d, [m.encode(m.Request(id=10, command="call",
                                                     body={"service": "a", "command": 5,
                                                           "args": "notadict"}))])
    assert reply.error.code == m.ErrorCode.BAD_REQUEST and reply.id == 10
    # A REQ peer (empty delimiter frame) is served too.
    reply = control_roundtrip(d, [m.encode(m.Request(id=11, command="status"))], zmq.REQ)
    assert reply.ok and reply.id == 11 and reply.result["supervisor"]["pid"] == d.pid
    assert d.running() and d.status()["supervisor"]["ready"]


# --- sd_notify ---------------------------------------------------------------------------------

class NotifyListener:
    """A NOTIFY_SOCKET as systemd has it: AF_UNIX datagrams, sender pid from SO_PASSCRED.

    A thread reads it, so that every datagram is stamped when it arrives, not when the test
    happens to look."""

    def __init__(self, abstract: bool = False):
        self.dir = tempfile.mkdtemp(prefix="notify-", dir="/tmp")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"optd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self.dir, "notify")
            self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        # (monotonic time, sender pid, fields, wall-clock time) of every datagram
        self.messages: list[tuple[float, int | None, dict[str, str], float]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        while not self.closing.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            stamp, wall = time.monotonic(), time.time()
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self.lock:
                self.messages.append((stamp, pid, fields, wall))

    def all(self) -> list:
        with self.lock:
            return list(self.messages)

    def having(self, key: str, value: str | None = None) -> list:
        return [x for x in self.all() if key in x[2] and (value is None or x[2][key] == value)]

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify():
    listeners = []

    def make(**kw) -> NotifyListener:
        listeners.append(NotifyListener(**kw))
        return listeners[-1]
    yield make
    for n in listeners:
        n.close()


def test_sd_notify_ready_watchdog_reloading_stopping(make_daemon, notify):
    n = notify()
    usec = 1_000_000
    d = make_daemon(services={"slow": stub({"ready_delay": 1.0}), "b": stub(depends_on=["slow"])},
                    env={"NOTIFY_SOCKET": n.address, "WATCHDOG_USEC": str(usec)})
    d.start(wait_ready=False)
    # READY=1 only once every service is ready. The daemon sends it in the loop iteration that
    # sees the last READY, before it answers any later status request: a status that says
    # "ready" means the datagram is already in our buffer.
    def ready_sent():
        doc = d.status()
        sent = n.having("READY", "1")
        assert not (doc and doc["supervisor"]["ready"]) or sent, "all ready but no READY=1"
        return sent
    ready = wait_until(ready_sent, 20, message="no READY=1")[0]
    received_wall = ready[3]
    assert ready[1] == d.pid, "READY=1 must come from the main pid (NotifyAccess=main)"
    assert ready[2].get("MAINPID") == str(d.pid)
    assert "STATUS" in ready[2]
    assert all(s["state"] == "ready" for s in d.services().values())
    for name in ("slow", "b"):
        became_ready = next(h["at"] for h in d.history(name) if h["to"] == "ready")
        assert became_ready <= received_wall
    # Watchdog pings at about half of WATCHDOG_USEC, from the supervisor itself.
    wait_until(lambda: len(n.having("WATCHDOG", "1")) >= 6, 10)
    dogs = [t for t, pid, _, _ in n.having("WATCHDOG", "1") if pid == d.pid]
    gaps = [b - a for a, b in zip(dogs, dogs[1:])]
    assert len(dogs) >= 6
    assert 0.3 <= min(gaps) and max(gaps) <= 0.75, gaps
    assert all(pid == d.pid for _, pid, _, _ in n.all())
    # Workers do not inherit the notify variables.
    for pid in d.pids().values():
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
        assert b"NOTIFY_SOCKET" not in environ and b"WATCHDOG_USEC" not in environ
    # Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    count = len(n.having("READY", "1"))
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: len(n.having("READY", "1")) > count, 5, message="no READY=1 after reload")
    reloading = n.having("RELOADING", "1")
    assert len(reloading) == 1
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(reloading[0][2]["MONOTONIC_USEC"]) < 10_000_000
    order = [f for _, _, f, _ in n.all() if "RELOADING" in f or "READY" in f]
    assert "RELOADING" in order[-2] and order[-1].get("READY") == "1"
    # Stop: STOPPING=1.
    r = d.ctl("stop")
    assert r.returncode == 0
    assert d.wait_exit(10) == 0
    wait_until(lambda: n.having("STOPPING", "1"), 5, message="no STOPPING=1")


def test_sd_notify_abstract_socket_and_no_watchdog_without_usec(make_daemon, notify):
    n = notify(abstract=True)
    d = make_daemon(services={"a": stub()}, env={"NOTIFY_SOCKET": n.address}).start()
    wait_until(lambda: n.having("READY", "1"), 5)
    os.kill(d.pid, signal.SIGTERM)
    assert d.wait_exit(10) == 0
    wait_until(lambda: n.having("STOPPING", "1"), 5)
    assert not n.having("WATCHDOG")


# --- admin HTTP --------------------------------------------------------------------------------

def families(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(fams: dict, family: str, sample: str, **labels) -> float:
    found = [s.value for s in fams[family].samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def test_ready_health_and_metrics(make_daemon):
    d = make_daemon(services={"slow": stub({"ready_delay": 1.5}), "fast": stub()})
    d.start(wait_ready=False)
    first = wait_until(lambda: _try_get(d.admin_url("/ready")), 10, message="admin not up")
    assert first[0] == 503 and json.loads(first[1]) == {"ready": False}
    code, body = http_get(d.admin_url("/health"))
    assert code == 200 and json.loads(body)["status"] == "degraded"
    d.wait_ready()
    code, body = http_get(d.admin_url("/ready"))
    assert code == 200 and json.loads(body) == {"ready": True}
    code, body = http_get(d.admin_url("/health"))
    health = json.loads(body)
    assert code == 200 and health["status"] == "ok"
    assert set(health["services"]) == {"slow", "fast"}
    assert health["services"]["slow"]["state"] == "ready"
    assert health["supervisor"]["pid"] == d.pid
    # Worker series (multiprocess files) and supervisor series in one scrape.
    wait_until(lambda: _counter(d, "optimizer_stub_ticks", "fast") >= 3, 10)
    code, body = http_get(d.admin_url("/metrics"))
    assert code == 200
    fams = families(body)
    for name in ("optimizer_worker_heartbeats", "optimizer_stub_ticks"):
        assert fams[name].type == "counter"
        for svc in ("slow", "fast"):
            assert value(fams, name, name + "_total", service=svc) >= 1
    for svc in ("slow", "fast"):
        assert value(fams, "optimizerd_service_up", "optimizerd_service_up", service=svc) == 1
        assert value(fams, "optimizerd_service_state", "optimizerd_service_state",
                     service=svc, state="ready") == 1
        assert value(fams, "optimizerd_service_restarts", "optimizerd_service_restarts_total",
                     service=svc) == 0
        assert 0 <= value(fams, "optimizerd_service_heartbeat_age_seconds",
                          "optimizerd_service_heartbeat_age_seconds", service=svc) < 1.0
    assert value(fams, "optimizerd_service_start_duration_seconds",
                 "optimizerd_service_start_duration_seconds", service="slow") >= 1.4
    assert value(fams, "optimizerd_ready", "optimizerd_ready") == 1
    assert value(fams, "optimizerd_uptime_seconds", "optimizerd_uptime_seconds") > 0
    wait_until(lambda: "optimizerd_service_resident_memory_bytes" in
               families(http_get(d.admin_url("/metrics"))[1]), 5)
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                           timeout=30)
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
    code, _ = http_get(d.admin_url("/nothing-here"))
    assert code == 404


def _try_get(url: str):
    try:
        return http_get(url, timeout=1)
    except OSError:
        return None


def _counter(d, family: str, service: str) -> float:
    fams = families(http_get(d.admin_url("/metrics"))[1])
    if family not in fams:
        return 0.0
    return value(fams, family, family + "_total", service=service)


def test_worker_counters_survive_a_restart_of_the_worker(make_daemon):
    d = make_daemon(services={"a": stub()}).start()
    wait_until(lambda: _counter(d, "optimizer_worker_heartbeats", "a") >= 3, 10)
    before = _counter(d, "optimizer_worker_heartbeats", "a")
    old = d.pids()["a"]
    r = d.ctl("restart", "a")
    assert r.returncode == 0, r.stderr
    assert d.pids()["a"] != old
    assert _counter(d, "optimizer_worker_heartbeats", "a") >= before
    wait_until(lambda: _counter(d, "optimizer_worker_heartbeats", "a") > before, 5)
    fams = families(http_get(d.admin_url("/metrics"))[1])
    assert value(fams, "optimizerd_service_restarts", "optimizerd_service_restarts_total",
                 service="a") == 1


# --- optimizerctl ------------------------------------------------------------------------------

def ctl(*args: str, timeout: float = 30.0, env=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_OPTIMIZER")}
    base.update(env or {})
    return subprocess.run(["optimizerctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=base, stdin=subprocess.DEVNULL)


def test_optimizerctl_without_a_daemon_exits_1_with_a_hint(tmp_path):
    for args in (["status"], ["status", "--json"], ["reload"], ["stop"], ["restart", "a"]):
        r = ctl("--runtime-dir", str(tmp_path / "none"), *args)
        assert r.returncode == 1, (args, r.stderr)
        assert "not reachable" in r.stderr and "optimizerd start" in r.stderr
        assert str(tmp_path / "none") in r.stderr


@pytest.mark.timeout(60)
def test_optimizerctl_with_a_dead_daemons_socket_exits_1(make_daemon):
    d = make_daemon(services={"a": stub()}).start()
    os.kill(d.pid, signal.SIGKILL)
    d.wait_exit(5)
    assert os.path.exists(os.path.join(d.runtime, "control.sock"))  # stale, nobody serves it
    t = time.monotonic()
    r = d.ctl("--timeout", "1", "status")
    assert r.returncode == 1 and "no answer" in r.stderr
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("args", [["bogus"], ["status", "--bogus"], ["restart"],
                                  ["call", "a"], ["--timeout", "soon", "status"]])
def test_optimizerctl_usage_errors_exit_2(tmp_path, args):
    r = ctl("--runtime-dir", str(tmp_path), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Usage" in r.stderr or "Error" in r.stderr


def test_optimizerctl_against_a_running_daemon(make_daemon):
    d = make_daemon(services={"a": stub({"reload": "live"}), "b": stub(depends_on=["a"])},
                    builtins=["storage"]).start()
    pids = d.pids()
    # status --json: the stable keys.
    r = d.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {"pid", "state", "uptime_s", "config_hash"} <= set(doc["supervisor"])
    assert doc["supervisor"]["pid"] == d.pid and doc["supervisor"]["state"] == "running"
    assert isinstance(doc["supervisor"]["uptime_s"], float)
    assert [s["name"] for s in doc["services"]] == ["a", "storage", "b"]  # tiers, by name
    for s in doc["services"]:
        assert {"name", "state", "pid", "uptime_s", "restarts", "heartbeat_age_s", "health",
                "reason"} <= set(s)
        assert s["state"] == "ready" and isinstance(s["pid"], int) and s["restarts"] == 0
        assert s["health"] == "ok" and s["reason"] == "" and s["heartbeat_age_s"] < 1.0
    # status SERVICE --json adds history and the worker's status payload.
    r = d.ctl("status", "a", "--json")
    detail = json.loads(r.stdout)["services"]
    assert len(detail) == 1 and detail[0]["name"] == "a"
    assert [h["to"] for h in detail[0]["history"]] == ["starting", "ready"]
    # The table.
    r = d.ctl("status")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"optimizerd pid {d.pid}")
    assert lines[1].split()[:3] == ["SERVICE", "STATE", "PID"]
    assert any(line.split()[:3] == ["storage", "ready", str(pids["storage"])] for line in lines)
    r = d.ctl("status", "b")
    assert "history" in r.stdout and "stopped -> starting" in r.stdout
    # Unknown service: exit 2 naming the known ones.
    for args in (["status", "nosuch"], ["restart", "nosuch"], ["call", "nosuch", "info"]):
        r = d.ctl(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "no service 'nosuch'" in r.stderr and "storage" in r.stderr
    # Admin calls are forwarded to the worker that owns the state.
    r = d.ctl("call", "storage", "info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["service"] == "storage" and info["pid"] == pids["storage"]
    assert info["status"]["backend"] == "leveldb"
    r = d.ctl("call", "a", "info")
    assert json.loads(r.stdout)["pid"] == pids["a"]
    r = d.ctl("call", "storage", "no_such_command")
    assert r.returncode == 2 and "no admin command" in r.stderr
    r = d.ctl("call", "a", "info", "--arg", "no-equals-sign")
    assert r.returncode == 2
    # restart SERVICE: returns once it is READY again, with its new pid; nothing else moves.
    r = d.ctl("restart", "a")
    assert r.returncode == 0, r.stderr
    new = d.pids()
    assert r.stdout.strip() == f"a: ready (pid {new['a']})"
    assert new["a"] != pids["a"]
    assert new["storage"] == pids["storage"] and new["b"] == pids["b"]
    assert d.services()["a"]["restarts"] == 1
    # The runtime dir can come from the config file instead of --runtime-dir.
    r = ctl("-c", d.config_path, "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["supervisor"]["pid"] == d.pid
    r = ctl("status", "--json", env={"LLM_OPTIMIZER_CONFIG": d.config_path})
    assert r.returncode == 0 and json.loads(r.stdout)["supervisor"]["pid"] == d.pid
    r = ctl("status", env={"LLM_OPTIMIZER_CONFIG": d.config_path,
                           "LLM_OPTIMIZER__SUPERVISOR__MAX_RESTARTS": "-1"})
    assert r.returncode == 2 and "supervisor.max_restarts" in r.stderr


def test_restart_dependents_are_restarted_after_their_dependency(make_daemon):
    d = make_daemon(services={"core": stub(restart_dependents=True),
                              "user": stub(depends_on=["core"]), "loner": stub()}).start()
    pids = d.pids()
    r = d.ctl("restart", "core")
    assert r.returncode == 0, r.stderr
    doc = d.wait_status(lambda doc: d.services(doc)["user"]["pid"] not in (None, pids["user"])
                        and doc["supervisor"]["ready"], 10, "user restarted")
    svc = d.services(doc)
    assert svc["loner"]["pid"] == pids["loner"]
    user_start = [h["at"] for h in d.history("user") if h["to"] == "starting"][-1]
    core_ready = [h["at"] for h in d.history("core") if h["to"] == "ready"][-1]
    assert user_start >= core_ready
