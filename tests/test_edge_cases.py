"""Less travelled paths: overrides across reloads, failed services, slow starts, dead helpers."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import alive, cmdline, descendants, http_get, stays_true, stub, wait_until

pytestmark = pytest.mark.timeout(90)


def transitions(history, old, new):
    return [h for h in history if h["from"] == old and h["to"] == new]


def test_command_line_log_options_survive_a_reload(make_daemon):
    """--json-logs and --log-level are not in the file: a reload must not drop them, nor take
    their absence from the file for a change of every service."""
    d = make_daemon(services={"a": stub(), "b": stub()})
    d.start("--json-logs", "--log-level", "debug")
    pids = d.pids()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "nothing changed" in r.stdout, r.stdout
    os.kill(d.pid, signal.SIGHUP)
    d.wait_status(lambda doc: doc["supervisor"]["reloads"]["ok"] == 2, 10)
    assert d.pids() == pids
    r = d.ctl("restart", "a")  # logs something after the reloads
    assert r.returncode == 0
    d.ctl("stop")
    assert d.wait_exit(10) == 0
    lines = [line for line in d.output().splitlines() if line.strip()]
    for line in lines:
        json.loads(line)  # still JSON after the reloads
    assert any(json.loads(line)["level"] == "debug" for line in lines[-10:])


def test_reload_with_a_fixed_config_revives_a_failed_service(make_daemon):
    d = make_daemon(services={"flaky": stub({"exit_after": 0.1}, max_restarts=1),
                              "fine": stub()})
    d.start(wait_ready=False)
    d.wait_service("flaky", lambda s: s["state"] == "failed", what="flaky failed")
    fine = d.pids()["fine"]
    d.doc["services"]["flaky"]["settings"] = {}  # the fix: no more exit_after
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "restarted: flaky" in r.stdout, r.stdout
    s = d.services()["flaky"]
    assert s["state"] == "ready", s
    assert d.pids()["fine"] == fine
    d.wait_status(lambda doc: doc["supervisor"]["ready"], 5)


def test_stop_during_a_slow_start_does_not_wait_for_the_start(make_daemon, no_process_left):
    d = make_daemon(services={"slow": stub({"ready_delay": 20.0})},
                    supervisor={"shutdown_timeout": 5.0, "start_timeout": 60.0})
    d.start(wait_ready=False)
    d.wait_service("slow", lambda s: s["state"] == "starting" and s["heartbeat_age_s"] < 0.5)
    tree = d.process_tree()
    t = time.monotonic()
    r = d.ctl("stop")
    assert r.returncode == 0, r.stderr
    assert d.wait_exit(10) == 0
    took = time.monotonic() - t
    no_process_left(tree)
    assert took < 3.0, f"stop took {took:.1f} s: the start was waited for"
    assert "slow: stopping -> stopped (exited with code 0)" in d.output()


def test_start_timeout_kills_and_restarts_a_worker_that_never_gets_ready(make_daemon):
    d = make_daemon(services={"stuck": stub({"ready_delay": 30.0}, max_restarts=1)},
                    supervisor={"start_timeout": 0.8})
    d.start(wait_ready=False)
    s = d.wait_service("stuck", lambda s: s["state"] == "failed", timeout=20, what="failed")
    history = d.history("stuck")
    killed = transitions(history, "starting", "stopping")
    assert len(killed) == 2 and all(h["reason"] == "not READY after 0.8 s" for h in killed)
    assert s["restarts"] == 1 and "giving up" in s["reason"]


def test_failing_start_backs_off_and_gives_up(make_daemon):
    d = make_daemon(services={"broken": stub({"fail_start": True}, max_restarts=2),
                              "after": stub(depends_on=["broken"])})
    d.start(wait_ready=False)
    s = d.wait_service("broken", lambda s: s["state"] == "failed", timeout=20, what="failed")
    assert "exited with code 1" in s["reason"] and s["restarts"] == 2
    assert len(transitions(d.history("broken"), "starting", "backoff")) == 2
    assert d.services()["after"]["state"] == "stopped"  # never started: its dependency failed
    assert "fail_start is set" in d.output()  # the worker's traceback reached the log


def test_status_reason_of_a_failed_service_says_why_it_failed(make_daemon):
    d = make_daemon(services={"sick": stub({"health": "unhealthy", "health_reason": "no disk"},
                                           max_restarts=0)})
    d.start(wait_ready=False)
    s = d.wait_service("sick", lambda s: s["state"] == "failed", what="failed")
    assert "giving up" in s["reason"] and "no disk" in s["reason"], s


def test_second_sigint_kills_everything_at_once(make_daemon, no_process_left):
    d = make_daemon(services={"stubborn": stub({"ignore_stop": True})},
                    supervisor={"shutdown_timeout": 30.0}).start()
    tree = d.process_tree()
    os.kill(d.pid, signal.SIGINT)
    wait_until(lambda: "stubborn: ready -> stopping" in d.output(), 5)
    t = time.monotonic()
    os.kill(d.pid, signal.SIGINT)
    assert d.wait_exit(10) == 0
    assert time.monotonic() - t < 5
    no_process_left(tree)
    assert "second SIGINT" in d.output()


@pytest.mark.timeout(60)
def test_admin_port_taken_fails_fast_with_nothing_left(make_daemon):
    d = make_daemon(services={"a": stub()})
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", d.admin_port))
        blocker.listen()
        d.start(wait_ready=False)
        assert d.wait_exit(20) == 1
    assert "cannot start" in d.output()
    assert not [p for p in descendants(d.pid) if alive(p)]
    d.start()  # the port is free again, and nothing stale is in the way
    assert d.status()["supervisor"]["pid"] == d.pid


def test_killing_the_fork_server_takes_workers_down_and_all_come_back(make_daemon):
    d = make_daemon(services={"a": stub(), "b": stub(depends_on=["a"])}).start()
    pids = d.pids()
    forkserver = [p for p in descendants(d.pid)
                  if p not in pids.values() and "forkserver" in cmdline(p)]
    assert len(forkserver) == 1, [(p, cmdline(p)) for p in descendants(d.pid)]
    os.kill(forkserver[0], signal.SIGKILL)
    d.wait_status(lambda doc: doc["supervisor"]["ready"] and all(
        s["pid"] not in pids.values() for s in doc["services"]), 20, "all replaced")
    for pid in pids.values():
        assert not alive(pid)  # died with their parent (PR_SET_PDEATHSIG)
    assert d.running()


@pytest.mark.timeout(120)
def test_workers_of_a_frozen_supervisor_exit_by_themselves_and_are_replaced(make_daemon):
    d = make_daemon(services={"a": stub()},
                    supervisor={"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}).start()
    pid = d.pids()["a"]
    os.kill(d.pid, signal.SIGSTOP)
    try:
        # silence_timeout = max(3 * heartbeat_timeout, 10 s)
        wait_until(lambda: not alive(pid), 20, interval=0.1,
                   message="worker kept running with its supervisor frozen")
    finally:
        os.kill(d.pid, signal.SIGCONT)
    s = d.wait_service("a", lambda s: s["pid"] not in (None, pid) and s["state"] == "ready",
                       what="replaced after the supervisor came back")
    assert s["restarts"] == 1
    assert "supervisor silent" in d.output()


def test_changing_admin_listen_on_reload_moves_the_admin_server(make_daemon):
    from conftest import free_port
    d = make_daemon(services={"a": stub()}).start()
    old_port, new_port = d.admin_port, free_port()
    assert http_get(d.admin_url("/ready"))[0] == 200
    d.doc["admin"]["listen"] = f"127.0.0.1:{new_port}"
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert http_get(f"http://127.0.0.1:{new_port}/ready")[0] == 200
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{old_port}/ready", timeout=1)
    # A port that is taken: kept on the old one, and the reply says so.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        doc = copy.deepcopy(d.doc)
        doc["admin"]["listen"] = f"127.0.0.1:{taken}"
        d.write_config(doc)
        r = d.ctl("reload")
    assert r.returncode == 0 and "note: admin.listen" in r.stdout
    assert http_get(f"http://127.0.0.1:{new_port}/ready")[0] == 200


def test_optimizerctl_stop_twice_and_status_while_stopping(make_daemon):
    d = make_daemon(services={"stubborn": stub({"ignore_stop": True})},
                    supervisor={"shutdown_timeout": 1.5}).start()
    first = subprocess.Popen(["optimizerctl", "--runtime-dir", d.runtime, "stop"], env=d.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        doc = d.wait_status(lambda doc: doc["supervisor"]["state"] == "stopping", 5)
        assert not doc["supervisor"]["ready"]
        code, body = http_get(d.admin_url("/health"))
        assert code == 503 and json.loads(body)["supervisor"]["state"] == "stopping"
        assert http_get(d.admin_url("/ready"))[0] == 503
        r = d.ctl("restart", "stubborn")
        assert r.returncode == 1 and "stopping" in r.stderr
        r = d.ctl("reload")
        assert r.returncode == 1 and "stopping" in r.stderr
        second = d.ctl("stop")
        assert second.returncode == 0, second.stderr
        assert first.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert d.wait_exit(10) == 0


@pytest.mark.timeout(60)
def test_workers_keep_hearing_the_supervisor_with_long_heartbeat_timeouts(make_daemon):
    """A worker exits when the supervisor is silent for max(3 * heartbeat_timeout, 10 s), with
    [supervisor] heartbeat_timeout as it was at its start. The supervisor must answer often
    enough for that, whatever a service's own heartbeat_timeout or a reloaded value says."""
    d = make_daemon(services={"own": stub(heartbeat_timeout=60.0), "plain": stub()},
                    supervisor={"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}).start()
    pids = d.pids()
    d.doc["supervisor"]["heartbeat_timeout"] = 40.0
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    stays_true(lambda: d.pids() == pids and "silent" not in d.output(), 12.0,
               message=lambda: d.tail())
