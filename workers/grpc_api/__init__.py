"""The gRPC API service (grpc.aio). For now it serves the standard grpc.health.v1 Health service
on its listen address; the API's own services come with the gRPC API issue."""
from __future__ import annotations

from typing import Any

from ipc.config import GrpcApiSection
from workers.runtime import Worker

STOP_GRACE = 2.0


class GrpcApiWorker(Worker):
    server: Any = None
    health_servicer: Any = None

    async def start(self) -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        section = self.context.section
        assert isinstance(section, GrpcApiSection)
        options = [("grpc.so_reuseport", 1 if section.processes > 1 else 0),
                   ("grpc.max_receive_message_length", 4 << 20)]
        self.server = grpc.aio.server(options=options)
        self.health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.server)
        if self.server.add_insecure_port(section.listen) == 0:
            raise OSError(f"cannot bind gRPC on {section.listen}")
        await self.server.start()
        await self.health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.log.info("gRPC API on %s", section.listen)

    async def stop(self) -> None:
        if self.server is not None:
            await self.health_servicer.enter_graceful_shutdown()
            await self.server.stop(STOP_GRACE)
            self.server = None

    def status(self) -> dict[str, Any]:
        return {"listen": self.context.section.listen, "serving": self.server is not None}
