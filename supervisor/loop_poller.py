"""One poller for ZeroMQ sockets and plain fds, whose cost does not grow with the fd count.

zmq.Poller rebuilds its item array on every call, which with fifty workers (an exit sentinel
and two output pipes each) costs more than the work a heartbeat brings. Plain fds therefore go
into one epoll instance, and only its fd sits in the ZeroMQ poller next to the sockets.
"""
from __future__ import annotations

import select
from typing import Any

import zmq


class LoopPoller:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.zmq = zmq.Poller()
        self.zmq.register(self.epoll.fileno(), zmq.POLLIN)

    def register(self, item: Any, _events: int = zmq.POLLIN) -> None:
        """Watch a ZeroMQ socket or a plain fd for input."""
        if isinstance(item, int):
            self.epoll.register(item, select.EPOLLIN)
        else:
            self.zmq.register(item, zmq.POLLIN)

    def unregister(self, item: Any) -> None:
        if isinstance(item, int):
            self.epoll.unregister(item)
        else:
            self.zmq.unregister(item)

    def poll(self, timeout_ms: int | None) -> list[tuple[Any, int]]:
        """Ready sockets and fds, as (item, event) pairs like zmq.Poller.poll."""
        ready = []
        for item, event in self.zmq.poll(timeout_ms):
            if item == self.epoll.fileno():
                ready.extend((fd, zmq.POLLIN) for fd, _ in self.epoll.poll(0))
            else:
                ready.append((item, event))
        return ready

    def close(self) -> None:
        self.epoll.close()
