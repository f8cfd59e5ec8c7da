"""Feature flags: switches an operator flips at run time, without a config reload, to stop part
of what the optimizer does on its own (an incident, a freeze before a launch).

Every flag is known here, with what it stops; all are on by default, so a flag only ever
takes away behaviour that the config allows. The processor owns them: it applies a change at
once and keeps the switched-off ones in one storage document (``flags/flags``), read back at
start. A missing document means every flag is on.
"""
from __future__ import annotations

import time

import msgspec
from msgspec import Struct

from ipc import storage as s
from ipc.config import STRATEGIES
from workers.storage_client import StorageClient

NS, DOC_ID = "flags", "flags"

FLAGS: dict[str, str] = {
    "proposals": "The decision engine proposes new optimizations. Off: analyzers and findings "
                 "go on, nothing new is proposed.",
    "auto_deploy": "Proposals deploy themselves when [processor.decisions] auto_deploy is on. "
                   "Off: they stay open for an operator.",
    "rollouts": "New canary rollouts may start (deploys, experiments, auto-deploys). Off: they "
                "are refused; running ones are still judged to promotion or rollback.",
    **{f"strategy.{name}": f"The {name} strategy proposes optimizations." for name in STRATEGIES},
}


class Flag(Struct, kw_only=True):
    name: str
    enabled: bool
    description: str
    updated_by: str = ""   # who last switched it; empty: never switched
    updated_ms: int = 0


class _Switch(Struct, kw_only=True):
    enabled: bool
    by: str
    ms: int


class UnknownFlag(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no flag {name!r}; flags are: {', '.join(FLAGS)}")


class FlagOff(ValueError):
    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"{what} refused: feature flag {name!r} is off")
        self.flag = name


class FeatureFlags:
    def __init__(self, storage: StorageClient) -> None:
        self.storage = storage
        self.switches: dict[str, _Switch] = {}

    async def load(self) -> None:
        try:
            doc = await self.storage.call(s.DocGet(ns=NS, id=DOC_ID))
        except s.NotFound:
            return
        stored = msgspec.json.decode(doc.body, type=dict[str, _Switch])
        self.switches = {name: switch for name, switch in stored.items() if name in FLAGS}

    def enabled(self, name: str) -> bool:
        switch = self.switches.get(name)
        return switch is None or switch.enabled

    def require(self, name: str, what: str) -> None:
        if not self.enabled(name):
            raise FlagOff(name, what)

    def disabled_strategies(self) -> frozenset[str]:
        return frozenset(name.removeprefix("strategy.") for name, switch in
                         self.switches.items()
                         if name.startswith("strategy.") and not switch.enabled)

    def get(self, name: str) -> Flag:
        if name not in FLAGS:
            raise UnknownFlag(name)
        switch = self.switches.get(name)
        if switch is None:
            return Flag(name=name, enabled=True, description=FLAGS[name])
        return Flag(name=name, enabled=switch.enabled, description=FLAGS[name],
                    updated_by=switch.by, updated_ms=switch.ms)

    def all(self) -> list[Flag]:
        return [self.get(name) for name in FLAGS]

    async def set(self, name: str, enabled: bool, by: str) -> Flag:
        """Switch ``name``, stored before it takes effect (a crash keeps the operator's
        choice)."""
        if name not in FLAGS:
            raise UnknownFlag(name)
        switches = {**self.switches, name: _Switch(enabled=enabled, by=by,
                                                   ms=time.time_ns() // 1_000_000)}
        await self.storage.call(s.DocPut(ns=NS, id=DOC_ID, body=msgspec.json.encode(switches)))
        self.switches = switches
        return self.get(name)
