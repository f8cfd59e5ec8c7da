"""What every RPC goes through before and after its servicer: a request id, authentication, the
rate limit, logging, metrics and error mapping.

``GuardedServer`` wraps each method handler in ``CallGuard`` once, when the services register,
rather than through a ``grpc.aio`` server interceptor, which runs a coroutine and builds a new
handler on every call (a measurable share of a small call's cost).

* **Request id**: the client's ``x-request-id`` if it is a plain short id, else a new one (this
  process's random prefix and a counter); sent back in the trailing metadata of every call,
  also in the initial metadata of a stream (at once, before its first message), and in every
  log line about the call. A unary call does not send it early: sending initial metadata apart
  is one more completion-queue operation, ~10 % of a small call.
* **Authentication**: the REST API's credentials and rules (``authorization: Bearer <API key or
  JWT>`` or ``x-api-key``), or, on a mutual-TLS port without such metadata, the verified client
  certificate's common name with the role ``[grpc_api.tls] client_roles`` gives it. The
  standard health service, reflection and ``HealthService`` need no credential. The caller is
  left in ``PRINCIPAL`` for the servicers; roles are checked per operation by the service layer.
* **Rate limit**: the REST API's budget per API key or token subject (429 there,
  RESOURCE_EXHAUSTED with ``RetryInfo`` here).
* **Logging**: each call with its duration and request id at DEBUG; failures at INFO
  (the client's) or ERROR (ours, with the traceback).
* **Errors**: ``Problem`` becomes its status (``errors.problem_status``); anything unexpected is
  logged with its traceback and answered INTERNAL with the request id only.
* **Metrics**: RPCs by method and code, latency by method, active streams.
* **Tracing** (when on): a server span per call, continuing the client's trace when its
  metadata carries a ``traceparent``.
* **Encoded answers**: a servicer may answer ``bytes``, a message it wrote as wire bytes
  itself (the event stream does); they go out as they are instead of being serialized.
"""
from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from workers import tracing
from workers.grpc_api.errors import internal_status, problem_status, status_of
from workers.rest_api.auth import AuthError, AuthFailure, Authenticator, Principal, Role
from workers.rest_api.problems import Problem
from workers.rest_api.routes import Limiter, spend

log = logging.getLogger("workers.grpc_api")

RPCS = Counter("grpc_api_rpcs", "gRPC calls answered, by method and status code.",
               ["method", "code"])
