"""The processor service in a running optimizerd: events posted to the collector come out as
closed windows in storage, duplicates dropped, feedback joined; a SIGKILLed processor resumes
from its checkpoint and ends with exactly the windows an uninterrupted run computes."""
from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request

import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipc import storage as s
from ipc import window_series as ws
from ipc.config import ProcessorSection
from ipc.events import parse_json_event
from ipc.prices import shipped_prices
from tests.conftest import free_port, post_events, wait_until
from workers.processor.core import ProcessorCore
from workers.storage_client import SyncStorageClient

pytestmark = pytest.mark.timeout(120)

T0 = 1_795_600_800  # 2026-11-25T10:00:00Z, seconds
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60}
SERVICES = ("support-bot", "search", "summarizer")


def make_events(n: int, seed: int, minutes: int = 8) -> list[dict]:
    """``n`` calls spread in time order over ``minutes`` of event time."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(T0, T0 + minutes * 60, n))
    events = []
    for i, t in enumerate(times):
        service = SERVICES[i % 3]
        events.append({
            "event_id": f"{seed}-{i}", "time": float(round(t, 3)), "service": service,
            "model": "gpt-4o" if rng.random() < 0.7 else "gpt-4o-mini",
            "input_tokens": int(rng.integers(100, 2000)),
            "output_tokens": int(rng.integers(10, 500)),
            "latency_ms": float(round(rng.lognormal(6.5, 0.5), 2)),
            "status": "error" if rng.random() < 0.02 else "ok",
            "quality": float(round(rng.beta(8, 2), 4)) if rng.random() < 0.5 else None,
            "prompt_fingerprint": f"fp-{rng.integers(0, 50)}"})
    return events


def stored_windows(runtime: str) -> dict[tuple, dict]:
    """(kind, key, start_ns) -> summary of every window the processor wrote."""
    client = SyncStorageClient(runtime)
    try:
        keys = [ws.decode_key(d.body).as_tuple() for d in client.call(
            s.DocList(ns=ws.NS, prefix="key.", limit=1000)).documents]
        found = {}
        for key in keys:
            for kind in ("tumbling", "sliding"):
                for point in client.call(s.TsRange(ns=ws.NS, series=ws.series_name(kind, key),
                                                   start=0, end=2 ** 62)):
                    window = ws.decode_point(point.value)
                    found[(kind, key, window.start_ns)] = window.summary
        return found
    finally:
        client.close()


def reference_windows(events: list[dict]) -> dict[tuple, dict]:
    """The same events through a ProcessorCore in this process, uninterrupted."""
    core = ProcessorCore(msgspec.convert(PROCESSOR, ProcessorSection), shipped_prices())
    prices = shipped_prices()  # the collector prices events that report no cost
    parsed = [prices.with_cost(parse_json_event(e, i, now=T0 + 10_000))
              for i, e in enumerate(events)]
    done = 0
    found = {}
    while done < len(parsed):
        done += core.ingest(parsed[done:])
        for w in core.drain_windows():
            found[(w.kind, w.key, w.start_ns)] = w.aggregate.summary()
        if (boundary := core.due_analysis()) is not None:
            core.analyze(boundary)
    return found


def same_summary(got: dict, want: dict) -> bool:
    if got.keys() != want.keys():
        return False
    for name, value in want.items():
        if isinstance(value, float):
            if got[name] != pytest.approx(value, rel=1e-9, abs=1e-12):
                return False
        elif got[name] != value and name != "top_fingerprints":
            return False
    return True


def processor_status(d) -> dict:
    """The processor's status, once it has loaded its state: until then (a restart reading
    its checkpoint) it answers {"starting": true}."""
    def loaded() -> dict | None:
        reply = d.request("call", {"service": "processor", "command": "info", "args": {}})
        assert reply.ok, reply
        status = reply.result["status"]
        return None if status.get("starting") else status
    return wait_until(loaded, 30, message="the processor's state loaded")


@pytest.fixture
def daemon(make_daemon):
    d = make_daemon(builtins=["storage", "collector", "processor"],
                    extra={"processor": dict(PROCESSOR, checkpoint_interval_s=5.0)}).start()
    d.url = f"http://{d.doc['collector']['listen']}/v1/events"
    return d


def test_windows_from_posted_events_with_duplicates_and_feedback(daemon):
    events = make_events(3_000, seed=1)
    for i in range(0, len(events), 500):
        post_events(daemon.url, events[i:i + 500])
    post_events(daemon.url, events[:200])  # re-sent: dropped by event id
    wait_until(lambda: processor_status(daemon)["events"] == 3_200, 30,
               message=lambda: repr(processor_status(daemon)))
    status = processor_status(daemon)
    assert status["duplicates"] == 200 and status["late"] == 0
    want = reference_windows(events)
    assert want, "no window closed"
    got = wait_until(lambda: (w := stored_windows(daemon.runtime)).keys() >= want.keys() and w,
                     15)
    wrong = [k for k in want if not same_summary(got[k], want[k])]
    assert not wrong, [(k, got[k], want[k]) for k in wrong[:1]]
    tumbling = [v for k, v in want.items() if k[0] == "tumbling"]
    assert sum(v["count"] for v in tumbling) <= 3_000

    # The same figures as Prometheus series on the supervisor's aggregate /metrics.
    def series() -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(daemon.admin_url("/metrics"), timeout=10) as answer:
            text = answer.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name.startswith("processor_")}

    def total(name: str) -> float:
        return sum(v for (n, _), v in series().items() if n == name)

    stored = [v for k, v in got.items() if k[0] == "tumbling"]
    wait_until(lambda: total("processor_llm_calls_total") == sum(v["count"] for v in stored),
               10, message=lambda: f"{total('processor_llm_calls_total')} calls in /metrics")
    assert total("processor_llm_cost_usd_total") == pytest.approx(
        sum(v["cost_usd"] for v in stored), rel=1e-9)
    assert total("processor_llm_errors_total") == sum(v["errors"] for v in stored)
    found = series()
    assert found[("processor_events_total", (("outcome", "counted"),))] == 3_000
    assert found[("processor_events_total", (("outcome", "duplicate"),))] == 200

    # Feedback for a recent event joins its still-open window's quality.
    last = events[-1]
    request = urllib.request.Request(
        daemon.url.replace("/v1/events", "/v1/feedback"),
        data=json.dumps({"feedback": [{"event_id": last["event_id"], "quality": 0.5},
                                      {"event_id": "nobody", "quality": 0.5}]}).encode(),
        method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read())["accepted"] == 2
    status = wait_until(lambda: (st := processor_status(daemon))["feedback"] == 1 and st, 10)
    assert status["feedback_unmatched"] == 1


def test_a_killed_processor_resumes_with_nothing_lost_or_counted_twice(daemon):
    events = make_events(12_000, seed=2)
    first, second = events[:4_000], events[4_000:]
    for i in range(0, len(first), 500):
        post_events(daemon.url, first[i:i + 500])
    wait_until(lambda: processor_status(daemon)["events"] == len(first), 30)
    wait_until(lambda: processor_status(daemon)["checkpoints"] >= 1, 15)  # within 5 s
    old = daemon.services()["processor"]["pid"]

    sender = threading.Thread(target=lambda: [post_events(daemon.url, second[i:i + 250])
                                              for i in range(0, len(second), 250)])
    sender.start()
    try:
        wait_until(lambda: processor_status(daemon)["events"] > len(first), 30)
        os.kill(old, signal.SIGKILL)  # mid-stream, and between checkpoints (every 5 s)
    finally:
        sender.join(60)
    daemon.wait_service("processor", lambda x: x["state"] == "ready" and x["pid"] != old, 30)
    client = SyncStorageClient(daemon.runtime)
    try:
        length = client.call(s.LogInfo(log="llm-events")).next_offset
    finally:
        client.close()
    assert length == len(events)
    wait_until(lambda: processor_status(daemon)["positions"].get(0) == length, 30,
               message=lambda: repr(processor_status(daemon)))
    want = reference_windows(events)
    got = wait_until(lambda: (w := stored_windows(daemon.runtime)).keys() >= want.keys() and w,
                     15)
    assert got.keys() == want.keys()
    wrong = [k for k in want if not same_summary(got[k], want[k])]
    assert not wrong, [(k, got[k]["count"], want[k]["count"]) for k in wrong[:3]]
    assert daemon.services()["processor"]["restarts"] == 1
    with open(daemon.log_path) as log:
        assert "resumed from checkpoint" in log.read()


def test_operator_commands_through_optimizerctl(daemon):
    """configure, experiment (a JSON argument with :=), config, rollouts, abort; a request that
    cannot be done is exit status 2 with a message that names what is wrong."""
    r = daemon.ctl("call", "processor", "configure", "--arg", "service=writer",
                   "--arg", "model=claude-sonnet-4-5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1
    r = daemon.ctl("call", "processor", "experiment", "--arg", "service=writer",
                   "--arg", 'change:={"model": "claude-haiku-4-5"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "started"
    config = json.loads(daemon.ctl("call", "processor", "config",
                                   "--arg", "service=writer").stdout)
    assert config["version"] == 2 and config["variants"][0]["name"] == "canary"
    assert config["variants"][0]["overrides"] == {"model": "claude-haiku-4-5"}
    rollouts = json.loads(daemon.ctl("call", "processor", "rollouts").stdout)
    assert list(rollouts) == ["writer"]

    r = daemon.ctl("call", "processor", "experiment", "--arg", "service=writer",
                   "--arg", 'change:={"model": "x"}')
    assert r.returncode == 2 and "already has an active rollout" in r.stderr
    r = daemon.ctl("call", "processor", "experiment", "--arg", "service=writer",
                   "--arg", "change:={not json")
    assert r.returncode == 2 and "not JSON" in r.stderr
    r = daemon.ctl("call", "processor", "config", "--arg", "service=nobody")
    assert r.returncode == 2 and "no config for service 'nobody'" in r.stderr

    r = daemon.ctl("call", "processor", "abort", "--arg", "service=writer",
                   "--arg", "reason=wrong model")
    assert r.returncode == 0, r.stderr
    aborted = json.loads(r.stdout)
    assert aborted["kind"] == "rolled_back" and "wrong model" in aborted["reason"]
    config = json.loads(daemon.ctl("call", "processor", "config",
                                   "--arg", "service=writer").stdout)
    assert config["version"] == 3 and config["variants"] == []
    assert config["model"] == "claude-sonnet-4-5"
    assert json.loads(daemon.ctl("call", "processor", "rollouts").stdout) == {}
    r = daemon.ctl("call", "processor", "abort", "--arg", "service=writer")
    assert r.returncode == 2 and "no rollout running" in r.stderr


def test_only_open_proposals_are_deployed_or_dismissed(daemon):
    """A caching proposal from repeated prompts: deployed, it can be neither deployed again nor
    dismissed; aborted, it stays rolled back."""
    events = []
    for minute in range(12):
        for i in range(300):
            events.append({
                "event_id": f"faq-{minute}-{i}", "time": T0 + 60 * minute + i * 0.2,
                "service": "faq", "model": "gpt-4o", "input_tokens": 1500,
                "output_tokens": 400, "latency_ms": 700.0, "quality": 0.8,
                "prompt_fingerprint": f"hot-{i % 10}" if i % 2 else f"u-{minute}-{i}"})
    for i in range(0, len(events), 600):
        post_events(daemon.url, events[i:i + 600])

    def caching() -> list:
        r = daemon.ctl("call", "processor", "proposals")
        return [p for p in json.loads(r.stdout) if p["strategy"] == "caching"]
    proposal = wait_until(caching, 30)[0]
    assert proposal["status"] == "open" and proposal["service"] == "faq"
    ident = f"proposal={proposal['id']}"
    r = daemon.ctl("call", "processor", "deploy", "--arg", ident)
    assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "started", r.stderr
    for command in ("deploy", "dismiss"):
        r = daemon.ctl("call", "processor", command, "--arg", ident)
        assert r.returncode == 2 and "is deploying, not open" in r.stderr, (command, r.stderr)
    assert daemon.ctl("call", "processor", "abort", "--arg", "service=faq").returncode == 0
    r = daemon.ctl("call", "processor", "dismiss", "--arg", ident)
    assert r.returncode == 2 and "is rolled_back, not open" in r.stderr


def test_the_processor_waits_for_an_unreachable_store_instead_of_failing(make_daemon):
    """PostgreSQL away at start: the processor comes up degraded, retrying its checkpoint
    load, rather than crash-looping into `failed`; its commands answer that it is not running
    yet."""
    d = make_daemon(builtins=["storage", "collector", "processor"], extra={"storage": {
        "backend": "postgres",
        "postgres_dsn": f"postgresql://optimizer@127.0.0.1:{free_port()}/optimizer"}}).start()
    entry = d.wait_service("processor", lambda x: x["state"] == "ready"
                           and "waiting for storage" in (x["reason"] or ""), 30)
    assert entry["health"] == "degraded"
    wait_until(lambda: d.output().count("processor waiting for storage") >= 3, 30,
               message="three retries logged")
    assert d.services()["processor"]["restarts"] == 0
    r = d.ctl("call", "processor", "proposals")
    assert r.returncode == 2 and "not running yet" in r.stderr
