"""The API's gRPC services (protos/llm_optimizer/v1), one module per service. Each module's
``register(server, layer)`` adds its servicer and returns the service's full name (for
reflection and the standard health service)."""
from __future__ import annotations

import importlib

from workers.grpc_api.interceptor import GuardedServer
from workers.grpc_api.layer import ServiceLayer

MODULES = ("optimization", "config", "metrics", "integrations", "health", "admin")


def register(server: GuardedServer, layer: ServiceLayer) -> list[str]:
    return [importlib.import_module(f"{__name__}.{name}").register(server, layer)
            for name in MODULES]
