"""Prometheus exposition of the supervisor: its own series plus every worker's.

Workers write their series with prometheus_client's multiprocess mode into
``<runtime_dir>/metrics``; the supervisor marks each exited pid dead and aggregates the files
when scraped, next to its own per-service series made from the status snapshot.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from supervisor.states import State

log = logging.getLogger("optimizerd.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def reset_multiprocess_dir(path: str) -> None:
    """Start from an empty directory: files of a previous run would be summed in."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)


def mark_process_dead(path: str, pid: int) -> None:
    multiprocess.mark_process_dead(pid, path)


class SupervisorCollector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        doc = self.snapshot()
        labels = ["service", "instance"]
        up = GaugeMetricFamily("optimizerd_service_up", "1 when the process is READY.",
                               labels=labels)
        state = GaugeMetricFamily("optimizerd_service_state",
                                  "1 for the state the process is in.", labels=[*labels, "state"])
        health = GaugeMetricFamily("optimizerd_service_health",
                                   "1 for the health last reported.", labels=[*labels, "health"])
        restarts = CounterMetricFamily("optimizerd_service_restarts",
                                       "Restarts since the supervisor started.", labels=labels)
        age = GaugeMetricFamily("optimizerd_service_heartbeat_age_seconds",
                                "Seconds since the last heartbeat.", labels=labels)
        start = GaugeMetricFamily("optimizerd_service_start_duration_seconds",
                                  "Spawn to READY of the last start.", labels=labels)
        cpu = GaugeMetricFamily("optimizerd_service_cpu_percent",
                                "CPU use in percent of one core.", labels=labels)
        rss = GaugeMetricFamily("optimizerd_service_resident_memory_bytes",
                                "Resident memory.", labels=labels)
        for s in doc["services"]:
            key = [s["name"], str(s["instance"])]
            up.add_metric(key, 1.0 if s["state"] == State.READY.value else 0.0)
            for st in State:
                state.add_metric([*key, st.value], 1.0 if s["state"] == st.value else 0.0)
            for h in ("ok", "degraded", "unhealthy"):
                health.add_metric([*key, h], 1.0 if s["health"] == h else 0.0)
            restarts.add_metric(key, s["restarts"])
            start.add_metric(key, s["start_duration_s"])
            if s["heartbeat_age_s"] is not None:
                age.add_metric(key, s["heartbeat_age_s"])
            if s["cpu_percent"] is not None:
                cpu.add_metric(key, s["cpu_percent"])
                rss.add_metric(key, s["rss_bytes"])
        sup = doc["supervisor"]
        uptime = GaugeMetricFamily("optimizerd_uptime_seconds", "Seconds since optimizerd started.")
        uptime.add_metric([], sup["uptime_s"])
        ready = GaugeMetricFamily("optimizerd_ready", "1 when every enabled service is READY.")
        ready.add_metric([], 1.0 if sup["ready"] else 0.0)
        reloads = CounterMetricFamily("optimizerd_config_reloads", "Config reloads by outcome.",
                                      labels=["outcome"])
        for outcome, count in sup.get("reloads", {}).items():
            reloads.add_metric([outcome], count)
        yield from (up, state, health, restarts, age, start, cpu, rss, uptime, ready, reloads)


def render_metrics(multiproc_dir: str, snapshot: Callable[[], dict[str, Any]]) -> bytes:
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(snapshot))
    if glob.glob(os.path.join(multiproc_dir, "*.db")):
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    return generate_latest(registry)
