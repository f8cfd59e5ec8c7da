"""The REST API service (aiohttp): the operations of ``endpoints`` behind authentication, rate
limits, bounds on in-flight requests and time, CORS, compression, an audit trail and metrics;
``/health``, ``/ready``, ``/metrics``, ``/openapi.json`` and ``/docs`` are public.

Each process serves the same port (SO_REUSEPORT when ``processes`` > 1) with its own storage
and control-socket connections, API-key cache and in-memory rate-limit buckets
(``rate_limit_storage = "redis://..."`` shares the budgets between processes and replicas).
This module stays light: the application is imported in ``start``, in a thread, because it
pulls in numpy and scipy (through the processor's config code) and the supervisor expects a
heartbeat within ``heartbeat_timeout`` of the fork.
"""
from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ipc.config import RestApiSection, split_listen
from workers.runtime import Worker

if TYPE_CHECKING:
    from workers.rest_api.endpoints.server import Server


class RestApiWorker(Worker):
    runner: web.AppRunner | None = None
    server: Server | None = None

    async def start(self) -> None:
        section = self.context.section
        assert isinstance(section, RestApiSection)
        module = await asyncio.to_thread(importlib.import_module,
                                         "workers.rest_api.endpoints.server")
        self.server = module.build(self.context.config, section, self.context.runtime_dir)
        # The supervisor owns signals; several processes share the port with SO_REUSEPORT.
        self.runner = web.AppRunner(self.server.app, handle_signals=False, access_log=None,
                                    shutdown_timeout=5.0)
        await self.runner.setup()
        host, port = split_listen(section.listen)
        site = web.TCPSite(self.runner, host, port, reuse_port=section.processes > 1)
        await site.start()
        auth = "API keys and JWTs" if self.server.jwt else "API keys"
        self.log.info("REST API on http://%s (%s)", section.listen, auth)

    async def stop(self) -> None:
        if self.server is None:
            return
        from workers.rest_api import sse
        await sse.close_streams(self.server.deps)
        if self.runner is not None:
            await self.runner.cleanup()  # finishes in-flight requests
            self.runner = None
        await self.server.close()
        self.server = None

    def status(self) -> dict[str, Any]:
        return {"listen": self.context.section.listen, "serving": self.runner is not None}
