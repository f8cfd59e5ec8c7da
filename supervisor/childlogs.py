"""Workers' stdout and stderr: read from their pipes in the main loop, logged line by line."""
from __future__ import annotations

import logging
import os

from ipc.logrecords import record_from_child_line

MAX_LINE = 64 * 1024
log = logging.getLogger("optimizerd.childlogs")


class ChildOutput:
    """One pipe of one worker process. ``on_readable`` returns False at EOF."""

    def __init__(self, fd: int, service: str, pid: int, stream: str):
        self.fd, self.service, self.pid, self.stream = fd, service, pid, stream
        self.buffer = b""

    def on_readable(self) -> bool:
        """Read what is there; False at end of file."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError as exc:
            log.warning("reading %s of %s failed: %s", self.stream, self.service, exc)
            chunk = b""
        if not chunk:
            self.emit_lines(final=True)
            return False
        self.buffer += chunk
        self.emit_lines(final=False)
        return True

    def emit_lines(self, final: bool) -> None:
        *lines, rest = self.buffer.split(b"\n")
        while len(rest) > MAX_LINE:  # a runaway line is logged in pieces, never dropped
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        if final and rest:
            lines.append(rest)
            rest = b""
        self.buffer = rest
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            if text:
                record = record_from_child_line(text, self.service, self.pid, self.stream)
                logging.getLogger(record.name).handle(record)

    def drain(self) -> None:
        """Log everything still buffered in the pipe, without waiting for more."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.emit_lines(final=True)
                return
            self.buffer += chunk
            self.emit_lines(final=False)

    def close(self) -> None:
        os.close(self.fd)
