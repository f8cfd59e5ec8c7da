"""Holding events in flight in a running collector, for the backpressure tests: the storage
worker is SIGSTOPped, so one request's append cannot complete until it is continued."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

from tests.conftest import wait_until

# Config for a daemon whose storage worker these tests stop: not restarted meanwhile.
STORAGE_NOT_RESTARTED = {"heartbeat_timeout": 60.0}
EVENT = {"time": "2026-11-25T10:00:00Z", "service": "support-bot", "model": "gpt-4o",
         "input_tokens": 1200, "output_tokens": 300, "latency_ms": 850.5}


def collector_in_flight(d) -> int:
    reply = d.request("call", {"service": "collector", "command": "info", "args": {}})
    assert reply.ok, reply
    return reply.result["status"]["in_flight"]


@contextlib.contextmanager
def events_held_in_flight(d, count: int) -> Iterator[list[int]]:
    """Inside: ``count`` JSON events of one request are in flight (their append waits on the
    stopped storage worker, for less than the storage client's 5 s timeout if the request is
    to succeed). On exit storage continues and the request's status code is appended to the
    yielded list. The daemon's ``[storage]`` needs STORAGE_NOT_RESTARTED."""
    storage = d.services()["storage"]["pid"]
    url = f"http://{d.doc['collector']['listen']}/v1/events"
    body = json.dumps({"events": [dict(EVENT, event_id=f"held-{i}")
                                  for i in range(count)]}).encode()
    codes: list[int] = []

    def send() -> None:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                codes.append(answer.status)
        except urllib.error.HTTPError as exc:
            codes.append(exc.code)

    os.kill(storage, signal.SIGSTOP)
    sender = threading.Thread(target=send)
    try:
        sender.start()
        wait_until(lambda: collector_in_flight(d) == count, 15,
                   message=lambda: f"in flight: {collector_in_flight(d)}")
        yield codes
    finally:
        os.kill(storage, signal.SIGCONT)
        sender.join(60)
