"""Crashes, hangs, unhealthy workers, memory limits: what the supervisor does about them."""
from __future__ import annotations

import os
import re
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PROBE, alive, http_get, stub, wait_until

pytestmark = pytest.mark.timeout(90)


def transitions(history, old, new):
    return [h for h in history if h["from"] == old and h["to"] == new]


def metric_samples(d) -> list:
    code, body = http_get(d.admin_url("/metrics"))
    assert code == 200
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def sample_value(samples, name, **labels):
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


# --- crash, backoff ----------------------------------------------------------------------------

def test_crash_restarts_with_exponential_backoff(make_daemon):
    base = 0.2
    d = make_daemon(services={
        "crashy": stub({"exit_after": 0.05, "exit_code": 3}, backoff_base=base,
                       backoff_max=10.0, max_restarts=20),
        "steady": stub()}).start(wait_ready=False)
    steady_pid = d.wait_service("steady", lambda s: s["state"] == "ready")["pid"]
    # The 5th failure comes after four complete backoffs (0.2, 0.4, 0.8, 1.6 s).
    d.wait_service("crashy", lambda s: s["restarts"] >= 5, timeout=30, what="5 restarts")
    history = d.history("crashy")
    backoffs = transitions(history, "ready", "backoff")
    starts = transitions(history, "stopped", "starting")
    assert len(backoffs) >= 4
    stated, measured = [], []
    for b in backoffs[:4]:
        assert "exited with code 3" in b["reason"]
        nxt = next(s for s in starts if s["at"] >= b["at"])
        measured.append(nxt["at"] - b["at"])
        stated.append(float(re.search(r"restarting in ([0-9.]+) s", b["reason"]).group(1)))
    for n, (said, took) in enumerate(zip(stated, measured)):
        raw = base * 2 ** n
        # min(base * 2^n, max) with +-20% jitter (the reason rounds to 10 ms) ...
        assert raw * 0.8 - 0.005 <= said <= raw * 1.2 + 0.005, f"delay #{n}: {stated}"
        # ... and the restart really waited that long (plus the loop's latency).
        assert said - 0.01 <= took <= said + 0.15, f"delay #{n}: said {said}, took {took}"
    for a, b in zip(stated, stated[1:]):
        assert 2 * 0.8 / 1.2 - 0.05 <= b / a <= 2 * 1.2 / 0.8 + 0.05, \
            f"delays do not double within the jitter: {stated}"
    s = d.services()["crashy"]
    assert s["restarts"] >= 4 and s["last_exit"] == "exited with code 3"
    assert d.services()["steady"]["pid"] == steady_pid  # untouched by its neighbour


def test_sigkilled_worker_is_replaced_at_once(make_daemon):
    d = make_daemon(services={"victim": stub(), "bystander": stub()}).start()
    before = d.pids()
    os.kill(before["victim"], signal.SIGKILL)
    s = d.wait_service("victim", lambda s: s["pid"] not in (None, before["victim"])
                       and s["state"] == "ready", what="replacement ready")
    assert s["restarts"] == 1
    assert d.pids()["bystander"] == before["bystander"]
    history = d.history("victim")
    crash = transitions(history, "ready", "backoff")[-1]
    assert "killed by SIGKILL" in crash["reason"]
    restart = transitions(history, "stopped", "starting")[-1]
    assert restart["at"] - crash["at"] < 0.5  # backoff_base 0.1, first delay at most 0.12 s


# --- restart intensity -------------------------------------------------------------------------

def test_give_up_after_max_restarts_then_operator_restart_revives(make_daemon):
    d = make_daemon(services={
        "crashy": stub({"exit_after": 0.3, "exit_code": 5}, max_restarts=2, restart_window=60.0,
                       backoff_base=0.05),
        "dependent": stub(depends_on=["crashy"]),
        "healthy": stub()}).start(wait_ready=False)
    healthy = d.wait_service("healthy", lambda s: s["state"] == "ready")["pid"]
    s = d.wait_service("crashy", lambda s: s["state"] == "failed", timeout=20, what="failed")
    assert s["restarts"] == 2
    assert s["pid"] is None
    assert "exited with code 5" in s["reason"]
    assert "more than 2 restarts within 60 s" in s["reason"] and "giving up" in s["reason"]
    history = d.history("crashy")
    assert len(transitions(history, "ready", "backoff")) == 2
    assert len(transitions(history, "ready", "failed")) == 1
    # The rest keeps running, and nothing restarts a failed service by itself.
    doc = d.status()
    svc = d.services(doc)
    assert svc["healthy"]["state"] == "ready" and svc["healthy"]["pid"] == healthy
    assert not doc["supervisor"]["ready"]
    assert d.running()
    samples = metric_samples(d)
    assert sample_value(samples, "optimizerd_service_state", service="crashy",
                        state="failed") == 1.0
    assert sample_value(samples, "optimizerd_service_state", service="crashy",
                        state="ready") == 0.0
    assert sample_value(samples, "optimizerd_service_up", service="crashy") == 0.0
    assert sample_value(samples, "optimizerd_service_restarts_total", service="crashy") == 2.0
    assert sample_value(samples, "optimizerd_ready") == 0.0
    table = d.ctl("status")
    assert table.returncode == 0
    line = next(x for x in table.stdout.splitlines() if x.startswith("crashy "))
    assert "failed" in line and "giving up" in line
    # The operator's word: restart it; it is READY again before it next crashes.
    r = d.ctl("restart", "crashy")
    assert r.returncode == 0, r.stderr
    assert "crashy: ready (pid " in r.stdout
    new_pid = int(re.search(r"pid (\d+)", r.stdout).group(1))
    assert new_pid != s["pid"]
    history = d.history("crashy")
    assert transitions(history, "failed", "stopped")[-1]["reason"] == "optimizerctl restart"


