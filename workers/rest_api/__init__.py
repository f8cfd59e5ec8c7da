"""The REST API service (aiohttp). For now it serves GET /health on its listen address; the API
itself comes with the REST API issue."""
from __future__ import annotations

import os
from typing import Any

from aiohttp import web

from ipc.config import RestApiSection, split_listen
from workers.runtime import Worker


class RestApiWorker(Worker):
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        section = self.context.section
        assert isinstance(section, RestApiSection)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/health", self.health_handler)
        # The supervisor owns signals; several processes share the port with SO_REUSEPORT.
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        host, port = split_listen(section.listen)
        site = web.TCPSite(self.runner, host, port, reuse_port=section.processes > 1)
        await site.start()
        self.log.info("REST API on http://%s", section.listen)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()  # finishes in-flight requests
            self.runner = None

    async def health_handler(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": "rest_api", "pid": os.getpid()})

    def status(self) -> dict[str, Any]:
        return {"listen": self.context.section.listen, "serving": self.runner is not None}
