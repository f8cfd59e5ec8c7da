"""``GET /v1/whoami``: who the credential is and what its role allows, so that a client (the
web console) shows only the actions the caller may take. Any valid credential may ask."""
from __future__ import annotations

from typing import Literal

from msgspec import Struct

from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import Deps
from workers.rest_api.routes import Call, RouteTable


class Identity(Struct, kw_only=True):
    subject: str
    role: Role
    via: Literal["api_key", "jwt", "mtls"]
    key_id: str | None = None
    roles: list[Role]  # every role this one includes, lowest first


def install(table: RouteTable, _deps: Deps) -> None:
    @table.route("GET", "/v1/whoami", role=Role.VIEWER, responses={200: Identity},
                 tags=("session",))
    async def whoami(call: Call) -> Identity:
        """The caller's subject, role and how it authenticated; ``roles`` lists every role
        its role includes."""
        principal = call.principal
        assert principal is not None, "the route needs a credential"
        return Identity(subject=principal.subject, role=principal.role, via=principal.via,
                        key_id=principal.key_id,
                        roles=[r for r in Role if principal.role >= r])