@pytest.mark.timeout(60)
def test_max_restarts_zero_fails_at_the_first_crash(make_daemon):
    d = make_daemon(services={"once": stub({"exit_after": 0.1}, max_restarts=0)})
    d.start(wait_ready=False)
    s = d.wait_service("once", lambda s: s["state"] == "failed", what="failed")
    assert s["restarts"] == 0 and "giving up" in s["reason"]


# --- hangs -------------------------------------------------------------------------------------

def test_sigstopped_worker_is_killed_and_replaced(make_daemon):
    d = make_daemon(services={"sleepy": stub(), "other": stub()},
                    supervisor={"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}).start()
    before = d.pids()
    old = before["sleepy"]
    os.kill(old, signal.SIGSTOP)
    s = d.wait_service("sleepy", lambda s: s["pid"] not in (None, old) and s["state"] == "ready",
                       timeout=10, what="hung worker replaced")
    assert s["restarts"] == 1
    wait_until(lambda: not alive(old), 5, message=f"hung pid {old} still alive")
    history = d.history("sleepy")
    hung = transitions(history, "ready", "stopping")[-1]
    assert re.fullmatch(r"no heartbeat for [0-9.]+ s", hung["reason"]), hung
    assert transitions(history, "stopping", "backoff"), history  # counted as a failure
    assert d.pids()["other"] == before["other"]


def test_worker_with_a_blocked_event_loop_is_sigkilled_and_replaced(make_daemon):
    """hang_after blocks the worker's loop: no heartbeat, and SIGTERM cannot be acted on."""
    d = make_daemon(services={"wedged": stub({"hang_after": 0.3}, max_restarts=10)}).start()
    old = d.pids()["wedged"]
    s = d.wait_service("wedged", lambda s: s["pid"] not in (None, old) and s["state"] == "ready",
                       timeout=10, what="wedged worker replaced")
    assert not alive(old)
    history = d.history("wedged")
    killed = transitions(history, "stopping", "backoff")[0]
    assert "no heartbeat for" in killed["reason"] and "killed by SIGKILL" in killed["reason"]
    assert s["restarts"] >= 1


# --- health ------------------------------------------------------------------------------------

def test_unhealthy_worker_is_restarted_after_failure_threshold_heartbeats(make_daemon):
    d = make_daemon(services={
        "sick": stub({"health": "unhealthy", "health_reason": "cannot reach upstream"},
                     failure_threshold=3, max_restarts=10),
        "meh": stub({"health": "degraded", "health_reason": "slow"})},
        supervisor={"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}).start(wait_ready=False)
    first = d.wait_service("sick", lambda s: s["pid"] is not None)["pid"]
    s = d.wait_service("sick", lambda s: s["restarts"] >= 1 and s["pid"] not in (None, first),
                       timeout=10, what="unhealthy worker restarted")
    history = d.history("sick")
    stop = next(h for h in history if h["to"] == "stopping")
    assert stop["reason"] == "unhealthy for 3 heartbeats: cannot reach upstream"
    started = transitions(history, "stopped", "starting")[0]["at"]
    # Three heartbeats: the first at start, the next two on the following multiples of the
    # 0.2 s interval (workers beat in step), so more than one full interval has passed.
    assert stop["at"] - started >= 0.2
    assert transitions(history, "stopping", "backoff")
    assert s["health"] == "unhealthy" or s["state"] != "ready"
    # Degraded is reported, but a degraded service stays ready and is not restarted.
    meh = d.services()["meh"]
    assert meh["state"] == "ready" and meh["restarts"] == 0
    assert meh["health"] == "degraded" and meh["reason"] == "slow"


def test_health_that_raises_is_reported_unhealthy_not_taken_for_a_hang(make_daemon):
    d = make_daemon(services={"fragile": {"entrypoint": PROBE, "failure_threshold": 3,
                                          "settings": {"health_raises": True}}})
    d.start(wait_ready=False)
    d.wait_service("fragile", lambda s: s["restarts"] >= 1, timeout=10, what="restarted")
    stop = next(h for h in d.history("fragile") if h["to"] == "stopping")
    assert stop["reason"] == "unhealthy for 3 heartbeats: health() failed: probe health exploded"
    assert "no heartbeat" not in stop["reason"]


# --- memory ------------------------------------------------------------------------------------

def test_worker_above_max_rss_mb_is_restarted_gracefully(make_daemon):
    d = make_daemon(services={"hog": {"entrypoint": PROBE, "max_rss_mb": 150}}).start()
    first = d.pids()["hog"]
    wait_until(lambda: d.services()["hog"]["rss_bytes"], 5, message="no RSS sample")
    assert d.services()["hog"]["rss_bytes"] < 150 << 20
    r = d.ctl("call", "hog", "grow", "--arg", "mb=200")
    assert r.returncode == 0, r.stderr
    s = d.wait_service("hog", lambda s: s["pid"] not in (None, first) and s["state"] == "ready",
                       timeout=15, what="hog restarted")
    history = d.history("hog")
    stop = transitions(history, "ready", "stopping")[0]
    assert re.fullmatch(r"RSS \d+ MiB above max_rss_mb 150", stop["reason"]), stop
    assert transitions(history, "stopping", "stopped")[0]["reason"] == "exited with code 0"
    assert s["restarts"] == 1
    assert not alive(first)
