"""What a reload changes, per service: the diff between the running and the new config."""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from ipc.config import Config, supervisor_owned_keys


@dataclass
class ReloadPlan:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    to_reload: list[str] = field(default_factory=list)    # worker decides: live or restart
    to_restart: list[str] = field(default_factory=list)   # cannot be applied live
    unchanged: list[str] = field(default_factory=list)
    needs_daemon_restart: list[str] = field(default_factory=list)  # keys applied at next start


DAEMON_START_KEYS = ("runtime_dir", "data_dir", "preload")


def _as_dict(section: msgspec.Struct) -> dict:
    return msgspec.to_builtins(section)


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    plan = ReloadPlan()
    old_services, new_services = old.enabled_services(), new.enabled_services()
    plan.needs_daemon_restart = [f"supervisor.{k}" for k in DAEMON_START_KEYS
                                 if getattr(old.supervisor, k) != getattr(new.supervisor, k)]
    # Settings every worker applies itself: log level and format, heartbeat interval.
    global_change = (old.observability != new.observability or
                     old.supervisor.heartbeat_interval != new.supervisor.heartbeat_interval)
    for name, section in new_services.items():
        if name not in old_services:
            plan.added.append(name)
            continue
        before, after = _as_dict(old_services[name]), _as_dict(section)
        changed = {k for k in after if before.get(k) != after.get(k)}
        if "entrypoint" in changed:
            plan.to_restart.append(name)
        elif changed - supervisor_owned_keys() or global_change:
            plan.to_reload.append(name)
        else:
            plan.unchanged.append(name)  # at most supervisor-side keys: applied by us
    plan.removed = [n for n in old_services if n not in new_services]
    return plan
