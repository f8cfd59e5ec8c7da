"""HealthService (protos/llm_optimizer/v1/health.proto): the supervisor's status document
(``optimizerctl status --json``, supervisor/status.py) as health messages. Public: the
call guard asks no credential for it, and it reads the supervisor, not the operations.

A component is HEALTHY when READY and reporting health "ok", UNHEALTHY when STOPPED or FAILED,
DEGRADED otherwise (starting, stopping, in backoff, or ready with another health); the overall
status is the worst of the components asked about, UNHEALTHY while the daemon stops.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from importlib import metadata
from typing import Any

import grpc
from google.protobuf import duration_pb2

from protos.llm_optimizer.v1 import health_pb2, health_pb2_grpc
from workers.grpc_api import DEFAULT_NEEDS
from workers.grpc_api.convert import enum_value, timestamp_ns
from workers.grpc_api.interceptor import GuardedServer
from workers.grpc_api.layer import ServiceLayer
from workers.rest_api.problems import Problem

WATCH_POLL_S = 1.0
HEALTHY, DEGRADED, UNHEALTHY = (health_pb2.HEALTH_STATUS_HEALTHY,
                                health_pb2.HEALTH_STATUS_DEGRADED,
                                health_pb2.HEALTH_STATUS_UNHEALTHY)


def _daemon_version() -> str:
    try:
        return metadata.version("llm-auto-optimizer")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return ""


VERSION = _daemon_version()


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _status_of(service: dict[str, Any]) -> int:
    state = service["state"]
    if state in ("stopped", "failed"):
        return UNHEALTHY
    return HEALTHY if state == "ready" and service.get("health") == "ok" else DEGRADED


def _component(service: dict[str, Any]) -> health_pb2.ComponentHealth:
    return health_pb2.ComponentHealth(
        name=service["name"], instance=service["instance"],
        state=enum_value(health_pb2.ComponentState, service["state"]),
        status=_status_of(service), health=service.get("health") or "",
        reason=service.get("reason") or "", restarts=service.get("restarts") or 0,
        uptime=_duration(service.get("uptime_s")),
        heartbeat_age=_duration(service.get("heartbeat_age_s")))


def _selected(doc: dict[str, Any], names: Iterable[str]) -> list[dict[str, Any]]:
    """The status document's services named in ``names`` (all if none); NOT_FOUND for a name
    the supervisor does not know."""
    wanted = set(names)
    services = doc.get("services", [])
    unknown = sorted(wanted - {service["name"] for service in services})
    if unknown:
        raise Problem(404, "Not Found", f"no service {', '.join(map(repr, unknown))}; known: "
                      f"{', '.join(sorted({s['name'] for s in services}))}",
                      type_suffix="not-found")
    return [service for service in services if not wanted or service["name"] in wanted]


def _health(doc: dict[str, Any], names: Iterable[str]) -> health_pb2.HealthResponse:
    components = [_component(service) for service in _selected(doc, names)]
    supervisor = doc.get("supervisor", {})
    status = max((c.status for c in components), default=HEALTHY)
    if supervisor.get("state") == "stopping":
        status = UNHEALTHY
    return health_pb2.HealthResponse(status=status, version=VERSION,
                                     uptime=_duration(supervisor.get("uptime_s")),
                                     check_time=timestamp_ns(time.time_ns()),
                                     components=components)


def _signature(doc: dict[str, Any], answer: health_pb2.HealthResponse) -> tuple[Any, ...]:
    """What Watch reports a change of: the statuses, states, healths, reasons and restarts,
    and the process ids, so a restart quicker than a poll is not missed (ages and uptimes
    change at every poll and are left out)."""
    pids = {(s["name"], s["instance"]): s.get("pid") for s in doc.get("services", [])}
    return (answer.status, tuple(
        (c.name, c.instance, c.state, c.status, c.health, c.reason, c.restarts,
         pids.get((c.name, c.instance))) for c in answer.components))


class HealthService(health_pb2_grpc.HealthServiceServicer):
    def __init__(self, layer: ServiceLayer) -> None:
        self.layer = layer
        self.started = time.monotonic()

    async def _status(self) -> dict[str, Any]:
        return await self.layer.deps.link.request("status")

    async def Health(self, request: health_pb2.HealthRequest,
                     context: grpc.aio.ServicerContext) -> health_pb2.HealthResponse:
        return _health(await self._status(), request.components)

    async def Readiness(self, request: health_pb2.ReadinessRequest,
                        context: grpc.aio.ServicerContext) -> health_pb2.ReadinessResponse:
        """Ready when every instance of the services this API needs (storage, processor) is
        READY and the daemon is not stopping; an unanswered supervisor is not ready either."""
        try:
            doc = await self._status()
        except Problem as exc:
            return health_pb2.ReadinessResponse(ready=False,
                                                waiting_for=[f"supervisor: {exc.detail}"])
        waiting = []
        if doc.get("supervisor", {}).get("state") == "stopping":
            waiting.append("optimizerd: stopping")
        services = doc.get("services", [])
        for name in DEFAULT_NEEDS:
            mine = [s for s in services if s["name"] == name]
            if not mine:
                waiting.append(f"{name}: not enabled")
            for s in mine:
                if s["state"] != "ready":
                    label = name if s["instance"] == 0 else f"{name}#{s['instance']}"
                    waiting.append(f"{label}: {s['state']}"
                                   + (f" ({s['reason']})" if s.get("reason") else ""))
        return health_pb2.ReadinessResponse(ready=not waiting, waiting_for=waiting)

    async def Liveness(self, request: health_pb2.LivenessRequest,
                       context: grpc.aio.ServicerContext) -> health_pb2.LivenessResponse:
        return health_pb2.LivenessResponse(alive=True,
                                           uptime=_duration(time.monotonic() - self.started))

    async def Watch(self, request: health_pb2.WatchHealthRequest,
                    context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthResponse]:
        """Polls the supervisor every WATCH_POLL_S and sends only what changed."""
        last = None
        while True:
            doc = await self._status()
            answer = _health(doc, request.components)
            signature = _signature(doc, answer)
            if signature != last:
                last = signature
                yield answer
            await asyncio.sleep(WATCH_POLL_S)


def register(server: GuardedServer, layer: ServiceLayer) -> str:
    health_pb2_grpc.add_HealthServiceServicer_to_server(HealthService(layer), server)
    return health_pb2.DESCRIPTOR.services_by_name["HealthService"].full_name
