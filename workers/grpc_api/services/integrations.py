"""IntegrationService (protos/llm_optimizer/v1/integrations.proto) over the REST integrations
operations: list, get, health, routing updates and tests. Destinations and their secrets are
defined in the config file, so Create and Delete answer FAILED_PRECONDITION saying so, and a
request that carries secrets is refused. SubscribeIntegrationEvents polls the integrations each
second and reports health changes, deliveries, failures and routing changes."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import msgspec
from google.protobuf import duration_pb2

from protos.llm_optimizer.v1 import integrations_pb2 as I
from protos.llm_optimizer.v1 import integrations_pb2_grpc
from workers.grpc_api.convert import plain, struct, timestamp_ms, timestamp_ns
from workers.grpc_api.interceptor import GuardedServer
from workers.grpc_api.layer import ServiceLayer
from workers.rest_api.problems import Problem

POLL_S = 1.0
KINDS = {"slack": I.INTEGRATION_KIND_SLACK, "jira": I.INTEGRATION_KIND_JIRA,
         "github": I.INTEGRATION_KIND_GITHUB, "anthropic": I.INTEGRATION_KIND_ANTHROPIC,
         "webhook": I.INTEGRATION_KIND_WEBHOOK}
STATES = {"healthy": I.HEALTH_STATE_HEALTHY, "degraded": I.HEALTH_STATE_DEGRADED,
          "misconfigured": I.HEALTH_STATE_UNHEALTHY, "disabled": I.HEALTH_STATE_DISABLED}
MASKS = {"enabled": "enabled", "event_types": "events",
         "settings.min_severity": "min_severity",
         "settings.rate_limit_per_min": "rate_limit_per_min"}
FROM_CONFIG = ("destinations and their secrets are defined in the config file "
               "([integrations.*]; secrets from the environment or *_file keys)")


def _health(item: dict[str, Any]) -> I.IntegrationHealth:
    return I.IntegrationHealth(
        integration_id=item["name"], state=STATES.get(item["state"], I.HEALTH_STATE_UNKNOWN),
        message=item.get("problem") or item.get("last_error") or "",
        last_success_time=timestamp_ms(item.get("last_delivered_ms")),
        last_failure_time=timestamp_ms(item.get("last_failed_ms")),
        consecutive_failures=int(item.get("consecutive_failures", 0)),
        pending_deliveries=int(item.get("pending", 0)))


def _integration(item: dict[str, Any]) -> I.Integration:
    target = dict(item.get("target") or {})
    routing = dict(item.get("routing") or {})
    secret_names = sorted(k for k, v in target.items() if v == "set")
    settings = {k: v for k, v in {**target, **routing}.items()
                if k not in ("enabled", "events") and v != "set" and v != "not set"}
    if item.get("usage"):
        settings["usage"] = item["usage"]
    return I.Integration(id=item["name"], kind=KINDS.get(item["kind"], 0),
                         display_name=item["name"], enabled=item["state"] != "disabled",
                         settings=struct(settings), secret_names=secret_names,
                         event_types=list(routing.get("events") or []), health=_health(item))


class IntegrationService(integrations_pb2_grpc.IntegrationServiceServicer):
    def __init__(self, layer: ServiceLayer) -> None:
        self.layer = layer

    async def _one(self, name: str) -> dict[str, Any]:
        found = await self.layer.call("get_integration", params={"integration": name})
        return _plain(found)

    async def CreateIntegration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Problem(409, "Conflict", f"{FROM_CONFIG}; add it there and reload",
                      type_suffix="conflict")

    async def DeleteIntegration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Problem(409, "Conflict", f"{FROM_CONFIG}; remove it there, or disable it with "
                      "UpdateIntegration", type_suffix="conflict")

    async def GetIntegration(self, request: I.GetIntegrationRequest,
                             context: grpc.aio.ServicerContext) -> I.Integration:
        return _integration(await self._one(request.id))

    async def ListIntegrations(self, request: I.ListIntegrationsRequest,
                               context: grpc.aio.ServicerContext) -> I.ListIntegrationsResponse:
        if request.page_token:
            raise Problem(422, "Unprocessable Content", "every integration fits one page; "
                          "there is no next page", path="page_token",
                          type_suffix="invalid-input")
        items = _plain(await self.layer.call("list_integrations"))
        chosen = [_integration(i) for i in sorted(items, key=lambda i: i["name"])
                  if not request.kind or KINDS.get(i["kind"]) == request.kind]
        return I.ListIntegrationsResponse(integrations=chosen)

    async def UpdateIntegration(self, request: I.UpdateIntegrationRequest,
                                context: grpc.aio.ServicerContext) -> I.Integration:
        given = request.integration
        if given.secrets:
            raise Problem(422, "Unprocessable Content", f"secrets cannot be set here: "
                          f"{FROM_CONFIG}", path="integration.secrets",
                          type_suffix="invalid-input")
        paths = list(request.update_mask.paths) or ["enabled", "event_types"]
        body: dict[str, Any] = {}
        settings = plain(given.settings)
        for index, path in enumerate(paths):
            if path not in MASKS:
                raise Problem(422, "Unprocessable Content", f"{path!r} cannot be changed; "
                              f"the paths are {', '.join(MASKS)}",
                              path=f"update_mask.paths[{index}]", type_suffix="invalid-input")
            if path == "enabled":
                body["enabled"] = given.enabled
            elif path == "event_types":
                body["events"] = list(given.event_types)
            else:
                key = MASKS[path]
                if key not in settings:
                    raise Problem(422, "Unprocessable Content", f"{path} is in update_mask "
                                  "but not in integration.settings",
                                  path=f"integration.{path}", type_suffix="invalid-input")
                body[key] = settings[key]
        result = await self.layer.call("configure_integration",
                                       params={"integration": given.id}, body=body)
        return _integration(_plain(result))

    async def TestIntegration(self, request: I.TestIntegrationRequest,
                              context: grpc.aio.ServicerContext) -> I.TestIntegrationResponse:
        started = time.monotonic()
        if not request.send_message:  # no message: what the deliveries and tests left
            item = await self._one(request.id)
            return I.TestIntegrationResponse(
                ok=item["state"] == "healthy", message=item.get("problem") or
                item.get("last_error") or item["state"],
                latency=duration_pb2.Duration(nanos=int((time.monotonic() - started) * 1e9)),
                details=struct({"state": item["state"], "breaker": item.get("breaker", "")}))
        result = _plain(await self.layer.call("test_integration",
                                              params={"integration": request.id}))
        return I.TestIntegrationResponse(
            ok=result["ok"], message=result.get("error") or "test message delivered",
            latency=duration_pb2.Duration(nanos=int(result["duration_ms"] * 1e6)),
            details=struct(result.get("result") or {}))

    async def GetIntegrationHealth(self, request: I.GetIntegrationHealthRequest,
                                   context: grpc.aio.ServicerContext) -> I.IntegrationHealth:
        return _health(await self._one(request.id))

    async def SubscribeIntegrationEvents(self, request: I.SubscribeIntegrationEventsRequest,
                                         context: grpc.aio.ServicerContext
                                         ) -> AsyncIterator[I.IntegrationEvent]:
        wanted, kinds = set(request.integration_ids), set(request.kinds)
        before: dict[str, dict[str, Any]] | None = None
        while True:
            items = {i["name"]: i for i in _plain(await self.layer.call("list_integrations"))
                     if not wanted or i["name"] in wanted}
            if before is not None:
                for event in _changes(before, items):
                    if not kinds or event.kind in kinds:
                        yield event
            before = items
            await asyncio.sleep(POLL_S)


def _changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
             ) -> list[I.IntegrationEvent]:
    """What happened between two polls, per integration."""
    events = []
    for name, now in after.items():
        old = before.get(name)
        if old is None:
            continue

        def event(kind: int, message: str, details: dict[str, Any] | None = None,
                  now: dict[str, Any] = now, name: str = name) -> I.IntegrationEvent:
            return I.IntegrationEvent(id=uuid.uuid4().hex, kind=kind, integration_id=name,
                                      integration_kind=KINDS.get(now["kind"], 0),
                                      time=timestamp_ns(time.time_ns()), message=message,
                                      health=_health(now), details=struct(details or {}))

        if now["state"] != old["state"]:
            events.append(event(I.IntegrationEvent.KIND_HEALTH_CHANGED,
                                f"{old['state']} -> {now['state']}"))
        if now.get("routing") != old.get("routing"):
            events.append(event(I.IntegrationEvent.KIND_UPDATED, "routing changed",
                                now.get("routing")))
        delivered = int(now.get("delivered", 0)) - int(old.get("delivered", 0))
        if delivered > 0:
            events.append(event(I.IntegrationEvent.KIND_DELIVERED,
                                f"{delivered} delivered", {"count": delivered}))
        failed = int(now.get("failed", 0)) - int(old.get("failed", 0))
        if failed > 0:
            events.append(event(I.IntegrationEvent.KIND_DELIVERY_FAILED,
                                now.get("last_error") or f"{failed} failed",
                                {"count": failed}))
    return events


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def register(server: GuardedServer, layer: ServiceLayer) -> str:
    integrations_pb2_grpc.add_IntegrationServiceServicer_to_server(IntegrationService(layer),
                                                                   server)
    return I.DESCRIPTOR.services_by_name["IntegrationService"].full_name
