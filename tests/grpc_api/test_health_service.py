"""HealthService over a running optimizerd: answers without credentials, from the supervisor's
status document, and a watch that reports a service's restart."""
from __future__ import annotations

import os
import signal

import grpc
import pytest

from protos.llm_optimizer.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.timeout(180)
H = health_pb2
SERVICES = {"storage", "collector", "processor", "rest_api", "grpc_api"}


@pytest.fixture(scope="module")
def stub(grpc_daemon):
    return health_pb2_grpc.HealthServiceStub(grpc_daemon.channel())


def test_health_readiness_liveness_need_no_credentials(grpc_daemon, stub):
    answer = stub.Health(H.HealthRequest())
    assert {c.name for c in answer.components} == SERVICES
    assert answer.status == H.HEALTH_STATUS_HEALTHY and answer.version
    assert answer.uptime.ToNanoseconds() > 0 and answer.check_time.seconds > 0
    status = grpc_daemon.daemon.status()
    for component in answer.components:
        row = next(s for s in status["services"] if s["name"] == component.name)
        assert component.state == H.COMPONENT_STATE_READY and component.health == row["health"]
        assert component.status == H.HEALTH_STATUS_HEALTHY and component.heartbeat_age.nanos >= 0
    only = stub.Health(H.HealthRequest(components=["processor"]))
    assert [c.name for c in only.components] == ["processor"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Health(H.HealthRequest(components=["nope"]))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert stub.Readiness(H.ReadinessRequest()) == H.ReadinessResponse(ready=True)
    alive = stub.Liveness(H.LivenessRequest())
    assert alive.alive and alive.uptime.ToNanoseconds() > 0
    # credentials are not needed, and bad ones are not looked at
    assert stub.Liveness(H.LivenessRequest(), metadata=(("x-api-key", "bogus"),)).alive


def test_watch_reports_a_restart(grpc_daemon, stub):
    stream = stub.Watch(H.WatchHealthRequest(components=["processor"]), timeout=90)
    try:
        first = next(stream)
        assert first.components[0].state == H.COMPONENT_STATE_READY
        restarted = grpc_daemon.ctl("restart", "processor")
        assert restarted.returncode == 0, restarted.stderr
        updates = []
        for answer in stream:  # each one differs from the one before
            updates.append(answer)
            if answer.components[0].state == H.COMPONENT_STATE_READY:
                break
        assert updates and updates[-1].status == H.HEALTH_STATUS_HEALTHY
        # either a non-ready state was seen, or the restart showed as a new process
        assert (any(u.components[0].state != H.COMPONENT_STATE_READY for u in updates)
                or updates[-1].components[0].uptime.ToNanoseconds()
                < first.components[0].uptime.ToNanoseconds())
    finally:
        stream.cancel()
    assert stub.Readiness(H.ReadinessRequest()).ready


def test_watch_reports_a_hung_service_going_down_and_back(grpc_daemon, stub):
    """A frozen processor misses its heartbeats: the supervisor stops it and starts another,
    and the watch shows it not READY on the way."""
    stream = stub.Watch(H.WatchHealthRequest(components=["processor"]), timeout=90)
    try:
        assert next(stream).components[0].state == H.COMPONENT_STATE_READY
        os.kill(grpc_daemon.daemon.service("processor")["pid"], signal.SIGSTOP)
        seen = []
        for answer in stream:
            seen.append((answer.components[0].state, answer.status))
            if answer.components[0].state == H.COMPONENT_STATE_READY:
                break
        assert any(state != H.COMPONENT_STATE_READY and status != H.HEALTH_STATUS_HEALTHY
                   for state, status in seen), seen
    finally:
        stream.cancel()
