"""Integrations: the destinations of notifications (Slack, Jira, GitHub, webhooks) and the
Anthropic client, as the integrations worker runs them: list, health, routing changes at run
time, and test messages. Their secrets are configured in files or the environment only and
never appear here (``target`` says whether one is set)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from ipc.config import NOTIFICATION_KINDS
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import Deps, not_found
from workers.rest_api.problems import Problem
from workers.rest_api.processor_link import CommandFailed
from workers.rest_api.routes import Call, RouteTable

TAGS = ("integrations",)
NAME = "{integration:[a-z]+(?::[A-Za-z0-9_.-]{1,64})?}"
State = Literal["healthy", "degraded", "disabled", "misconfigured"]


class Integration(Struct, kw_only=True):
    name: str  # slack, jira, github, webhook:NAME, anthropic
    kind: str
    state: State  # degraded: its circuit breaker is open; misconfigured: see problem
    problem: str = ""
    breaker: str = ""
    delivered: int = 0
    failed: int = 0
    pending: int = 0  # in the outbox
    last_error: str = ""
    last_delivered_ms: int = 0
    last_failed_ms: int = 0
    consecutive_failures: int = 0  # since the last success: the breaker opens at a threshold
    routing: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)  # where it sends; secrets: set or not
    usage: dict[str, Any] | None = None  # anthropic: calls, tokens and cost of its own calls


class IntegrationHealth(Struct, kw_only=True):
    name: str
    state: State
    problem: str = ""
    breaker: str = ""
    last_error: str = ""


class RoutingChange(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    enabled: bool | None = None
    events: list[Literal[NOTIFICATION_KINDS]] | None = None  # type: ignore[valid-type]
    min_severity: Literal["info", "warning", "critical"] | None = None
    rate_limit_per_min: Annotated[float, Meta(ge=0)] | None = None


class TestResult(Struct, kw_only=True):
    name: str
    ok: bool
    duration_ms: float
    result: dict[str, Any] | None = None  # what the destination made (issue key, URL...)
    error: str | None = None


async def _integrations(deps: Deps, command: str, args: dict[str, Any]) -> Any:
    try:
        return await deps.link.call("integrations", command, args)
    except CommandFailed as exc:
        if exc.message.startswith("no integration"):
            raise not_found(exc.message) from None
        if exc.message.startswith("configure"):
            raise Problem(422, "Unprocessable Content", exc.message,
                          type_suffix="invalid-input") from None
        raise Problem(409, "Conflict", exc.message, type_suffix="conflict") from None


async def _one(deps: Deps, name: str) -> Integration:
    for item in await _integrations(deps, "integrations", {}):
        if item["name"] == name:
            return msgspec.convert(item, Integration)
    raise not_found(f"no integration {name!r}")


def install(table: RouteTable, deps: Deps) -> None:
    viewer, operator, admin = Role.VIEWER, Role.OPERATOR, Role.ADMIN

    @table.route("GET", "/v1/integrations", role=viewer, responses={200: list[Integration]},
                 tags=TAGS)
    async def list_integrations(_call: Call) -> list[Integration]:
        """Every destination and the Anthropic client, with state, routing and figures."""
        return msgspec.convert(await _integrations(deps, "integrations", {}),
                               list[Integration])

    @table.route("GET", f"/v1/integrations/{NAME}", role=viewer,
                 responses={200: Integration}, problems=(404,), tags=TAGS)
    async def get_integration(call: Call) -> Integration:
        """One integration."""
        return await _one(deps, call.params["integration"])

    @table.route("GET", f"/v1/integrations/{NAME}/health", role=viewer,
                 responses={200: IntegrationHealth}, problems=(404,), tags=TAGS)
    async def integration_health(call: Call) -> IntegrationHealth:
        """healthy, degraded (breaker open), disabled or misconfigured (with the key at
        fault)."""
        found = await _one(deps, call.params["integration"])
        return IntegrationHealth(name=found.name, state=found.state, problem=found.problem,
                                 breaker=found.breaker, last_error=found.last_error)

    @table.route("PUT", f"/v1/integrations/{NAME}", role=admin, body=RoutingChange,
                 responses={200: Integration}, problems=(404, 409, 422), tags=TAGS)
    async def configure_integration(call: Call) -> Integration:
        """Switch a destination on or off, or change its routing; applied at once and kept
        across restarts, over the config file (URLs and secrets stay in the config)."""
        changes = msgspec.to_builtins(call.body)
        result = await _integrations(deps, "configure", {
            **changes, "name": call.params["integration"],
            "by": call.principal.subject if call.principal else "an operator"})
        return msgspec.convert(result, Integration)

    @table.route("POST", f"/v1/integrations/{NAME}/test", role=operator,
                 responses={200: TestResult}, problems=(404, 409), tags=TAGS)
    async def test_integration(call: Call) -> TestResult:
        """Send a test message now; ``ok`` says whether the destination took it."""
        result = await _integrations(deps, "test", {
            "name": call.params["integration"],
            "by": call.principal.subject if call.principal else "an operator"})
        return msgspec.convert(result, TestResult)
