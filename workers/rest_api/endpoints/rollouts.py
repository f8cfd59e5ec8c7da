"""Canary rollouts, proposals' and experiments' alike, from the ``rollouts`` documents the
processor writes at every transition (experiments have no proposal, so this is where they
show)."""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ipc import storage as s
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import (MAX_PAGE, Deps, decode_cursor, encode_cursor,
                                               not_found, scan_documents)
from workers.rest_api.endpoints.optimizations import RolloutView
from workers.rest_api.routes import Call, RouteTable

TAGS = ("rollouts",)


class RolloutPage(Struct, kw_only=True):
    items: list[RolloutView]
    next_cursor: str | None = None


class RolloutQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    service: str | None = None
    phase: str | None = None  # running, promoted, rolled_back
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 50
    cursor: str | None = None


def view(doc_id: str, body: dict[str, Any]) -> RolloutView:
    return msgspec.convert({**body, "id": doc_id}, RolloutView, strict=False)


def install(table: RouteTable, deps: Deps) -> None:
    @table.route("GET", "/v1/rollouts", role=Role.VIEWER, query=RolloutQuery,
                 responses={200: RolloutPage}, tags=TAGS, cached=True)
    async def list_rollouts(call: Call) -> RolloutPage:
        """Rollouts with every transition, filtered by service and phase."""
        q: RolloutQuery = call.query
        prefix = f"rollout:{q.service}:" if q.service else "rollout:"
        cursor = decode_cursor(q.cursor)
        found, after = await scan_documents(
            deps, "rollouts", prefix, cursor if isinstance(cursor, str) else None, q.limit,
            lambda body: q.phase is None or body.get("phase") == q.phase)
        return RolloutPage(items=[view(i, b) for i, b in found],
                           next_cursor=encode_cursor(after) if after else None)

    @table.route("GET", "/v1/rollouts/{id:rollout:[A-Za-z0-9_.:-]+}", role=Role.VIEWER,
                 responses={200: RolloutView}, problems=(404,), tags=TAGS, cached=True)
    async def get_rollout(call: Call) -> RolloutView:
        """One rollout, with the judge's evidence at every transition."""
        try:
            doc = await deps.storage.call(s.DocGet(ns="rollouts", id=call.params["id"]))
        except s.NotFound:
            raise not_found(f"no rollout {call.params['id']!r}") from None
        return view(doc.id, msgspec.json.decode(doc.body))
