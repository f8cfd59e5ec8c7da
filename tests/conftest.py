"""Fixtures for the supervisor's tests: a real optimizerd in a temp dir, on free ports.

``make_daemon(...)`` writes a TOML config (runtime_dir and data_dir under a fresh temp dir, the
admin port and the built-in services' ports free ones), and ``Daemon.start()`` runs
``optimizerd start -c FILE`` in a new session. At teardown every process of that session is
SIGKILLed, together with every pid the test saw in a status reply and every descendant found
through /proc, so that no test leaves a process behind even when it fails half-way.

Waiting is always ``wait_until(predicate, timeout)``: poll a condition until a deadline.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

TESTS_DIR = Path(__file__).resolve().parent
HELPERS_DIR = TESTS_DIR / "helpers"
BUILTIN_SERVICES = ("storage", "collector", "processor", "rest_api", "grpc_api", "integrations")
STUB = "workers.stub:StubWorker"
PROBE = "probe_worker:ProbeWorker"  # tests/helpers/probe_worker.py: a stub that can print/grow
# Only what stub workers need: a fork server that imports aiohttp and grpc costs ~1 s per daemon.
FAST_PRELOAD = ["zmq", "msgspec", "prometheus_client", "workers.runtime", "workers.stub"]


# --- waiting -----------------------------------------------------------------------------------

class Timeout(AssertionError):
    pass


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
               message: str | Callable[[], str] = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise Timeout(f"condition not met within {timeout:g} s"
                          + (f": {text}" if text else ""))
        time.sleep(interval)


def stays_true(predicate: Callable[[], Any], duration: float, interval: float = 0.1,
               message: str | Callable[[], str] = "") -> None:
    """Poll ``predicate`` for ``duration`` seconds; fail as soon as it is falsy."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not predicate():
            text = message() if callable(message) else message
            raise AssertionError("condition stopped holding" + (f": {text}" if text else ""))
        time.sleep(interval)


