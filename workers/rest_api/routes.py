"""Every REST operation declared once: the route table serves it and documents it.

A ``Route`` says method, path, handler, the role needed (None: public), the msgspec types of the
body, the query and each answer. ``RouteTable.install`` registers the routes in an aiohttp app
wrapped so that, before the handler runs, the caller is authenticated and authorized, held to its
rate limit, and the body and query are decoded into the declared types (a 422 problem naming the
field otherwise); the handler's result is encoded with msgspec. ``openapi`` builds the document
from the same table, so code and documentation cannot drift apart.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from workers.resilience.ratelimit import (LimiterUnavailable, RateLimited, SlidingWindowLimiter,
                                          TokenBucket)
from workers.rest_api.auth import PRINCIPAL_KEY, Authenticator, Principal, Role, authorize
from workers.rest_api.problems import Problem, invalid_input
from workers.rest_api.response_cache import ResponseCache

log = logging.getLogger("workers.rest_api")

# {name} or {name:regex}; the regex may hold one level of braces ({1,128}), as in aiohttp
_PATH_PARAM = re.compile(
    r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<regex>(?:[^{}]|\{[^{}]*\})*))?\}")
_SEQUENCE_TYPES = (msgspec.inspect.ListType, msgspec.inspect.SetType,
                   msgspec.inspect.FrozenSetType, msgspec.inspect.VarTupleType)


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: the decoded input and who is asking."""

    request: web.Request | None  # None when called without HTTP (workers.rest_api.operations)
    principal: Principal | None
    params: Mapping[str, str]  # path parameters
    body: Any = None
    query: Any = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler's answer when the status is not the route's first declared one, or headers
    are needed; a handler may also return the body alone or a ready aiohttp response."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: Role | None
    responses: Mapping[int, Any]  # status -> msgspec type of the body, None for no body
    body: Any = None
    query: type[msgspec.Struct] | None = None
    problems: tuple[int, ...] = ()  # error statuses besides those every route may answer
    summary: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    cached: bool = False  # a GET whose answers may be reused for the cache's TTL

    @property
    def operation_id(self) -> str:
        return self.handler.__name__

    @property
    def path_params(self) -> list[str]:
        return [m["name"] for m in _PATH_PARAM.finditer(self.path)]

    @property
    def path_patterns(self) -> dict[str, str]:
        """The regular expression each constrained path parameter must match (aiohttp's
        ``{name:regex}``): the router answers 404 for a value that does not."""
        return {m["name"]: m["regex"] for m in _PATH_PARAM.finditer(self.path) if m["regex"]}

    @property
    def openapi_path(self) -> str:
        """The path without aiohttp's regular expressions: ``/keys/{id:[a-z]+}`` is
        ``/keys/{id}``."""
        return _PATH_PARAM.sub(lambda m: "{" + m["name"] + "}", self.path)


Limiter = TokenBucket | SlidingWindowLimiter


class RouteTable:
    def __init__(self, routes: tuple[Route, ...] = ()) -> None:
        self.routes: list[Route] = []
        for route in routes:
            self.add(route)

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def add(self, route: Route) -> Route:
        if not route.responses:
            raise ValueError(f"{route.method} {route.path}: declare at least one response")
        for other in self.routes:
            if other.operation_id == route.operation_id:
                raise ValueError(f"two routes share the handler name {route.operation_id!r}")
            if (other.method, _PATH_PARAM.sub("{}", other.path)) == \
                    (route.method, _PATH_PARAM.sub("{}", route.path)):
                raise ValueError(f"{route.method} {route.path} is declared twice")
        self.routes.append(route)
        return route

    def route(self, method: str, path: str, *, role: Role | None,
              responses: Mapping[int, Any], body: Any = None,
              query: type[msgspec.Struct] | None = None, problems: tuple[int, ...] = (),
              summary: str = "", description: str = "", tags: tuple[str, ...] = (),
              cached: bool = False) -> Callable[[Handler], Handler]:
        """Decorator form of ``add``; the summary defaults to the docstring's first line."""
        def register(handler: Handler) -> Handler:
            doc = (handler.__doc__ or "").strip()
            self.add(Route(method=method.upper(), path=path, handler=handler, role=role,
                           responses=responses, body=body, query=query, problems=problems,
                           summary=summary or doc.partition("\n")[0],
                           description=description or doc, tags=tags, cached=cached))
            return handler
        return register

    def install(self, app: web.Application, authenticator: Authenticator,
                limiter: Limiter | None = None, cache: ResponseCache | None = None) -> None:
        """Serve every route; ``cache`` keeps the answers of the ``cached`` ones and is
        cleared by every state-changing call."""
        for route in self.routes:
            app.router.add_route(route.method, route.path,
                                 _serve(route, authenticator, limiter, cache),
                                 name=route.operation_id)


