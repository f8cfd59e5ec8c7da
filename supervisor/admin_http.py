"""Admin HTTP on 127.0.0.1:9090: /metrics, /health, /ready.

It runs in one thread of its own and only reads the immutable snapshot the main loop publishes,
so it never touches live supervision state.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ipc.config import split_listen
from supervisor.metrics import CONTENT_TYPE, render_metrics

log = logging.getLogger("optimizerd.admin")


class AdminServer:
    def __init__(self, listen: str, snapshot: Callable[[], dict[str, Any]], multiproc_dir: str):
        host, port = split_listen(listen)
        self.listen = listen
        owner = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "optimizerd"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.handle(self)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("admin %s - %s", self.address_string(), fmt % args)

        server_cls = type("Server", (ThreadingHTTPServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
            "daemon_threads": True})
        self.server = server_cls((host, port), Handler)
        self.snapshot, self.multiproc_dir = snapshot, multiproc_dir
        self.thread = threading.Thread(target=self.server.serve_forever, name="admin-http",
                                       kwargs={"poll_interval": 1.0}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("admin HTTP on http://%s (/metrics /health /ready)", self.listen)

    def close(self) -> None:
        """Stop serving now: shutdown() waits for the serving loop's next wake-up, so wake it
        with a connection instead of waiting out the poll interval."""
        stopper = threading.Thread(target=self.server.shutdown, name="admin-http-stop")
        stopper.start()
        try:
            socket.create_connection(self.server.server_address[:2], timeout=0.5).close()
        except OSError as exc:
            log.debug("waking the admin server: %s", exc)
        stopper.join()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self.reply(request, 200, render_metrics(self.multiproc_dir, self.snapshot),
                           CONTENT_TYPE)
            elif path in ("/health", "/ready"):
                doc = self.snapshot()
                ready = doc["supervisor"]["ready"]
                if path == "/ready":
                    code, body = (200 if ready else 503), {"ready": ready}
                else:
                    code = 200 if doc["supervisor"]["state"] != "stopping" else 503
                    body = {"status": "ok" if ready else "degraded",
                            "supervisor": doc["supervisor"],
                            "services": {f"{s['name']}" if s["instance"] == 0 else
                                         f"{s['name']}#{s['instance']}": s
                                         for s in doc["services"]}}
                self.reply(request, code, json.dumps(body).encode(), "application/json")
            else:
                self.reply(request, 404, b'{"error": "not found"}', "application/json")
        except Exception:
            log.exception("admin request %s failed", path)
            self.reply(request, 500, b'{"error": "internal error"}', "application/json")

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        request.send_response(code)
        request.send_header("Content-Type", ctype)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)
