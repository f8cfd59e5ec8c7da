"""The aiohttp application of the REST API: middlewares, authentication, rate limits, the
route table and the public endpoints, with the connections its handlers share.

Imported by the worker off the event loop: the processor's config code it uses comes with the
processor package, which imports numpy and scipy (~0.7 s).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from aiohttp import web
from limits import RateLimitItemPerSecond
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ipc import storage as s
from ipc.config import Config, RestApiSection
from workers import tracing
from workers.processor.configs import ConfigManager, StorageDocStore
from workers.resilience.ratelimit import SlidingWindowLimiter, TokenBucket
from workers.rest_api import console, sse
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.audit import make_audit
from workers.rest_api.auth import Authenticator, JwtVerifier
from workers.rest_api.endpoints import Deps, build_table
from workers.rest_api.endpoints.common import EVENTS_LOG
from workers.rest_api.endpoints.plumbing import (compression, make_cors, make_limits,
                                                 storage_problems, traced)
from workers.rest_api.openapi import add_docs_routes
from workers.rest_api.problems import problem_middleware, request_id_middleware
from workers.rest_api.processor_link import ControlLink
from workers.rest_api.response_cache import ResponseCache
from workers.rest_api.routes import Limiter
from workers.storage_client import StorageClient

API_VERSION = "1.0.0"
DESCRIPTION = ("Findings, optimizations, rollouts and versioned service configs of the LLM "
               "Auto Optimizer. Errors are RFC 9457 problem details.")


def make_limiter(section: RestApiSection) -> Limiter | None:
    """Per credential: a token bucket in memory, or a window of ``burst`` requests per
    ``burst / rate`` seconds in Redis (the same sustained rate, shared)."""
    if section.rate_limit_per_s <= 0:
        return None
    if not section.rate_limit_storage:
        return TokenBucket(section.rate_limit_per_s, section.rate_limit_burst)
    seconds = max(1, math.ceil(section.rate_limit_burst / section.rate_limit_per_s))
    item = RateLimitItemPerSecond(section.rate_limit_burst, seconds)
    return SlidingWindowLimiter(item, section.rate_limit_storage, namespace="rest_api",
                                exact=False)


@dataclass
class Server:
    app: web.Application
    deps: Deps
    limiter: Limiter | None
    jwt: bool

    async def close(self) -> None:
        """After the runner's cleanup: the connections the handlers used."""
        if isinstance(self.limiter, SlidingWindowLimiter):
            await self.limiter.close()
        await self.deps.link.close()
        await self.deps.storage.close()


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "service": "rest_api", "pid": os.getpid()})


async def metrics(_request: web.Request) -> web.Response:
    """This process's series; the supervisor's /metrics aggregates every process."""
    return web.Response(body=generate_latest(REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_deps(config: Config, section: RestApiSection, runtime_dir: str) -> Deps:
    """The connections the operations use (one set per process, REST or gRPC)."""
    storage = StorageClient(runtime_dir)
    return Deps(config=config, section=section, storage=storage,
                link=ControlLink(runtime_dir),
                configs=ConfigManager(StorageDocStore(storage, "configs")),
                api_keys=ApiKeyStore(storage))


def make_authenticator(deps: Deps) -> Authenticator:
    """API keys, and JWTs when ``[rest_api.jwt] issuer`` is set."""
    jwt = deps.section.jwt
    return Authenticator(deps.api_keys, JwtVerifier(jwt) if jwt.issuer else None)


def build(config: Config, section: RestApiSection, runtime_dir: str) -> Server:
    deps = make_deps(config, section, runtime_dir)
    storage = deps.storage
    limiter = make_limiter(section)
    authenticator = make_authenticator(deps)
    app = web.Application(client_max_size=section.max_body_kb * 1024, middlewares=[
        *([traced] if tracing.enabled() else []), request_id_middleware,
        make_cors(section.cors_origins), compression,
        make_limits(section.max_in_flight, section.request_timeout_s),
        make_audit(storage, authenticator), problem_middleware, storage_problems])

    async def ready(_request: web.Request) -> web.Response:
        """Ready when storage answers: every operation needs it."""
        try:
            await storage.call(s.LogInfo(log=EVENTS_LOG), timeout=2.0)
        except s.StorageFailure as exc:
            return web.json_response({"ready": False, "reason": f"storage: {exc}"},
                                     status=503, headers={"Retry-After": "1"})
        return web.json_response({"ready": True})

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    table = build_table(deps)
    sse.install(table, deps)
    table.install(app, authenticator, limiter, ResponseCache(section.cache_ttl_s))
    console.install(app)  # the web console at /ui: its static files, public
    add_docs_routes(app, table, title="LLM Auto Optimizer API", version=API_VERSION,
                    description=DESCRIPTION)
    return Server(app=app, deps=deps, limiter=limiter, jwt=authenticator.jwt is not None)
