"""Start, stop and process hygiene of a real optimizerd with stub services."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import PROBE, alive, cmdline, descendants, stub, wait_until

pytestmark = pytest.mark.timeout(90)


def history_time(history, old, new, nth=0):
    """Wall-clock time of the nth transition old -> new in a service's history."""
    stamps = [h["at"] for h in history if h["from"] == old and h["to"] == new]
    assert len(stamps) > nth, f"no {old} -> {new} (#{nth}) in {history}"
    return stamps[nth]


# --- dependency order and readiness gating -----------------------------------------------------

def test_dependents_start_only_after_their_dependencies_are_ready(make_daemon):
    d = make_daemon(services={
        "c": stub(depends_on=["b"]),
        "b": stub(depends_on=["a"]),
        "a": stub({"ready_delay": 0.5}),
    }).start()
    hist = {n: d.history(n) for n in "abc"}
    a_start = history_time(hist["a"], "stopped", "starting")
    a_ready = history_time(hist["a"], "starting", "ready")
    b_start = history_time(hist["b"], "stopped", "starting")
    b_ready = history_time(hist["b"], "starting", "ready")
    c_start = history_time(hist["c"], "stopped", "starting")
    assert a_ready - a_start >= 0.45, "a said READY before its ready_delay"
    assert b_start >= a_ready, "b was started before a was READY (forked is not enough)"
    assert c_start >= b_ready, "c was started before b was READY"
    doc = d.status()
    assert [s["name"] for s in doc["services"]] == ["a", "b", "c"]  # listed in start order
    assert doc["services"][0]["start_duration_s"] >= 0.45


def test_services_wait_while_a_dependency_is_not_ready(make_daemon):
    """A dependency that never gets READY holds its dependents back; independents run."""
    d = make_daemon(services={
        "slow": stub({"ready_delay": 3.0}),
        "needs_slow": stub(depends_on=["slow"]),
        "free": stub(),
    }).start(wait_ready=False)
    d.wait_service("free", lambda s: s["state"] == "ready", what="free ready")
    doc = d.status()
    svc = d.services(doc)
    assert svc["slow"]["state"] == "starting"
    assert svc["needs_slow"]["state"] == "stopped" and svc["needs_slow"]["pid"] is None
    assert not doc["supervisor"]["ready"]
    d.wait_ready(15)


