"""The API's operations without HTTP: the gRPC API calls the very handlers the REST route table
declares, by operation id, so that both transports share one service layer (same checks, same
answers, same errors) and no rule is written twice.

``Operations.call`` does what the route table's HTTP wrapper does around a handler, minus
HTTP: authorize the caller's role, check the path parameters against the route's patterns,
convert the plain query and body into the declared msgspec
types (a 422 ``Problem`` naming the field otherwise), run the handler, and hand back its result
(the body of a ``Reply``). Authentication and rate limits are the transport's, before this.

With a ``ResponseCache``, the results of the routes the table marks ``cached`` are reused for its
TTL, as the REST API reuses their encoded answers (after the role check, which always runs),
and every state-changing call clears it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from workers.rest_api.auth import Principal, authorize
from workers.rest_api.problems import Problem, invalid_input
from workers.rest_api.response_cache import ResponseCache
from workers.rest_api.routes import Call, Reply, Route, RouteTable


class UnknownOperation(LookupError):
    pass


class Operations:
    def __init__(self, table: RouteTable, cache: ResponseCache | None = None) -> None:
        self.routes: dict[str, Route] = {route.operation_id: route for route in table}
        self.patterns: dict[str, list[tuple[str, re.Pattern[str]]]] = {
            route.operation_id: [(name, re.compile(pattern))
                                 for name, pattern in route.path_patterns.items()]
            for route in table}
        self.cache = cache

    def route(self, operation_id: str) -> Route:
        try:
            return self.routes[operation_id]
        except KeyError:
            raise UnknownOperation(f"no operation {operation_id!r}") from None

    async def call(self, operation_id: str, principal: Principal | None, *,
                   params: Mapping[str, str] | None = None, query: Mapping[str, Any] | None = None,
                   body: Any = None) -> Any:
        """The handler's answer for these inputs; ``Problem`` for what a client got wrong."""
        route = self.route(operation_id)
        if route.role is not None:
            if principal is None:
                raise PermissionError(f"{operation_id} needs a caller")
            authorize(principal, route.role)
        params = dict(params or {})
        for name, pattern in self.patterns[operation_id]:  # what the HTTP router checks
            value = params.get(name, "")
            if not pattern.fullmatch(value):
                raise Problem(422, "Unprocessable Content", f"{name} {value!r} does not match "
                              f"{pattern.pattern}", path=name, type_suffix="invalid-input")
        reuse = self.cache if route.cached and route.method == "GET" else None
        key = ""
        if reuse is not None:
            key = f"{operation_id} {sorted(params.items())} {sorted((query or {}).items())}"
            if (hit := reuse.get(key)) is not None:
                return hit.body
        decoded_query = _convert(query or {}, route.query, "query") if route.query else None
        decoded_body = _convert(body, route.body, "body") if route.body is not None else None
        try:
            result = await route.handler(Call(request=None, principal=principal,
                                              params=params, body=decoded_body,
                                              query=decoded_query))
        finally:
            if self.cache is not None and route.method not in ("GET", "HEAD"):
                self.cache.clear()
        if isinstance(result, Reply):
            if result.headers:  # an answer with headers (a redirect, a retry hint) is not kept
                return result.body
            result = result.body
        if reuse is not None:
            reuse.put(key, 200, result)
        return result


def _convert(value: Any, kind: Any, where: str) -> Any:
    try:
        return msgspec.convert(value, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid_input(exc, where) from None