def _serve(route: Route, authenticator: Authenticator, limiter: Limiter | None,
           cache: ResponseCache | None
           ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    body_decoder = msgspec.json.Decoder(route.body) if route.body is not None else None
    default_status = next(iter(route.responses))
    reuse = cache if route.cached and route.method == "GET" else None
    invalidate = cache if route.method not in ("GET", "HEAD") else None

    async def serve(request: web.Request) -> web.StreamResponse:
        principal = None
        if route.role is not None:
            principal = await authenticator.authenticate(request.headers)
            authorize(principal, route.role)
            request[PRINCIPAL_KEY] = principal
            if limiter is not None:
                await spend(limiter, principal)
        if reuse is not None and (hit := reuse.get(request.path_qs)) is not None:
            return web.Response(status=hit.status, body=hit.body,
                                content_type="application/json")
        query = _decode_query(request, route.query) if route.query is not None else None
        body = await _decode_body(request, body_decoder) if body_decoder is not None else None
        try:
            result = await route.handler(Call(request=request, principal=principal,
                                              params=dict(request.match_info), body=body,
                                              query=query))
        finally:
            if invalidate is not None:  # even a failed write may have changed something
                invalidate.clear()
        if isinstance(result, web.StreamResponse):
            return result
        reply = result if isinstance(result, Reply) else Reply(default_status, result)
        if reply.status not in route.responses:  # a handler bug, not the client's
            raise RuntimeError(f"{route.operation_id} answered the undeclared {reply.status}")
        if route.responses[reply.status] is None:
            return web.Response(status=reply.status, headers=reply.headers)
        encoded = msgspec.json.encode(reply.body)
        if reuse is not None and not reply.headers:
            reuse.put(request.path_qs, reply.status, encoded, len(encoded))
        return web.Response(status=reply.status, body=encoded,
                            content_type="application/json", headers=reply.headers)

    serve.__name__ = route.operation_id
    return serve


async def spend(limiter: Limiter, principal: Principal) -> None:
    """One request off the principal's budget; 429 ``Problem`` when it is spent."""
    try:
        if isinstance(limiter, TokenBucket):
            limiter.acquire(principal.rate_key)
        else:
            await limiter.acquire(principal.rate_key)
    except RateLimited as exc:
        raise Problem(429, "Too Many Requests", "request rate limit exceeded for this "
                      "credential", type_suffix="rate-limited",
                      retry_after=max(1, math.ceil(exc.retry_after))) from None
    except LimiterUnavailable as exc:
        # The caller is authenticated: letting it over-spend while Redis is away is better
        # than refusing the whole API.
        log.warning("rate limiter unavailable, request admitted: %s", exc)


@functools.cache
def _repeatable(kind: type[msgspec.Struct]) -> frozenset[str]:
    """The query parameters of ``kind`` that may repeat (lists); once per type, since
    inspecting a type costs more than serving a request."""
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    return frozenset(f.encode_name for f in info.fields if isinstance(f.type, _SEQUENCE_TYPES))


def _decode_query(request: web.Request, kind: type[msgspec.Struct]) -> Any:
    many = _repeatable(kind)
    raw = {name: request.query.getall(name) if name in many else request.query[name]
           for name in request.query}
    try:
        # strict=False: query values are strings, converted to the declared ints, bools...
        return msgspec.convert(raw, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid_input(exc, "query") from None


async def _decode_body(request: web.Request, decoder: msgspec.json.Decoder) -> Any:
    if request.content_type != "application/json":
        raise Problem(415, "Unsupported Media Type", "send the body as application/json, not "
                      f"{request.content_type or 'nothing'}", type_suffix="media-type")
    raw = await request.read()  # over client_max_size: 413, made a problem by the middleware
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_input(exc) from None
