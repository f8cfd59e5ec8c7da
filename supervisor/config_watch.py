"""watch_config: reload when the config file changes, through inotify, debounced.

Editors replace files by renaming, so the directory is watched and events are filtered by
name. No polling: the inotify fd sits in the main loop's poller.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import zmq

from supervisor.loop_poller import LoopPoller
from supervisor.timers import Timer, Timers

log = logging.getLogger("optimizerd.config_watch")
DEBOUNCE = 0.3


class ConfigWatch:
    def __init__(self, path: str | None, poller: LoopPoller, timers: Timers,
                 on_change: Callable[[], None]):
        self.path = os.path.abspath(path) if path else None
        self.poller, self.timers, self.on_change = poller, timers, on_change
        self.inotify = None
        self.pending: Timer | None = None

    def enable(self, on: bool) -> None:
        if on and self.inotify is None and self.path:
            from inotify_simple import INotify, flags

            self.inotify = INotify()
            self.inotify.add_watch(os.path.dirname(self.path),
                                   flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE)
            self.poller.register(self.inotify.fileno(), zmq.POLLIN)
            log.info("watching %s for changes", self.path)
        elif not on and self.inotify is not None:
            self.close()

    def owns(self, fd: int) -> bool:
        return self.inotify is not None and fd == self.inotify.fileno()

    def on_readable(self) -> None:
        name = os.path.basename(self.path or "")
        if any(event.name == name for event in self.inotify.read(timeout=0)):
            if self.pending:
                self.pending.cancel()
            self.pending = self.timers.at(time.monotonic() + DEBOUNCE, self.fire)

    def fire(self) -> None:
        self.pending = None
        self.on_change()

    def close(self) -> None:
        if self.inotify is not None:
            self.poller.unregister(self.inotify.fileno())
            self.inotify.close()
            self.inotify = None
        if self.pending:
            self.pending.cancel()
            self.pending = None
