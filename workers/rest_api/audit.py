"""The audit trail: every state-changing call (who, role, method, path, status, time) of the
REST and gRPC APIs, appended to the storage log ``rest-audit`` once it has been answered, and
read back by ``GET /v1/admin/audit``. Only the route and the caller's identity are kept: never
bodies nor credentials. A call refused with 403 is recorded with the caller too (the route
table keeps the principal only once authorized, so it is authenticated again here, from the
cache). A failure to record is logged and does not fail the call that was made.
"""
from __future__ import annotations

import logging
import time

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ipc import storage as s
from workers.rest_api.auth import PRINCIPAL_KEY, AuthError, Authenticator, Principal
from workers.rest_api.problems import request_id
from workers.storage_client import StorageClient

log = logging.getLogger("workers.rest_api")
AUDIT_LOG = "rest-audit"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AuditRecord(msgspec.Struct, kw_only=True):
    time_ms: int
    method: str
    path: str
    status: int
    request_id: str
    subject: str | None = None  # None: the caller was not authenticated
    role: str | None = None
    via: str | None = None
    key_id: str | None = None
    offset: int | None = None  # filled in when read back


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AuditRecord)


def decode(record: s.LogRecord) -> AuditRecord:
    return msgspec.structs.replace(_decoder.decode(record.payload), offset=record.offset)


async def _caller(request: web.Request, status: int,
                  authenticator: Authenticator) -> Principal | None:
    principal = request.get(PRINCIPAL_KEY)
    if principal is None and status == 403:
        try:
            principal = await authenticator.authenticate(request.headers)
        except AuthError:
            return None
    return principal


async def record(storage: StorageClient, *, method: str, path: str, status: int,
                 request_id: str, principal: Principal | None) -> None:
    """Append one state-changing call to the trail (REST, or gRPC with the RPC's full name as
    path); a failure is logged, never raised."""
    entry = AuditRecord(time_ms=int(time.time() * 1000), method=method, path=path,
                        status=status, request_id=request_id)
    if principal is not None:
        entry = msgspec.structs.replace(entry, subject=principal.subject,
                                        role=principal.role.value, via=principal.via,
                                        key_id=principal.key_id)
    try:
        await storage.append(AUDIT_LOG, [_encoder.encode(entry)])
    except s.StorageFailure as exc:
        log.error("audit record of %s %s (request %s) not stored: %s", method, path,
                  request_id, exc)


def make_audit(storage: StorageClient, authenticator: Authenticator) -> Middleware:
    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.method in WRITES and request.path.startswith("/v1/"):
            await record(storage, method=request.method, path=request.path,
                         status=response.status, request_id=request_id(request),
                         principal=await _caller(request, response.status, authenticator))
        return response

    return audit
