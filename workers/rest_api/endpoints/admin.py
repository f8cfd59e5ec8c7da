"""Administration (admin role): the daemon's status, feature flags (the processor's), background
jobs (the storage worker's maintenance: backup, compact, retention), API keys and the audit
trail."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ipc import storage as s
from workers.rest_api import audit
from workers.rest_api.api_keys import ApiKey
from workers.rest_api.auth import Role
from workers.processor.flags import Flag
from workers.rest_api.endpoints.common import (MAX_PAGE, Deps, command_problem, decode_cursor,
                                               encode_cursor, not_found)
from workers.rest_api.problems import Problem
from workers.rest_api.processor_link import CommandFailed
from workers.rest_api.routes import Call, Reply, RouteTable

TAGS = ("admin",)


class NewKey(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    role: Role


class CreatedKey(Struct, kw_only=True):
    """The key itself is shown this once."""

    id: str
    name: str
    role: Role
    created_ms: int
    key: str


class FlagSwitch(Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool


JobKind = Literal["backup", "compact", "retention"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]


class NewJob(Struct, kw_only=True, forbid_unknown_fields=True):
    kind: JobKind
    args: dict[str, Any] = {}  # backup: {"path": absolute path that does not exist}


class Job(Struct, kw_only=True):
    id: str
    kind: JobKind
    args: dict[str, Any]
    by: str
    state: JobState
    message: str  # what it is doing, or why it failed
    result: dict[str, Any] | None = None
    created_ms: int
    started_ms: int = 0  # 0: not yet
    finished_ms: int = 0


class JobQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 50


class AuditQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 100
    cursor: str | None = None


class AuditPage(Struct, kw_only=True):
    items: list[audit.AuditRecord]  # oldest first
    next_cursor: str  # read on from here, also later for new records


async def _command(deps: Deps, service: str, command: str, args: dict[str, Any]) -> Any:
    try:
        return await deps.link.call(service, command, args)
    except CommandFailed as exc:
        raise command_problem(exc) from None


def _who(call: Call) -> str:
    return call.principal.subject if call.principal else "an operator"


def install(table: RouteTable, deps: Deps) -> None:
    admin = Role.ADMIN
    flag_name = "{name:[a-z_.]{1,64}}"
    job_id = "{job_id:j\\.[0-9a-f]{1,32}}"

    @table.route("GET", "/v1/admin/flags", role=admin, responses={200: list[Flag]},
                 tags=TAGS)
    async def list_flags(_call: Call) -> list[Flag]:
        """Every feature flag with what it stops, whether it is on, and who last switched it."""
        return msgspec.convert(await _command(deps, "processor", "flags", {}), list[Flag])

    @table.route("PUT", f"/v1/admin/flags/{flag_name}", role=admin, body=FlagSwitch,
                 responses={200: Flag}, problems=(404,), tags=TAGS)
    async def set_flag(call: Call) -> Flag:
        """Switch a flag on or off; it takes effect at once and is kept across restarts."""
        result = await _command(deps, "processor", "set-flag", {
            "name": call.params["name"], "enabled": call.body.enabled, "by": _who(call)})
        return msgspec.convert(result, Flag)

    @table.route("GET", "/v1/admin/jobs", role=admin, query=JobQuery,
                 responses={200: list[Job]}, tags=TAGS)
    async def list_jobs(call: Call) -> list[Job]:
        """Background jobs, newest first, with their state and progress line."""
        result = await _command(deps, "storage", "jobs", {"limit": call.query.limit})
        return msgspec.convert(result, list[Job])

    @table.route("POST", "/v1/admin/jobs", role=admin, body=NewJob,
                 responses={202: Job}, problems=(409, 422), tags=TAGS)
    async def start_job(call: Call) -> Reply:
        """Queue a maintenance job (jobs run one at a time); follow it with GET
        /v1/admin/jobs/{job_id}."""
        try:
            result = await deps.link.call("storage", "job-start", {
                "kind": call.body.kind, "args": call.body.args, "by": _who(call)})
        except CommandFailed as exc:
            if exc.message.startswith("job queue is full"):
                raise Problem(429, "Too Many Requests", exc.message, retry_after=5,
                              type_suffix="queue-full") from None
            if exc.message.startswith("args"):  # the storage worker names the field
                raise Problem(422, "Unprocessable Content", exc.message, path="args",
                              type_suffix="invalid-input") from None
            raise command_problem(exc) from None
        return Reply(202, msgspec.convert(result, Job))

    @table.route("GET", f"/v1/admin/jobs/{job_id}", role=admin, responses={200: Job},
                 problems=(404,), tags=TAGS)
    async def get_job(call: Call) -> Job:
        """One job."""
        result = await _command(deps, "storage", "job", {"id": call.params["job_id"]})
        return msgspec.convert(result, Job)

    @table.route("POST", f"/v1/admin/jobs/{job_id}/cancel", role=admin,
                 responses={200: Job}, problems=(404, 409), tags=TAGS)
    async def cancel_job(call: Call) -> Job:
        """Cancel a queued or running job (409 once it has finished)."""
        result = await _command(deps, "storage", "job-cancel", {"id": call.params["job_id"]})
        return msgspec.convert(result, Job)

    @table.route("GET", "/v1/admin/stats", role=admin, responses={200: dict[str, Any]},
                 tags=TAGS)
    async def admin_stats(_call: Call) -> Any:
        """The supervisor's status document: every service, its state, health and figures."""
        return await deps.link.request("status")

    @table.route("GET", "/v1/admin/api-keys", role=admin, responses={200: list[ApiKey]},
                 tags=TAGS)
    async def list_api_keys(_call: Call) -> list[ApiKey]:
        """Every API key (never its secret), revoked ones included."""
        return await deps.api_keys.list()

    @table.route("POST", "/v1/admin/api-keys", role=admin, body=NewKey,
                 responses={201: CreatedKey}, tags=TAGS)
    async def create_api_key(call: Call) -> Reply:
        """A new key; the answer is the only place its secret ever appears."""
        record, key = await deps.api_keys.create(call.body.name, call.body.role)
        return Reply(201, CreatedKey(id=record.id, name=record.name, role=record.role,
                                     created_ms=record.created_ms, key=key),
                     headers={"Cache-Control": "no-store"})

    @table.route("DELETE", "/v1/admin/api-keys/{key_id:[a-z2-7]+}", role=admin,
                 responses={200: ApiKey}, problems=(404,), tags=TAGS)
    async def revoke_api_key(call: Call) -> ApiKey:
        """Revoke a key (idempotent); other API processes refuse it within seconds."""
        record = await deps.api_keys.revoke(call.params["key_id"])
        if record is None:
            raise not_found(f"no API key {call.params['key_id']!r}")
        return record

    @table.route("GET", "/v1/admin/audit", role=admin, query=AuditQuery,
                 responses={200: AuditPage}, tags=TAGS)
    async def list_audit(call: Call) -> AuditPage:
        """State-changing calls: who, role, method, path, status, time; oldest first."""
        q: AuditQuery = call.query
        offset = decode_cursor(q.cursor)
        if not isinstance(offset, int) or offset < 0:
            offset = (await deps.storage.call(s.LogInfo(log=audit.AUDIT_LOG))).first_offset
        page = await deps.storage.call(s.LogRead(log=audit.AUDIT_LOG, offset=offset,
                                                 max_records=q.limit))
        return AuditPage(items=[audit.decode(r) for r in page.records],
                         next_cursor=encode_cursor(page.next_offset))
