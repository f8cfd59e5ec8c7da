"""The REST API's operations, one module per resource; ``build_table`` declares them all in one
RouteTable (served and documented from the same declarations)."""
from __future__ import annotations

from workers.rest_api.endpoints import (admin, configs, events, findings, integrations,
                                        optimizations, rollouts, session)
from workers.rest_api.endpoints.common import Deps
from workers.rest_api.routes import RouteTable

__all__ = ["Deps", "build_table"]


def build_table(deps: Deps) -> RouteTable:
    table = RouteTable()
    for module in (configs, optimizations, rollouts, findings, events, integrations, admin,
                   session):
        module.install(table, deps)
    return table