@pytest.mark.timeout(60)
def test_a_dependency_cycle_stops_start_and_check_config_with_exit_2(make_daemon):
    d = make_daemon(services={"x": stub(depends_on=["z"]), "y": stub(depends_on=["x"]),
                              "z": stub(depends_on=["y"]), "ok": stub()})
    d.start(wait_ready=False)
    code = d.wait_exit(30)
    assert code == 2
    out = d.output()
    assert "dependency cycle" in out
    cycle = re.search(r"dependency cycle: ([a-z_ >-]+)", out).group(1).strip().split(" -> ")
    assert set(cycle) == {"x", "y", "z"} and cycle[0] == cycle[-1]
    assert not os.path.exists(os.path.join(d.runtime, "control.sock"))
    r = subprocess.run(["optimizerd", "check-config", "-c", d.config_path], env=d.env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "dependency cycle" in r.stderr and " -> ".join(cycle) in r.stderr


# --- graceful stop -----------------------------------------------------------------------------

def test_stop_goes_in_reverse_dependency_order_and_leaves_nothing(make_daemon,
                                                                  no_process_left):
    d = make_daemon(services={"a": stub(), "b": stub(depends_on=["a"]),
                              "c": stub(depends_on=["b"]), "lone": stub()}).start()
    pids = d.pids()
    tree = d.process_tree()
    assert set(pids.values()) <= set(tree)
    assert len(tree) >= len(pids) + 1  # the fork server too
    r = d.ctl("stop")
    assert r.returncode == 0, r.stderr
    assert "stopped" in r.stdout
    assert not d.running() or d.wait_exit(5) == 0  # stop returns once the daemon has exited
    assert d.wait_exit(5) == 0
    no_process_left(tree + [d.pid])
    out = d.output()

    def line_of(pattern: str) -> int:
        for i, line in enumerate(out.splitlines()):
            if re.search(pattern, line):
                return i
        raise AssertionError(f"no line matching {pattern!r} in\n{out}")

    assert line_of(r"\bc: stopping -> stopped") < line_of(r"\bb: ready -> stopping")
    assert line_of(r"\bb: stopping -> stopped") < line_of(r"\ba: ready -> stopping")
    for name in "abc":
        assert line_of(rf"\b{name}: ready -> stopping") < line_of(r"optimizerd stopped")
    for sock in ("control.sock", "workers.sock", "optimizerd.pid"):
        assert not os.path.exists(os.path.join(d.runtime, sock))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly_with_exit_0(make_daemon, no_process_left, sig):
    d = make_daemon(services={"a": stub(), "b": stub(depends_on=["a"])}).start()
    tree = d.process_tree()
    os.kill(d.pid, sig)
    assert d.wait_exit(20) == 0
    no_process_left(tree)
    assert signal.Signals(sig).name in d.output()


@pytest.mark.timeout(60)
def test_a_worker_that_ignores_stop_is_escalated_after_shutdown_timeout(make_daemon,
                                                                        no_process_left):
    d = make_daemon(services={"stubborn": stub({"ignore_stop": True}), "fine": stub()},
                    supervisor={"shutdown_timeout": 1.0}).start()
    tree = d.process_tree()
    t = time.monotonic()
    r = d.ctl("stop", timeout=30)
    assert r.returncode == 0, r.stderr
    assert d.wait_exit(10) == 0
    took = time.monotonic() - t
    assert 1.0 <= took < 1.0 + 2.0 + 2.0, took  # shutdown_timeout, at most SIGKILL's grace
    no_process_left(tree)
    out = d.output()
    start = out.index("stopping all services")
    stopped = re.search(r"stubborn: stopping -> stopped \((.*)\)", out[start:])
    assert stopped, out
    # Either the supervisor's SIGTERM at the deadline or the worker's own deadline ended it.
    assert ("stubborn: still running, sending SIGTERM" in out
            or "stop did not finish within" in out), out


@pytest.mark.timeout(60)
def test_a_frozen_worker_is_sigkilled_at_stop_and_the_daemon_still_exits(make_daemon,
                                                                         no_process_left):
    """SIGSTOPped: neither STOP nor SIGTERM can work, only SIGKILL does."""
    d = make_daemon(services={"frozen": stub(), "fine": stub()},
                    supervisor={"shutdown_timeout": 1.0, "heartbeat_timeout": 30.0}).start()
    tree = d.process_tree()
    frozen = d.pids()["frozen"]
    os.kill(frozen, signal.SIGSTOP)
    r = d.ctl("stop", timeout=30)
    assert r.returncode == 0, r.stderr
    assert d.wait_exit(10) == 0
    no_process_left(tree)
    out = d.output()
    assert "frozen: still running, sending SIGTERM" in out
    assert "frozen: still running, sending SIGKILL" in out
    assert "frozen: stopping -> stopped (killed by SIGKILL)" in out


# --- no orphans --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_sigkill_of_the_supervisor_leaves_no_orphan(make_daemon, no_process_left):
    """Even a worker whose event loop is blocked (it cannot notice anything) and a frozen one
    die: the kernel kills them when the fork server goes (PR_SET_PDEATHSIG)."""
    d = make_daemon(services={"a": stub(), "b": stub(depends_on=["a"]),
                              "pair": stub(processes=2),
                              "wedged": stub({"hang_after": 0.3}, heartbeat_timeout=60.0),
                              "frozen": stub(heartbeat_timeout=60.0)}).start()
    wait_until(lambda: "hang_after reached" in d.output(), 5)
    os.kill(d.pids()["frozen"], signal.SIGSTOP)
    tree = d.process_tree()
    workers = [p for p in d.pids().values() if p]
    assert len(workers) == 6 and set(workers) <= set(tree)
    assert all(cmdline(p).startswith("optimizerd: ") for p in workers)
    os.kill(d.pid, signal.SIGKILL)
    d.wait_exit(5)
    no_process_left(tree, timeout=5.0)


# --- several processes of one service ----------------------------------------------------------

def test_processes_2_are_supervised_one_by_one(make_daemon):
    d = make_daemon(services={"pair": stub(processes=2), "other": stub()}).start()
    svc = d.services()
    first, second = svc["pair"], svc["pair#1"]
    assert (first["instance"], second["instance"]) == (0, 1)
    assert first["pid"] != second["pid"] and first["state"] == second["state"] == "ready"
    assert cmdline(first["pid"]) == "optimizerd: pair#0"
    assert cmdline(second["pid"]) == "optimizerd: pair#1"
    os.kill(second["pid"], signal.SIGKILL)
    after = d.wait_service("pair", lambda s: s["pid"] not in (None, second["pid"])
                           and s["state"] == "ready", instance=1, what="pair#1 replaced")
    assert after["restarts"] == 1
    svc = d.services()
    assert svc["pair"]["pid"] == first["pid"] and svc["pair"]["restarts"] == 0
    assert svc["other"]["pid"] == d.pids()["other"] and svc["other"]["restarts"] == 0
    wait_until(lambda: not alive(second["pid"]), 5)
    detail = d.service("pair", instance=1)
    assert "killed by SIGKILL" in detail["last_exit"]


# --- output of the children --------------------------------------------------------------------

def test_worker_output_is_captured_with_service_name_and_pid(make_daemon):
    d = make_daemon(services={"probe": {"entrypoint": PROBE}, "plain": stub()}).start()
    pid = d.pids()["probe"]
    wait_until(lambda: f"probe says hello from {pid}" in d.output(), 10)
    out = d.output().splitlines()
    hello = next(line for line in out if f"probe says hello from {pid}" in line)
    assert f"probe[{pid}]" in hello and "stream=stdout" in hello
    complaint = next(line for line in out if f"probe complains on stderr from {pid}" in line)
    assert f"probe[{pid}]" in complaint and "stream=stderr" in complaint
    assert "WARNING" in complaint  # raw stderr output is a warning
    r = d.ctl("call", "probe", "print", "--arg", "text=said through admin")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "said through admin" in d.output(), 10)
    plain = d.pids()["plain"]
    d.ctl("stop")
    d.wait_exit(10)
    # The worker runtime's own JSON log line, re-emitted by the supervisor as text.
    assert re.search(rf"INFO +plain\[{plain}\] stopping \(STOP from supervisor\)", d.output())


