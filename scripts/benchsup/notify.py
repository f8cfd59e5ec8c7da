"""Our own NOTIFY_SOCKET: an AF_UNIX datagram socket that a daemon's sd_notify lines reach, so
that the moment READY=1 arrives can be taken on our clock."""
from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Self


class NotifyListener:
    """Bound at ``path`` until closed; give ``path`` to the daemon as NOTIFY_SOCKET."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def wait_ready(self, deadline: float, gone: Callable[[], bool]) -> float | None:
        """time.monotonic() at the arrival of the datagram with a READY=1 line; None if
        ``deadline`` (monotonic) passes first, or if ``gone()`` says the daemon has exited
        (asked whenever nothing arrived for 0.2 s)."""
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.sock], [], [], min(left, 0.2))[0]:
                data = self.sock.recv(4096)
                arrived = time.monotonic()
                if b"READY=1" in data.split(b"\n"):
                    return arrived
            elif gone():
                return None
        return None

    def close(self) -> None:
        self.sock.close()