# --- processes through /proc -------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, int, int]:
    """(state letter, parent pid, session id); raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return rest[0], int(rest[1]), int(rest[3])


def alive(pid: int | None) -> bool:
    """True while pid exists and is not a zombie (PID 1 here may never reap)."""
    if not pid:
        return False
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(ancestor: int) -> list[int]:
    """Live processes whose chain of parents reaches ``ancestor``."""
    parents: dict[int, int] = {}
    for pid in all_pids():
        try:
            state, ppid, _ = proc_stat(pid)
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z":
            parents[pid] = ppid
    found = []
    for pid in parents:
        p, hops = parents.get(pid), 0
        while p and hops < 16:
            if p == ancestor:
                found.append(pid)
                break
            p, hops = parents.get(p), hops + 1
    return found


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``: what a daemon started with start_new_session made,
    even after they were re-parented."""
    found = []
    for pid in all_pids():
        try:
            state, _, session = proc_stat(pid)
        except (OSError, ValueError, IndexError):
            continue
        if session == sid and state != "Z":
            found.append(pid)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body), without raising on 4xx/5xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_events(url: str, events: list[dict[str, Any]]) -> None:
    """POST a JSON batch to the collector's ``/v1/events`` at ``url``; every event accepted."""
    request = urllib.request.Request(url, method="POST",
                                     data=json.dumps({"events": events}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["accepted"] == len(events)


@pytest.fixture(scope="module")
def redis_url():
    """A throwaway redis-server on a free port, for the module; missing: a skip, or a failure
    with CI=true."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    import redis

    workdir = tempfile.mkdtemp(prefix="redis-")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port).ping())
        except redis.RedisError:
            return False
    try:
        wait_until(answers, 10, message="redis-server did not answer")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A librdkafka mock cluster (tests/storage/kafka_support.py) per test module, always
    killed at its end."""
    from tests.storage.kafka_support import MockCluster

    mock = MockCluster.start()
    try:
        yield mock
    finally:
        mock.stop()


# --- the daemon --------------------------------------------------------------------------------

def stub(settings: dict[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """A [services.NAME] table for the stub worker."""
    table: dict[str, Any] = {"entrypoint": STUB}
    if settings:
        table["settings"] = settings
    table.update(keys)
    return table


class Daemon:
    """One optimizerd with its own temp dir, config file and log file."""

    def __init__(self, services: dict[str, dict[str, Any]] | None = None,
                 supervisor: dict[str, Any] | None = None, builtins: bool | list[str] = False,
                 extra: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 suffix: str = ".toml"):
        # Short paths: an ipc:// socket path must fit in 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="optd-", dir="/tmp"))
        self.runtime = str(self.dir / "run")
        self.data = str(self.dir / "data")
        self.admin_port = free_port()
        self.config_path = str(self.dir / f"optimizer{suffix}")
        self.log_path = str(self.dir / "daemon.log")
        sup = {"runtime_dir": self.runtime, "data_dir": self.data,
               # 2 s: a loaded 2-core CI machine can hold a busy worker's loop past 1 s
               "heartbeat_interval": 0.2, "heartbeat_timeout": 2.0,
               "shutdown_timeout": 2.0, "start_timeout": 15.0}
        enabled = list(BUILTIN_SERVICES) if builtins is True else list(builtins or [])
        if not any(s in enabled for s in ("collector", "processor", "rest_api", "grpc_api")):
            sup["preload"] = list(FAST_PRELOAD)
        sup.update(supervisor or {})
        doc: dict[str, Any] = {"supervisor": sup,
                               "admin": {"listen": f"127.0.0.1:{self.admin_port}"}}
        for name in BUILTIN_SERVICES:
            doc[name] = {} if name in enabled else {"enabled": False}
        for name in ("rest_api", "grpc_api", "collector"):
            doc[name]["listen"] = f"127.0.0.1:{free_port()}"
        doc["collector"]["otlp_grpc_listen"] = f"127.0.0.1:{free_port()}"
        if services:
            doc["services"] = copy.deepcopy(services)
        for key, value in (extra or {}).items():
            doc.setdefault(key, {}).update(value)
        self.doc = doc
        self.write_config()
        self.env = dict(os.environ)
        for var in list(self.env):  # a test's environment must not leak into the daemon
            if var.startswith("LLM_OPTIMIZER") or var in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                          "WATCHDOG_PID"):
                del self.env[var]
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(HELPERS_DIR), self.env.get("PYTHONPATH", "")) if p)
        # The daemon's temporary files (its fork server's socket directory) go where cleanup
        # removes them: the SIGKILL of a teardown would leave them in /tmp.
        (self.dir / "tmp").mkdir()
        self.env["TMPDIR"] = str(self.dir / "tmp")
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_file = None
        self.seen: set[int] = set()
        self.client = None

    # --- config ---------------------------------------------------------------------------

    def write_config(self, doc: dict[str, Any] | None = None, text: str | None = None) -> None:
        """Write ``doc`` (default: self.doc) or raw ``text`` to the config file atomically."""
        if text is None:
            doc = self.doc if doc is None else doc
            if self.config_path.endswith((".yaml", ".yml")):
                import yaml
                text = yaml.safe_dump(doc)
            else:
                text = tomli_w.dumps(doc)
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    # --- running --------------------------------------------------------------------------

    def start(self, *args: str, wait_ready: bool = True, timeout: float = 30.0,
              use_file: bool = True) -> Daemon:
        """Run optimizerd; ``use_file=False`` runs it on defaults plus self.env alone."""
        self.log_file = open(self.log_path, "ab")
        config = ["-c", self.config_path] if use_file else []
        self.proc = subprocess.Popen(["optimizerd", "start", *config, *args],
                                     env=self.env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run optimizerctl against this daemon."""
        return subprocess.run(["optimizerctl", "--runtime-dir", self.runtime, *args],
                              env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def request(self, command: str, body: dict[str, Any] | None = None,
                timeout: float = 5.0):
        """One control request in-process (the code optimizerctl uses, minus the CLI), so that
        polling costs milliseconds instead of an interpreter start."""
        from supervisor.ctl import Client
        if self.client is None:
            self.client = Client(self.runtime, timeout)
        return self.client.call(command, body, timeout)

    def status(self, service: str | None = None) -> dict[str, Any] | None:
        """The status document, or None while the daemon does not answer."""
        from supervisor.ctl import Unreachable
        try:
            reply = self.request("status", {"service": service} if service else None)
        except Unreachable:
            return None
        if not reply.ok:
            return None
        doc = reply.result
        self.seen.update(s["pid"] for s in doc["services"] if isinstance(s.get("pid"), int))
        return doc

    def services(self, doc: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """name (name#i for instances > 0) -> service entry of a status document."""
        doc = doc or self.status() or {"services": []}
        return {s["name"] if s["instance"] == 0 else f"{s['name']}#{s['instance']}": s
                for s in doc["services"]}

    def service(self, name: str, instance: int = 0) -> dict[str, Any]:
        """Detailed status (with history) of one instance."""
        doc = self.status(name)
        assert doc is not None, "daemon did not answer"
        return next(s for s in doc["services"] if s["instance"] == instance)

    def history(self, name: str, instance: int = 0) -> list[dict[str, Any]]:
        return self.service(name, instance)["history"]

    def pids(self) -> dict[str, int | None]:
        return {k: s["pid"] for k, s in self.services().items()}

    def wait_status(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = 15.0,
                    what: str = "") -> dict[str, Any]:
        """Poll status until predicate(doc) is truthy; fail at once if the daemon died."""
        last: dict[str, Any] = {}

        def check() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"optimizerd exited with {self.proc.returncode} while "
                                     f"waiting for {what or 'a condition'}:\n{self.tail()}")
            doc = self.status()
            if doc is None:
                return None
            last["doc"] = doc
            return doc if predicate(doc) else None

        return wait_until(check, timeout, message=lambda: f"{what}; last status: "
                          f"{json.dumps(last.get('doc'))[:3000]}\n{self.tail()}")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(lambda d: d["supervisor"]["ready"], timeout, "all ready")

    def wait_service(self, name: str, predicate: Callable[[dict[str, Any]], Any],
                     timeout: float = 15.0, instance: int = 0, what: str = "") -> dict[str, Any]:
        def check(doc: dict[str, Any]) -> Any:
            s = [s for s in doc["services"] if s["name"] == name and s["instance"] == instance]
            return s and predicate(s[0])
        doc = self.wait_status(check, timeout, what or f"{name}#{instance}")
        return next(s for s in doc["services"] if s["name"] == name and s["instance"] == instance)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"optimizerd still running {timeout:g} s later:\n"
                                 f"{self.tail()}") from None

    def process_tree(self) -> list[int]:
        """Every live process this daemon made (children, grandchildren), as of now."""
        return sorted(set(descendants(self.pid)) | set(session_members(self.pid)) - {self.pid})

    # --- output ---------------------------------------------------------------------------

    def output(self) -> str:
        if self.log_file:
            self.log_file.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tail(self, chars: int = 4000) -> str:
        return "--- optimizerd output (tail) ---\n" + self.output()[-chars:]

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    # --- teardown -------------------------------------------------------------------------

    def cleanup(self) -> None:
        """SIGKILL everything this daemon made: its session, its descendants, every pid seen."""
        victims: set[int] = set(self.seen)
        if self.proc is not None:
            victims |= set(descendants(self.pid)) | set(session_members(self.pid))
            if self.proc.poll() is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            victims |= set(session_members(self.pid))
        for pid in victims:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.log_file:
            self.log_file.close()
        if self.client is not None:
            self.client = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def make_daemon(request):
    """Factory of Daemons; every one is torn down (all its processes killed) after the test."""
    made: list[Daemon] = []

    def make(**kwargs: Any) -> Daemon:
        d = Daemon(**kwargs)
        made.append(d)
        return d

    yield make
    failed = getattr(request.node, "rep_call", None)
    for d in made:
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n{d.tail(6000)}\n")
        d.cleanup()


@pytest.fixture
def no_process_left():
    """Asserts nothing of ours is left: call with the pids a test collected."""
    def check(pids: list[int], timeout: float = 5.0) -> None:
        wait_until(lambda: not [p for p in pids if alive(p)], timeout,
                   message=lambda: "still alive: " + ", ".join(
                       f"{p} ({cmdline(p)})" for p in pids if alive(p)))
    return check
