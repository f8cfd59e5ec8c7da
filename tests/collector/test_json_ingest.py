"""JSON ingest end to end: optimizerd with storage and collector, events read back from the log."""
from __future__ import annotations

import json
import time
import urllib.request

import pytest

from ipc import storage as s
from ipc.events import decode_event
from tests.collector.in_flight import STORAGE_NOT_RESTARTED, events_held_in_flight
from tests.conftest import http_get, wait_until
from workers.storage_client import SyncStorageClient

EVENT = {"event_id": "e-1", "time": "2026-11-25T10:00:00Z", "service": "support-bot",
         "model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300, "latency_ms": 850.5}


@pytest.fixture
def collector(make_daemon):
    d = make_daemon(builtins=["storage", "collector"]).start()
    d.url = f"http://{d.doc['collector']['listen']}"
    return d


def post(url: str, body: bytes, content_type: str = "application/json"
         ) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def read_log(runtime: str, log: str) -> list[bytes]:
    client = SyncStorageClient(runtime)
    payloads: list[bytes] = []
    try:
        while True:
            page = client.call(s.LogRead(log=log, offset=len(payloads), max_records=10_000))
            if not page.records:
                return payloads
            payloads += [r.payload for r in page.records]
    finally:
        client.close()


def test_valid_events_are_stored_and_invalid_ones_rejected_one_by_one(collector):
    future = time.time() + 3600
    events = [EVENT,
              dict(EVENT, event_id="e-2", input_tokens=-5),
              dict(EVENT, event_id="e-3", time=future),
              dict(EVENT, event_id="e-4", colour="blue"),
              {k: v for k, v in EVENT.items() if k != "model"},
              dict(EVENT, event_id="e-6", tags={"team": "search"}, quality=0.9, status="error",
                   error_type="rate_limited")]
    status, _, body = post(collector.url + "/v1/events", json.dumps({"events": events}).encode())
    assert status == 200, body
    assert body["accepted"] == 2
    assert [(r["index"], r["path"]) for r in body["rejected"]] == [
        (1, "events[1].input_tokens"), (2, "events[2].time"), (3, "events[3].colour"),
        (4, "events[4].model")]
    assert all(r["reason"] for r in body["rejected"])
    stored = [decode_event(p) for p in read_log(collector.runtime, "llm-events")]
    assert [(e.event_id, e.input_tokens, e.model) for e in stored] == [
        ("e-1", 1200, "gpt-4o"), ("e-6", 1200, "gpt-4o")]
    assert stored[1].tags == {"team": "search"} and stored[1].error_type == "rate_limited"
    # No cost in the input: computed from the shipped price table, which says so.
    assert stored[0].cost_usd is not None and stored[0].cost_usd > 0
    assert stored[0].price_version
    dead = [json.loads(p) for p in read_log(collector.runtime, "collector.dead-letters")]
    assert [(d["path"], d["original"].get("event_id")) for d in dead] == [
        ("events[1].input_tokens", "e-2"), ("events[2].time", "e-3"),
        ("events[3].colour", "e-4"), ("events[4].model", "e-1")]

    metrics = lambda: http_get(collector.admin_url("/metrics"))[1].decode()  # noqa: E731
    wait_until(lambda: 'collector_events_accepted_total{source="json"} 2.0' in metrics(), 10)
    assert 'collector_dead_letters_total{source="json"} 4.0' in metrics()
    assert 'collector_events_rejected_total{reason="input_tokens",source="json"} 1.0' \
        in metrics()


@pytest.mark.parametrize("body, content_type, status", [
    (b"[1, 2]", "application/json", 400),
    (b'{"events": {}}', "application/json", 400),
    (b'{"events": [], "extra": 1}', "application/json", 400),
    (b"{not json", "application/json", 400),
    (b'{"events": []}', "text/plain", 415),
])
def test_bodies_of_the_wrong_shape_get_problem_details(collector, body, content_type, status):
    code, headers, answer = post(collector.url + "/v1/events", body, content_type)
    assert code == status
    assert headers["Content-Type"].startswith("application/problem+json")
    assert answer["status"] == status and answer["detail"]


def test_bodies_beyond_the_limits_are_refused(collector):
    code, _, _ = post(collector.url + "/v1/events",
                      b'{"events": [' + b"1," * (9 << 20) + b"1]}")
    assert code == 413
    code, _, answer = post(collector.url + "/v1/events",
                           json.dumps({"events": [EVENT] * 10_001}).encode())
    assert code == 413 and "10001" in answer["detail"]
    assert collector.services()["collector"]["restarts"] == 0


def test_feedback_is_kept_for_the_processor(collector):
    from ipc.events import decode_feedback

    body = {"feedback": [{"event_id": "e-1", "quality": 0.75},
                         {"event_id": "e-2", "quality": 1.5},
                         {"quality": 0.5}]}
    code, _, answer = post(collector.url + "/v1/feedback", json.dumps(body).encode())
    assert code == 200 and answer["accepted"] == 1
    assert [(r["index"], r["path"]) for r in answer["rejected"]] == [
        (1, "feedback[1].quality"), (2, "feedback[2].event_id")]
    kept = [decode_feedback(p) for p in read_log(collector.runtime, "llm-feedback")]
    assert [(f.event_id, f.quality) for f in kept] == [("e-1", 0.75)]


def test_too_many_events_in_flight_get_503_with_retry_after(make_daemon):
    """Backpressure: beyond max_in_flight, nothing is acknowledged and the client is told when
    to come back, instead of the collector buffering without bound."""
    d = make_daemon(builtins=["storage", "collector"],
                    extra={"collector": {"max_in_flight": 10},
                           "storage": STORAGE_NOT_RESTARTED}).start()
    url = f"http://{d.doc['collector']['listen']}/v1/events"
    with events_held_in_flight(d, 6) as held:
        code, headers, answer = post(url, json.dumps(
            {"events": [dict(EVENT, event_id=f"x-{i}") for i in range(5)]}).encode())
        assert code == 503 and int(headers["Retry-After"]) >= 1, answer
    assert held == [200]
    assert {decode_event(p).event_id for p in read_log(d.runtime, "llm-events")} == \
        {f"held-{i}" for i in range(6)}
    # Alone, a batch larger than max_in_flight goes through (bodies are bounded by size).
    code, _, answer = post(url, json.dumps(
        {"events": [dict(EVENT, event_id=f"y-{i}") for i in range(11)]}).encode())
    assert code == 200 and answer["accepted"] == 11


def test_storage_killed_during_ingest_loses_no_acknowledged_event(collector):
    """Clients see 503s while storage restarts; whatever was acknowledged is in the log once."""
    import os
    import signal
    import threading

    acked: list[str] = []
    refused = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal refused
        batch = 0
        while not stop.is_set():
            ids = [f"b{batch}-{i}" for i in range(50)]
            batch += 1
            code, _, answer = post(collector.url + "/v1/events", json.dumps(
                {"events": [dict(EVENT, event_id=i) for i in ids]}).encode())
            if code == 200:
                assert answer["accepted"] == len(ids)
                acked.extend(ids)
            else:
                assert code == 503, (code, answer)
                refused += 1

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(acked) >= 1000, 30)
        old = collector.services()["storage"]["pid"]
        os.kill(old, signal.SIGKILL)
        collector.wait_service("storage", lambda x: x["state"] == "ready" and x["pid"] != old,
                               20)
        before = len(acked)
        wait_until(lambda: len(acked) >= before + 1000, 30)
    finally:
        stop.set()
        thread.join(60)
    stored = [decode_event(p).event_id for p in read_log(collector.runtime, "llm-events")]
    assert len(stored) == len(set(stored)), "an event was appended twice"
    assert not set(acked) - set(stored), "acknowledged events are missing"
    assert collector.services()["collector"]["restarts"] == 0
