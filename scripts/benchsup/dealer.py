"""A request/reply round trip over a ZeroMQ DEALER, as both optimizerd's and circusd's control
sockets want it: send one request, read replies until the one that answers it."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq


class DealerClient:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def round_trip(self, request: bytes, answer: Callable[[bytes], Any], timeout: float,
                   what: str) -> Any:
        """Send ``request``; ``answer`` turns a reply into the result, or None for a reply to
        another request. TimeoutError(``what``) when no answer comes within ``timeout`` s."""
        self.sock.send(request)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            result = answer(self.sock.recv())
            if result is not None:
                return result
        raise TimeoutError(what)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
