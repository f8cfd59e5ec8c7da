"""What the gRPC servicers share: the service layer (the REST route table's operations, called by
operation id with the caller the call guard authenticated), the connections, and the audit
trail of state-changing calls."""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from workers.grpc_api.interceptor import METHOD, REQUEST_ID, current_principal
from workers.rest_api import audit
from workers.rest_api.endpoints.common import Deps
from workers.rest_api.operations import Operations
from workers.rest_api.problems import Problem


log = logging.getLogger("workers.grpc_api")
M = TypeVar("M")


MAX_CONVERSIONS = 1024


@dataclass
class ServiceLayer:
    deps: Deps
    operations: Operations
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # (id(result), converter) -> (result, message): see converted
    conversions: dict[tuple[int, Callable[[Any], Any]], tuple[Any, Any]] = field(
        default_factory=dict)

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Something a servicer opened (an event-log producer) to close when the API stops."""
        self.closers.append(closer)

    async def close(self) -> None:
        for closer in self.closers:
            try:
                await closer()
            except Exception:
                log.exception("closing %r failed", closer)
        await self.deps.link.close()
        await self.deps.storage.close()

    def converted(self, result: Any, convert: Callable[[Any], M]) -> M:
        """``convert(result)`` for a result the operations reuse (a cached read: the same object
        for ``cache_ttl_s``), converted once rather than on every call. Results are not changed
        once made, so one object always converts to the same message; the message is only
        serialized by gRPC, never changed either."""
        key = (id(result), convert)
        hit = self.conversions.get(key)
        if hit is not None and hit[0] is result:  # the object is kept, so its id is not reused
            return hit[1]
        message = convert(result)
        if len(self.conversions) >= MAX_CONVERSIONS:
            self.conversions.clear()
        self.conversions[key] = (result, message)
        return message

    async def call(self, operation_id: str, *, params: Mapping[str, str] | None = None,
                   query: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        """The operation's answer as the REST API would give it (its body), for the current
        caller; state-changing ones are recorded in the audit trail as method ``GRPC`` with
        the RPC's full name as path."""
        route = self.operations.route(operation_id)
        status = next(iter(route.responses))
        try:
            return await self.operations.call(operation_id, current_principal(),
                                              params=params, query=query, body=body)
        except Problem as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            if route.method in audit.WRITES:
                await audit.record(self.deps.storage, method="GRPC", path=METHOD.get(),
                                   status=status, request_id=REQUEST_ID.get(),
                                   principal=current_principal())
