"""Administration: the daemon's status, API keys and the audit trail (admin role)."""
from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

from ipc import storage as s
from workers.rest_api import audit
from workers.rest_api.api_keys import ApiKey
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import (MAX_PAGE, Deps, decode_cursor, encode_cursor,
                                               not_found)
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


class AuditQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 100
    cursor: str | None = None


class AuditPage(Struct, kw_only=True):
    items: list[audit.AuditRecord]  # oldest first
    next_cursor: str  # read on from here, also later for new records


def install(table: RouteTable, deps: Deps) -> None:
    admin = Role.ADMIN

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