def test_json_logs_gives_one_object_per_line(make_daemon):
    d = make_daemon(services={"probe": {"entrypoint": PROBE},
                              "crashy": stub({"exit_after": 0.2, "exit_code": 3},
                                             backoff_base=5.0)})
    d.start("--json-logs")
    pid = d.pids()["probe"]
    wait_until(lambda: "exit_after reached" in d.output()
               and f"probe says hello from {pid}" in d.output(), 10)
    d.ctl("stop")
    assert d.wait_exit(10) == 0
    lines = [line for line in d.output().splitlines() if line.strip()]
    assert len(lines) > 10
    docs = []
    for line in lines:
        doc = json.loads(line)  # every line, supervisor's and workers' alike
        assert {"ts", "level", "service", "pid", "msg"} <= set(doc), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
        assert doc["level"] in ("debug", "info", "warning", "error")
        docs.append(doc)
    assert any(x["service"] == "supervisor" and x["pid"] == d.pid for x in docs)
    hello = next(x for x in docs if x["msg"] == f"probe says hello from {pid}")
    assert hello["service"] == "probe" and hello["pid"] == pid
    crash = next(x for x in docs if "exit_after reached" in x["msg"])
    assert crash["service"] == "crashy" and crash["pid"] not in (d.pid, pid)
    assert any(x["service"] == "supervisor" and "crashy: ready -> backoff" in x["msg"]
               and x["level"] == "warning" for x in docs)


def test_second_daemon_on_the_same_runtime_dir_is_refused(make_daemon):
    d = make_daemon(services={"a": stub()}).start()
    r = subprocess.run(["optimizerd", "start", "-c", d.config_path], env=d.env,
                       capture_output=True, text=True, timeout=30, start_new_session=True)
    assert r.returncode == 1
    assert "already running" in r.stderr and str(d.pid) in r.stderr
    assert d.status()["supervisor"]["pid"] == d.pid  # the first one is untouched
    assert descendants(d.pid)


def test_daemon_runs_on_environment_overrides_alone(make_daemon):
    """No file: built-in defaults plus LLM_OPTIMIZER__SECTION__KEY variables."""
    d = make_daemon()
    env = {"LLM_OPTIMIZER__SUPERVISOR__RUNTIME_DIR": d.runtime,
           "LLM_OPTIMIZER__SUPERVISOR__DATA_DIR": d.data,
           "LLM_OPTIMIZER__SUPERVISOR__HEARTBEAT_INTERVAL": "0.2",
           "LLM_OPTIMIZER__SUPERVISOR__PRELOAD": '["zmq", "msgspec", "workers.runtime"]',
           "LLM_OPTIMIZER__ADMIN__LISTEN": f"127.0.0.1:{d.admin_port}",
           "LLM_OPTIMIZER__SERVICES__ENVY__ENTRYPOINT": "workers.stub:StubWorker"}
    env.update({f"LLM_OPTIMIZER__{name.upper()}__ENABLED": "false"
                for name in ("storage", "collector", "processor", "rest_api", "grpc_api",
                             "integrations")})
    d.env.update(env)
    d.start(use_file=False)
    doc = d.status()
    assert doc["supervisor"]["config_file"] is None
    assert [s["name"] for s in doc["services"]] == ["envy"]
    assert d.service("envy")["status"] == {"settings": {}}


def test_daemon_runs_and_reloads_from_a_yaml_file(make_daemon):
    d = make_daemon(services={"a": stub()}, suffix=".yaml").start()
    assert d.config_path.endswith(".yaml")
    d.doc["services"]["b"] = stub(depends_on=["a"])
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0 and "added: b" in r.stdout, (r.stdout, r.stderr)
    assert d.services()["b"]["state"] == "ready"


def test_a_very_long_output_line_is_logged_in_pieces_not_lost(make_daemon):
    d = make_daemon(services={"probe": {"entrypoint": PROBE}}).start()
    size = 300_000
    text = "".join(chr(97 + i % 26) for i in range(size))
    r = d.ctl("call", "probe", "print", "--arg", f"size={size}")
    assert r.returncode == 0, r.stderr
    pid = d.pids()["probe"]
    wait_until(lambda: text[-1000:] in d.output(), 10)
    pieces = [line for line in d.output().splitlines() if f"probe[{pid}]" in line
              and "stream=stdout" in line and "hello" not in line]
    assert len(pieces) >= 3  # bounded records: a runaway line is cut, every piece labelled
    joined = "".join(line.split(f"probe[{pid}] ", 1)[1].rsplit(" stream=stdout", 1)[0]
                     for line in pieces)
    assert joined == text