LATENCY = Histogram("grpc_api_rpc_seconds", "gRPC call duration (streams: their whole life), "
                    "by method.", ["method"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
ACTIVE_STREAMS = Gauge("grpc_api_active_streams", "gRPC streams open now.",
                       multiprocess_mode="livesum")

PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "grpc_principal", default=None)
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("grpc_request_id",
                                                                 default="")
METHOD: contextvars.ContextVar[str] = contextvars.ContextVar("grpc_method", default="")
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.",
                   "/llm_optimizer.v1.HealthService/")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Codes answering the server's own failure: they fail the call's span (OpenTelemetry's gRPC
# conventions); the other codes are the caller's doing.
SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


def current_principal() -> Principal | None:
    return PRINCIPAL.get()


def certificate_principal(context: grpc.aio.ServicerContext,
                          roles: Mapping[str, Role]) -> Principal | None:
    """The verified client certificate's common name, on a mutual-TLS port."""
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    if not names:
        return None
    subject = names[0].decode("utf-8", "replace")
    return Principal(subject=subject, role=roles.get(subject, Role.VIEWER), via="mtls")


class GuardedServer:
    """The server as the services' ``add_*_to_server`` functions (generated, health, reflection)
    see it: every method handler they register is wrapped by ``guard`` first. Only the two
    registration calls exist here, so a registration path this does not know fails at start
    instead of serving an unguarded method."""

    def __init__(self, server: grpc.aio.Server, guard: CallGuard) -> None:
        self.server = server
        self.guard = guard

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_GuardedHandlers(handler, self.guard) for handler in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(service, {
            name: self.guard.wrap(f"/{service}/{name}", handler)
            for name, handler in handlers.items()})


class _GuardedHandlers(grpc.GenericRpcHandler):
    """A generic handler whose answers are wrapped, once per method (a method's handler does not
    change; unknown methods are not remembered)."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: CallGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        wrapped = self.wrapped.get(details.method)
        if wrapped is None:
            handler = self.inner.service(details)
            if handler is None:
                return None
            wrapped = self.wrapped[details.method] = self.guard.wrap(details.method, handler)
        return wrapped


class CallGuard:
    def __init__(self, authenticator: Authenticator, limiter: Limiter | None,
                 client_roles: Mapping[str, Role]) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.client_roles = dict(client_roles)
        self.id_prefix = uuid.uuid4().hex[:16]  # made in the worker: one per process
        self.ids = itertools.count(1)

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with every call of the method ``name`` guarded."""
        public = name.startswith(PUBLIC_PREFIXES)
        method = _Method(name)
        if handler.response_serializer is not None:
            handler = handler._replace(
                response_serializer=_passing_bytes(handler.response_serializer))
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method,
                                                            public))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method,
                                                             public))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method,
                                                              public))
        return handler._replace(stream_stream=self._stream(handler.stream_stream, method,
                                                           public))

    async def _admit(self, context: grpc.aio.ServicerContext, method: _Method,
                     metadata: dict[str, str], public: bool, stream: bool) -> None:
        """Request id, caller and budget, before the servicer runs."""
        given = metadata.get("x-request-id", "")
        rid = given if _SANE_REQUEST_ID.fullmatch(given) else \
            f"{self.id_prefix}{next(self.ids):08x}"
        REQUEST_ID.set(rid)
        METHOD.set(method.name)
        PRINCIPAL.set(None)
        context.set_trailing_metadata((("x-request-id", rid),))
        if stream:
            await context.send_initial_metadata((("x-request-id", rid),))
        if public:
            return
        if "authorization" in metadata or "x-api-key" in metadata:
            principal = await self.authenticator.authenticate(metadata)
        else:
            principal = certificate_principal(context, self.client_roles)
            if principal is None:
                raise AuthError(401, AuthFailure.MISSING, "send metadata 'authorization: "
                                "Bearer <API key or token>' or 'x-api-key'")
        PRINCIPAL.set(principal)
        if self.limiter is not None:
            await spend(self.limiter, principal)

    async def _fail(self, context: grpc.aio.ServicerContext, method: _Method,
                    exc: BaseException, span: Any) -> grpc.StatusCode:
        """Answer ``exc`` as a status (this raises AbortError, which ends the call)."""
        if isinstance(exc, Problem):
            status = problem_status(exc)
            log.info("%s %s: %s (request %s)", method.name, status.code.name, exc.detail,
                     REQUEST_ID.get())
        elif isinstance(exc, NotImplementedError):  # the generated base servicer's answer
            status = status_of(grpc.StatusCode.UNIMPLEMENTED,
                               f"{method.name} is not implemented")
        else:
            status = internal_status(REQUEST_ID.get())
            log.error("%s failed (request %s)", method.name, REQUEST_ID.get(), exc_info=exc)
        method.outcome(span, status.code.name)
        await context.abort_with_status(status._replace(trailing_metadata=(
            *status.trailing_metadata, ("x-request-id", REQUEST_ID.get()))))
        return status.code  # not reached: abort raises

    async def _failed(self, context: grpc.aio.ServicerContext, method: _Method,
                      exc: BaseException, span: Any, started: float) -> None:
        """Count a call that ``exc`` ended, answering it as a status unless gRPC already
        ended it (an abort, a cancellation); its duration is observed in any case."""
        try:
            if isinstance(exc, grpc.aio.AbortError):
                method.outcome(span, _code(context))
            elif isinstance(exc, asyncio.CancelledError):  # the deadline passed, the client left
                method.outcome(span, "CANCELLED")
            elif isinstance(exc, Exception):
                await self._fail(context, method, exc, span)  # raises AbortError
        finally:
            _ended(method, started)

    # Unary calls and streams share _admit, _failed and _succeeded around their bodies; the
    # bodies are written out in each, not in a context manager, which would cost a generator
    # and two more awaits on every call.

    def _unary(self, behaviour: Callable[..., Awaitable[Any]], method: _Method,
               public: bool) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = _metadata(context)
            started = time.perf_counter()
            with tracing.server_span(method.span_name, metadata, method.span_attributes,
                                     exception_fails=False) as span:
                try:
                    await self._admit(context, method, metadata, public, stream=False)
                    answer = await behaviour(request, context)
                except BaseException as exc:
                    await self._failed(context, method, exc, span, started)
                    raise
                _succeeded(method, span, started)
                return answer

        return unary

    def _stream(self, behaviour: Callable[..., AsyncIterator[Any]], method: _Method,
                public: bool) -> Callable[..., AsyncIterator[Any]]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metadata = _metadata(context)
            started = time.perf_counter()
            ACTIVE_STREAMS.inc()
            try:
                with tracing.server_span(method.span_name, metadata, method.span_attributes,
                                         exception_fails=False) as span:
                    try:
                        await self._admit(context, method, metadata, public, stream=True)
                        async for item in behaviour(request, context):
                            yield item
                    except BaseException as exc:
                        await self._failed(context, method, exc, span, started)
                        raise
                    _succeeded(method, span, started)
            finally:
                ACTIVE_STREAMS.dec()

        return stream


def _succeeded(method: _Method, span: Any, started: float) -> None:
    method.outcome(span, "OK")
    _ended(method, started)


def _ended(method: _Method, started: float) -> None:
    """A call's duration, observed and logged."""
    took = time.perf_counter() - started
    method.latency.observe(took)
    log.debug("%s %.1f ms (request %s)", method.name, took * 1000, REQUEST_ID.get())


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """``serialize``, except that an answer already in wire bytes is sent as it is."""
    def serializer(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return serializer


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata by name, lower case as gRPC sends it (binary ``-bin`` values
    are left out; of a repeated name, the last)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


class _Method:
    """One RPC's name, span attributes and metric series, made once rather than per call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.span_name = name[1:]
        service, _, short = self.span_name.partition("/")
        self.span_attributes = {"rpc.system": "grpc", "rpc.service": service,
                                "rpc.method": short}
        self.latency = LATENCY.labels(name)
        self.counted: dict[str, Any] = {}  # status code name -> its RPCS series

    def outcome(self, span: Any, code: str) -> None:
        """Count a call's status code, and note it on the call's span."""
        counter = self.counted.get(code)
        if counter is None:
            counter = self.counted[code] = RPCS.labels(self.name, code)
        counter.inc()
        status = grpc.StatusCode[code]
        span.set_attribute("rpc.grpc.status_code", status.value[0])
        if status in SERVER_ERRORS:
            tracing.fail(span, code)


def _code(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
