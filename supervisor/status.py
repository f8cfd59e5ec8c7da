"""The status document: what `optimizerctl status --json`, /health and /metrics are made of.

Its keys are a stable contract for scripts and monitoring (see docs/operations.md).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from supervisor.instance import ServiceInstance
from supervisor.states import RUNNING_STATES, State


def instance_status(inst: ServiceInstance, now: float,
                    sample: tuple[float, int] | None) -> dict[str, Any]:
    running = inst.state in RUNNING_STATES and inst.pid is not None
    return {
        "name": inst.service,
        "instance": inst.index,
        "state": inst.state.value,
        "pid": inst.pid if running else None,
        "uptime_s": round(now - inst.started_at, 3) if running else 0.0,
        "restarts": inst.restarts,
        "heartbeat_age_s": round(now - inst.last_heartbeat, 3) if running else None,
        "health": inst.health,
        # Down after a failure: why (it includes the last health reason); else the health's.
        "reason": (inst.history[-1].reason if inst.state in (State.BACKOFF, State.FAILED)
                   and inst.history else inst.reason),
        "start_duration_s": round(inst.start_duration, 4),
        "cpu_percent": round(sample[0], 2) if sample and running else None,
        "rss_bytes": sample[1] if sample and running else None,
        "last_exit": inst.last_exit,
    }


def instance_detail(inst: ServiceInstance, now: float,
                    sample: tuple[float, int] | None) -> dict[str, Any]:
    doc = instance_status(inst, now, sample)
    doc["status"] = inst.status
    doc["history"] = [{"at": t.at, "from": t.old, "to": t.new, "reason": t.reason}
                      for t in inst.history]
    return doc


@dataclass(frozen=True)
class Snapshot:
    """A status document taken by the main loop, readable from the admin HTTP thread.

    Ages and uptimes are advanced to the time of reading, so a hung worker's heartbeat age
    keeps growing even while nothing else happens.
    """

    taken_at: float
    doc: dict[str, Any]

    def at(self, now: float) -> dict[str, Any]:
        gap = max(0.0, now - self.taken_at)
        services = []
        for s in self.doc["services"]:
            s = dict(s)
            if s["pid"] is not None:
                s["uptime_s"] = round(s["uptime_s"] + gap, 3)
                s["heartbeat_age_s"] = round(s["heartbeat_age_s"] + gap, 3)
            services.append(s)
        sup = dict(self.doc["supervisor"], uptime_s=round(self.doc["supervisor"]["uptime_s"]
                                                           + gap, 3))
        return {"supervisor": sup, "services": services}


def supervisor_status(state: str, started_at: float, config_hash: str, config_path: str | None,
                      ready: bool, now: float) -> dict[str, Any]:
    return {"pid": os.getpid(), "state": state, "uptime_s": round(now - started_at, 3),
            "config_hash": config_hash, "config_file": config_path, "ready": ready,
            "started_at": time.time() - (now - started_at)}
