"""sd_notify(3) without libsystemd: READY, STATUS, RELOADING, STOPPING, WATCHDOG, MAINPID.

Only the supervisor speaks to systemd (NotifyAccess=main); the variables are taken out of the
environment at start so that no worker inherits them.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("optimizerd.sdnotify")


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        watchdog_usec = env.pop("WATCHDOG_USEC", "")
        watchdog_pid = env.pop("WATCHDOG_PID", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and \
                (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 2e6  # ping at half the timeout

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
