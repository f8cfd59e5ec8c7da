"""What a process uses while idle: CPU (% of one core) and memory over a window."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import psutil

from benchsup.figures import mib


def cpu_ticks(pid: int) -> float:
    """user + system seconds from psutil (10 ms ticks)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user+system from psutil, 10 ms ticks; sum of every thread's schedstat run time, ns)."""
    ticks = cpu_ticks(pid)
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            ns += int(f.read().split()[0])
    return ticks, ns / 1e9


@dataclass
class IdleResult:
    label: str
    window: float
    cpu_pct: float         # psutil cpu_times
    cpu_pct_sched: float   # schedstat, ns resolution
    rss_end: int
    rss_max: int
    uss: int | None

    def line(self) -> str:
        return (f"{self.label}: CPU {self.cpu_pct:.3f}% of a core (psutil cpu_times), "
                f"{self.cpu_pct_sched:.3f}% (schedstat); RSS {mib(self.rss_end)} "
                f"(max {mib(self.rss_max)}), USS {mib(self.uss)}")


def measure_idle(pids: dict[str, int], window: float, group: dict[str, list[int]] | None = None
                 ) -> tuple[dict[str, IdleResult], dict[str, float]]:
    """CPU and RSS of each pid over ``window`` seconds, RSS sampled every second. ``group``:
    labelled lists of pids whose summed CPU is reported too (e.g. all workers)."""
    group = group or {}
    start = {k: process_cpu_seconds(p) for k, p in pids.items()}
    gstart = {k: sum(cpu_ticks(p) for p in ps) for k, ps in group.items()}
    rss_max = {k: 0 for k in pids}
    t0 = time.monotonic()
    while (left := t0 + window - time.monotonic()) > 0:
        for k, p in pids.items():
            rss_max[k] = max(rss_max[k], psutil.Process(p).memory_info().rss)
        time.sleep(min(1.0, left))
    wall = time.monotonic() - t0
    out = {}
    for k, p in pids.items():
        end = process_cpu_seconds(p)
        proc = psutil.Process(p)
        rss = proc.memory_info().rss
        try:
            uss = proc.memory_full_info().uss
        except psutil.Error:
            uss = None
        out[k] = IdleResult(k, wall, (end[0] - start[k][0]) / wall * 100,
                            (end[1] - start[k][1]) / wall * 100, rss, max(rss_max[k], rss), uss)
    gout = {k: (sum(cpu_ticks(p) for p in ps) - gstart[k]) / wall * 100
            for k, ps in group.items()}
    return out, gout
