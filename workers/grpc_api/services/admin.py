"""AdminService (protos/llm_optimizer/v1/admin.proto): the REST admin operations
(workers/rest_api/endpoints/admin.py) through the service layer, plus two views the REST API
has no route for: the storage worker's figures and a stream of system events, which polls the
same operations and reports what changed between two polls."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import msgspec
from google.protobuf import duration_pb2

from protos.llm_optimizer.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from workers.grpc_api.convert import (NS, enum_text, enum_value, plain, struct, timestamp_ms,
                                      timestamp_ns)
from workers.grpc_api.interceptor import GuardedServer, current_principal
from workers.grpc_api.layer import ServiceLayer
from workers.rest_api.auth import AuthError, AuthFailure, Role, authorize
from workers.rest_api.endpoints.common import MAX_PAGE, command_problem, not_found
from workers.rest_api.problems import Problem
from workers.rest_api.processor_link import CommandFailed

JOB_LIST_DEFAULT = 50
AUDIT_LIST_DEFAULT = 100
POLL_S = 1.0
STATUS_TYPES = ("service_state", "service_health", "service_restart", "config_reload")
EVENT_TYPES = (*STATUS_TYPES, "job", "feature_flag")
# Answers of a source whose worker is down or restarting: asked again at the next poll (the
# outage itself shows as that service's state events).
_UNAVAILABLE = (409, 503, 504)
_STORAGE_STAT_FIELDS = ("namespaces", "logs", "disk_bytes")
_SEVERITY = {"failed": "critical", "unhealthy": "critical", "backoff": "warning",
             "degraded": "warning"}


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * NS))
    return out


def _page_size(value: int, default: int) -> int:
    """The conventions of common.proto: 0 is the default, above the maximum the maximum."""
    if value < 0:
        raise Problem(422, "Unprocessable Content", f"page_size must not be negative, not "
                      f"{value}", path="page_size", type_suffix="invalid-input")
    return min(value or default, MAX_PAGE)


def _require_admin() -> None:
    """For the RPCs no REST operation stands behind (the layer checks the others' roles)."""
    principal = current_principal()
    if principal is None:
        raise AuthError(401, AuthFailure.MISSING, "AdminService needs a caller")
    authorize(principal, Role.ADMIN)


def _service(doc: dict[str, Any]) -> admin_pb2.ServiceStats:
    out = admin_pb2.ServiceStats(
        name=doc["name"], instance=doc["instance"], state=doc["state"],
        pid=doc.get("pid"), uptime=_duration(doc.get("uptime_s")),
        restarts=doc.get("restarts", 0), heartbeat_age=_duration(doc.get("heartbeat_age_s")),
        health=doc.get("health") or "", reason=doc.get("reason") or "",
        start_duration=_duration(doc.get("start_duration_s")),
        cpu_percent=doc.get("cpu_percent"), rss_bytes=doc.get("rss_bytes"))
    if isinstance(doc.get("last_exit"), dict):  # the supervisor reports a line of text today:
        out.last_exit.CopyFrom(struct(doc["last_exit"]))  # it stays in SystemStats.document
    return out


def _system_stats(doc: dict[str, Any]) -> admin_pb2.SystemStats:
    sup = doc.get("supervisor", {})
    started = sup.get("started_at")
    return admin_pb2.SystemStats(
        supervisor_pid=sup.get("pid", 0), state=sup.get("state", ""),
        uptime=_duration(sup.get("uptime_s")),
        start_time=timestamp_ns(round(started * NS)) if started else None,
        config_hash=sup.get("config_hash") or "", config_file=sup.get("config_file") or "",
        ready=bool(sup.get("ready")), services=[_service(s) for s in doc.get("services", [])],
        document=struct(doc))


def _flag(flag: Any) -> admin_pb2.FeatureFlag:
    return admin_pb2.FeatureFlag(name=flag.name, enabled=flag.enabled,
                                 description=flag.description, updated_by=flag.updated_by,
                                 update_time=timestamp_ms(flag.updated_ms))


def _job(job: Any) -> admin_pb2.Job:
    out = admin_pb2.Job(id=job.id, kind=job.kind, args=struct(job.args), by=job.by,
                        state=enum_value(admin_pb2.JobState, job.state), message=job.message,
                        create_time=timestamp_ms(job.created_ms),
                        start_time=timestamp_ms(job.started_ms),
                        finish_time=timestamp_ms(job.finished_ms))
    if job.result is not None:
        out.result.CopyFrom(struct(job.result))
    return out


def _api_key(key: Any) -> admin_pb2.ApiKey:
    """An ApiKey, or a CreatedKey (new, so not revoked)."""
    return admin_pb2.ApiKey(id=key.id, name=key.name,
                            role=enum_value(common_pb2.Role, key.role.value),
                            create_time=timestamp_ms(key.created_ms),
                            revoked=getattr(key, "revoked", False))


def _audit_record(record: Any) -> admin_pb2.AuditRecord:
    return admin_pb2.AuditRecord(
        time=timestamp_ms(record.time_ms), method=record.method, path=record.path,
        status=record.status, request_id=record.request_id, subject=record.subject or "",
        role=record.role or "", via=record.via or "", key_id=record.key_id or "",
        offset=record.offset or 0)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, layer: ServiceLayer) -> None:
        self.layer = layer

    async def GetSystemStats(self, request: admin_pb2.GetSystemStatsRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.SystemStats:
        return _system_stats(await self.layer.call("admin_stats"))

    async def GetStorageStats(self, request: admin_pb2.GetStorageStatsRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.StorageStats:
        """The storage worker's own figures (``optimizerctl call storage stats``): what it
        reports depends on the backend; what it does not report stays unset."""
        _require_admin()
        try:
            stats = await self.layer.deps.link.call("storage", "stats", {})
        except CommandFailed as exc:
            raise command_problem(exc) from None
        return admin_pb2.StorageStats(
            namespaces=struct(stats.get("namespaces")), logs=struct(stats.get("logs")),
            disk_bytes=stats.get("disk_bytes", 0),
            details=struct({k: v for k, v in stats.items() if k not in _STORAGE_STAT_FIELDS}))

    async def RunStorageMaintenance(self, request: admin_pb2.RunStorageMaintenanceRequest,
                                    context: grpc.aio.ServicerContext) -> admin_pb2.Job:
        kind = enum_text(admin_pb2.RunStorageMaintenanceRequest.Operation, request.operation)
        if kind is None:
            raise Problem(422, "Unprocessable Content", "operation must be BACKUP, COMPACT or "
                          "RETENTION", path="operation", type_suffix="invalid-input")
        return await self._start_job(kind, request)

    async def StartJob(self, request: admin_pb2.StartJobRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.Job:
        return await self._start_job(request.kind, request)

    async def _start_job(self, kind: str, request: Any) -> admin_pb2.Job:
        return _job(await self.layer.call("start_job", body={"kind": kind,
                                                             "args": plain(request.args)}))

    async def ListJobs(self, request: admin_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> admin_pb2.ListJobsResponse:
        """One page: the storage worker lists the newest jobs only (at most MAX_PAGE), so the
        filters apply to those and there is never a next page."""
        if request.page_token:
            raise Problem(422, "Unprocessable Content", "jobs come in one page (the newest, at "
                          f"most {MAX_PAGE}); there is no page to continue", path="page_token",
                          type_suffix="invalid-input")
        size = _page_size(request.page_size, JOB_LIST_DEFAULT)
        states = {enum_text(admin_pb2.JobState, state) for state in request.states}
        filtered = bool(states or request.kind)
        jobs = await self.layer.call("list_jobs", query={"limit": MAX_PAGE if filtered else size})
        chosen = [job for job in jobs if (not states or job.state in states)
                  and (not request.kind or job.kind == request.kind)]
        return admin_pb2.ListJobsResponse(jobs=[_job(job) for job in chosen[:size]])

    async def GetJob(self, request: admin_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb2.Job:
        return _job(await self.layer.call("get_job", params={"job_id": request.id}))

    async def CancelJob(self, request: admin_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.Job:
        return _job(await self.layer.call("cancel_job", params={"job_id": request.id}))

    async def ListFeatureFlags(self, request: admin_pb2.ListFeatureFlagsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> admin_pb2.ListFeatureFlagsResponse:
        flags = sorted(await self.layer.call("list_flags"), key=lambda flag: flag.name)
        return admin_pb2.ListFeatureFlagsResponse(flags=[_flag(flag) for flag in flags])

    async def GetFeatureFlag(self, request: admin_pb2.GetFeatureFlagRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.FeatureFlag:
        """From the list: the REST API has no route for one flag."""
        for flag in await self.layer.call("list_flags"):
            if flag.name == request.name:
                return _flag(flag)
        raise not_found(f"no flag {request.name!r}")

    async def SetFeatureFlag(self, request: admin_pb2.SetFeatureFlagRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.FeatureFlag:
        return _flag(await self.layer.call("set_flag", params={"name": request.name},
                                           body={"enabled": request.enabled}))

    async def ListApiKeys(self, request: admin_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> admin_pb2.ListApiKeysResponse:
        keys = await self.layer.call("list_api_keys")
        return admin_pb2.ListApiKeysResponse(keys=[_api_key(key) for key in keys])

    async def CreateApiKey(self, request: admin_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.CreatedApiKey:
        made = await self.layer.call("create_api_key", body={
            "name": request.name, "role": enum_text(common_pb2.Role, request.role)})
        return admin_pb2.CreatedApiKey(api_key=_api_key(made), key=made.key)

    async def RevokeApiKey(self, request: admin_pb2.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ApiKey:
        return _api_key(await self.layer.call("revoke_api_key", params={"key_id": request.id}))

    async def ListAuditRecords(self, request: admin_pb2.ListAuditRecordsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> admin_pb2.ListAuditRecordsResponse:
        query = {"limit": _page_size(request.page_size, AUDIT_LIST_DEFAULT)}
        if request.page_token:
            query["cursor"] = request.page_token
        page = await self.layer.call("list_audit", query=query)
        return admin_pb2.ListAuditRecordsResponse(
            records=[_audit_record(record) for record in page.items],
            next_page_token=page.next_cursor)

    async def SubscribeSystemEvents(self, request: admin_pb2.SubscribeSystemEventsRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> AsyncIterator[admin_pb2.SystemEvent]:
        """What changed between two polls (every POLL_S) of the status, jobs and flags; the
        first poll is the baseline. Ends when the client cancels (the sleep is cancelled)."""
        _require_admin()
        unknown = set(request.types) - set(EVENT_TYPES)
        if unknown:
            raise Problem(422, "Unprocessable Content", f"unknown event types {sorted(unknown)};"
                          f" they are {', '.join(EVENT_TYPES)}", path="types",
                          type_suffix="invalid-input")
        watch = _Watch(self.layer, set(request.types) or set(EVENT_TYPES), request.service)
        await watch.poll()
        while True:
            await asyncio.sleep(POLL_S)
            for event in await watch.poll():
                yield event


# --- system events ---------------------------------------------------------------------------


def _event(kind: str, service: str, severity: str, message: str,
           details: dict[str, Any]) -> admin_pb2.SystemEvent:
    return admin_pb2.SystemEvent(type=kind, time=timestamp_ns(time.time_ns()), service=service,
                                 severity=enum_value(common_pb2.Severity, severity),
                                 message=message, details=struct(details))


def _status_events(old: dict[str, Any], new: dict[str, Any]) -> list[admin_pb2.SystemEvent]:
    events = []
    before = {(s["name"], s["instance"]): s for s in old.get("services", [])}
    for now in new.get("services", []):
        name, was = now["name"], before.get((now["name"], now["instance"]), {})
        who = f"{name}#{now['instance']}"
        facts = {"instance": now["instance"], "reason": now.get("reason") or ""}
        if now["state"] != was.get("state"):
            events.append(_event(
                "service_state", name, _SEVERITY.get(now["state"], "info"),
                f"{who}: {was.get('state', 'absent')} -> {now['state']}",
                {**facts, "from": was.get("state"), "to": now["state"]}))
        if was and now.get("health") != was.get("health"):
            events.append(_event(
                "service_health", name, _SEVERITY.get(now.get("health"), "info"),
                f"{who} health: {was.get('health')} -> {now.get('health')}",
                {**facts, "from": was.get("health"), "to": now.get("health")}))
        if was and now.get("restarts", 0) > was.get("restarts", 0):
            events.append(_event(
                "service_restart", name, "warning", f"{who} restarted (restart "
                f"{now['restarts']})", {**facts, "restarts": now["restarts"],
                                        "last_exit": now.get("last_exit")}))
    old_sup, new_sup = old.get("supervisor", {}), new.get("supervisor", {})
    if old_sup and (new_sup.get("config_hash") != old_sup.get("config_hash")
                    or new_sup.get("reloads") != old_sup.get("reloads")):
        failed = (new_sup.get("reloads") or {}).get("error", 0) \
            > (old_sup.get("reloads") or {}).get("error", 0)
        events.append(_event(
            "config_reload", "", "warning" if failed else "info",
            "config reload failed; still on the previous config" if failed
            else f"config reloaded ({new_sup.get('config_hash')})",
            {"from": old_sup.get("config_hash"), "to": new_sup.get("config_hash"),
             "reloads": new_sup.get("reloads")}))
    return events


def _job_events(old: dict[str, Any], new: dict[str, Any]) -> list[admin_pb2.SystemEvent]:
    return [_event("job", "storage", "warning" if job["state"] in ("failed", "interrupted")
                   else "info", f"job {id_} ({job['kind']}): {job['state']}",
                   {"from": old[id_]["state"] if id_ in old else None, "to": job["state"],
                    "job": job})
            for id_, job in new.items() if id_ not in old or old[id_]["state"] != job["state"]]


def _flag_events(old: dict[str, Any], new: dict[str, Any]) -> list[admin_pb2.SystemEvent]:
    return [_event("feature_flag", "processor", "info",
                   f"flag {name} {'on' if flag['enabled'] else 'off'}"
                   + (f" (by {flag['updated_by']})" if flag["updated_by"] else ""), flag)
            for name, flag in new.items()
            if name in old and (old[name]["enabled"], old[name]["updated_ms"])
            != (flag["enabled"], flag["updated_ms"])]


@dataclass
class _Source:
    """One operation polled, what it last answered (plain), and how two answers differ."""

    types: frozenset[str]
    fetch: Callable[[ServiceLayer], Any]
    diff: Callable[[dict[str, Any], dict[str, Any]], list[admin_pb2.SystemEvent]]
    last: dict[str, Any] | None = None


async def _status(layer: ServiceLayer) -> dict[str, Any]:
    return await layer.call("admin_stats")


async def _jobs(layer: ServiceLayer) -> dict[str, Any]:
    jobs = await layer.call("list_jobs", query={"limit": MAX_PAGE})
    return {job.id: msgspec.to_builtins(job) for job in jobs}


async def _flags(layer: ServiceLayer) -> dict[str, Any]:
    return {flag.name: msgspec.to_builtins(flag) for flag in await layer.call("list_flags")}


@dataclass
class _Watch:
    layer: ServiceLayer
    types: set[str]
    service: str
    sources: list[_Source] = field(init=False)

    def __post_init__(self) -> None:
        every = [_Source(frozenset(STATUS_TYPES), _status, _status_events),
                 _Source(frozenset({"job"}), _jobs, _job_events),
                 _Source(frozenset({"feature_flag"}), _flags, _flag_events)]
        self.sources = [source for source in every if source.types & self.types]

    async def poll(self) -> list[admin_pb2.SystemEvent]:
        """Events since the last poll, of the types and service asked for."""
        events = []
        for source in self.sources:
            try:
                now = await source.fetch(self.layer)
            except Problem as exc:
                if exc.status not in _UNAVAILABLE:
                    raise
                continue
            if source.last is not None:
                events += source.diff(source.last, now)
            source.last = now
        return [event for event in events if event.type in self.types
                and (not self.service or event.service == self.service)]


def register(server: GuardedServer, layer: ServiceLayer) -> str:
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(layer), server)
    return admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
