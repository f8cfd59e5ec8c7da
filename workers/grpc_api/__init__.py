"""The gRPC API service (grpc.aio): the services of protos/llm_optimizer/v1 over the same
operations as the REST API (``workers.rest_api.operations``), with the same credentials, roles
and rate limits (``[rest_api]`` and ``[rest_api.jwt]``), plus the standard
``grpc.health.v1.Health`` and server reflection.

The standard health service follows the supervisor: each second every daemon service's state
is read from it and published under the service's name (``storage``, ``processor``...), and
each API service under its full name is SERVING while the services it needs are ready. With
``[grpc_api.tls]`` the port speaks TLS, or mutual TLS (``workers.grpc_api.tls``: renewed
certificate files are served without a restart). Like the REST worker, the heavy application
is imported in ``start``, in a thread. It runs on uvloop: grpc.aio's per-call work is mostly
event-loop scheduling, and uvloop's loop answered 14 % more small calls a second than asyncio's
on the same process (docs/benchmarks.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
from typing import Any

import uvloop

from ipc.config import Config, GrpcApiSection, split_listen, worker_view
from workers.runtime import Worker

STOP_GRACE = 2.0
HEALTH_POLL_S = 1.0
NEEDS = {"llm_optimizer.v1.IntegrationService": ("storage", "integrations")}
DEFAULT_NEEDS = ("storage", "processor")


def is_loopback(listen: str) -> bool:
    host, _ = split_listen(listen)
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class GrpcApiWorker(Worker):
    loop_factory = staticmethod(uvloop.new_event_loop)
    server: Any = None
    health_servicer: Any = None
    certificates: Any = None
    follower: asyncio.Task[None] | None = None

    @property
    def section(self) -> GrpcApiSection:
        section = self.context.section
        assert isinstance(section, GrpcApiSection)
        return section

    async def start(self) -> None:
        await asyncio.to_thread(importlib.import_module, "workers.grpc_api.server")
        from workers.grpc_api.server import build

        built = await build(self.context.config, self.section, self.context.runtime_dir,
                            reflection=self.reflection_on())
        self.server, self.health_servicer, self.certificates = (
            built.server, built.health, built.certificates)
        self.layer, self.names = built.layer, built.names
        await self.server.start()
        self.follower = asyncio.create_task(self.follow_supervisor(), name="grpc-health")
        self.log.info("gRPC API on %s (%s)", self.section.listen,
                      "mutual TLS" if self.section.tls.client_ca_file else
                      "TLS" if self.section.tls.cert_file else "plaintext")

    def reflection_on(self) -> bool:
        mode = self.section.reflection
        return mode == "on" or (mode == "auto" and is_loopback(self.section.listen))

    async def follow_supervisor(self) -> None:
        """Keep the standard health service in step with the supervisor's view."""
        from grpc_health.v1 import health_pb2

        from workers.rest_api.problems import Problem

        serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)
        while True:
            try:
                status = await self.layer.deps.link.request("status")
                ready = {s["name"] for s in status.get("services", [])
                         if s.get("state") == "ready"}
                known = {s["name"] for s in status.get("services", [])}
            except Problem as exc:
                self.log.warning("supervisor status unavailable for health: %s", exc.detail)
                ready, known = set(), set()
            for name in known:
                await self.health_servicer.set(name, serving if name in ready else not_serving)
            for name in self.names:
                needs = NEEDS.get(name, DEFAULT_NEEDS)
                await self.health_servicer.set(name, serving if set(needs) <= ready
                                               else not_serving)
            await self.health_servicer.set("", serving)
            await asyncio.sleep(HEALTH_POLL_S)

    async def reload(self, new: Config) -> bool:
        """New certificates are taken live; any other change of this section restarts."""
        section = new.service_sections().get(self.context.service)
        if not isinstance(section, GrpcApiSection):
            return False
        others = {k: v for k, v in worker_view(section).items() if k != "tls"}
        if others != {k: v for k, v in worker_view(self.section).items() if k != "tls"}:
            return False
        if self.certificates is None:
            return not section.tls.cert_file
        from workers.grpc_api.tls import TlsConfigError

        try:
            self.certificates.reload(section.tls)
        except TlsConfigError as exc:
            self.log.error("TLS reload refused, the served certificates stay: %s", exc)
            return True
        return True

    async def stop(self) -> None:
        if self.follower is not None:
            self.follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.follower
        if self.server is not None:
            await self.health_servicer.enter_graceful_shutdown()
            await self.server.stop(STOP_GRACE)
            self.server = None
            await self.layer.close()

    def status(self) -> dict[str, Any]:
        return {"listen": self.section.listen, "serving": self.server is not None,
                "tls": "mutual" if self.section.tls.client_ca_file
                else "on" if self.section.tls.cert_file else "off",
                "reflection": self.reflection_on()}
