"""Builds the gRPC server: the service layer over the REST API's operations, the call guard,
every service of ``services``, the standard health service, reflection, and the port (plaintext
or TLS)."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection
from grpc_reflection.v1alpha import reflection_pb2_grpc

from ipc.config import Config, GrpcApiSection
from workers.grpc_api import services
from workers.grpc_api.interceptor import CallGuard, GuardedServer
from workers.grpc_api.layer import ServiceLayer
from workers.grpc_api.tls import Certificates
from workers.rest_api.auth import Role
from workers.rest_api.endpoints import build_table
from workers.rest_api.endpoints.server import make_authenticator, make_deps, make_limiter
from workers.rest_api.operations import Operations
from workers.rest_api.response_cache import ResponseCache


@dataclass
class Built:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    certificates: Certificates | None
    layer: ServiceLayer
    names: list[str]  # the API's services, by full name


async def build(config: Config, section: GrpcApiSection, runtime_dir: str,
                reflection: bool) -> Built:
    rest = config.rest_api  # the credentials, roles and limits are the REST API's
    deps = make_deps(config, rest, runtime_dir)
    layer = ServiceLayer(deps, Operations(build_table(deps), ResponseCache(rest.cache_ttl_s)))
    guard = CallGuard(make_authenticator(deps), make_limiter(rest),
                      {cn: Role(role) for cn, role in section.tls.client_roles.items()})
    limit = section.max_message_kb * 1024
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if section.processes > 1 else 0),
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    guarded = GuardedServer(server, guard)
    names = services.register(guarded, layer)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    if reflection:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            grpc_reflection.aio.ReflectionServicer(
                [*names, "grpc.health.v1.Health", grpc_reflection.SERVICE_NAME]), guarded)
    certificates = Certificates(section.tls) if section.tls.cert_file else None
    if certificates is None:
        bound = server.add_insecure_port(section.listen)
    else:
        bound = server.add_secure_port(section.listen, certificates.credentials())
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {section.listen}")
    return Built(server, health_servicer, certificates, layer, names)

