"""CPU and memory of the supervised processes, read with psutil."""
from __future__ import annotations

import logging

import psutil

log = logging.getLogger("optimizerd.resources")


class ResourceSampler:
    """Keeps one psutil.Process per pid so that cpu_percent measures since the last sample."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> tuple[float, int] | None:
        """(CPU % of one core since the last sample, RSS bytes), or None if pid is gone."""
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only sets the baseline
            with proc.oneshot():
                return proc.cpu_percent(None), proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess) as exc:
            log.debug("cannot sample pid %d: %s", pid, exc)
            self.forget(pid)
            return None

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
