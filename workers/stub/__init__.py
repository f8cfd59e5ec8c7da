"""A configurable stub service for tests and benchmarks: every failure mode is one setting.

    [services.stub]
    entrypoint = "workers.stub:StubWorker"
    settings = { exit_after = 0.5, exit_code = 3 }

Settings: ready_delay (s before READY), fail_start (raise in start), exit_after (s after READY,
then exit with exit_code), hang_after (s after READY, then block the event loop for good),
health / health_reason (reported in every heartbeat), ignore_stop (never finish stopping),
reload ("live" or "restart"), marker (a file written with the pid once READY).
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from prometheus_client import Counter

from ipc.config import Config, ExtraServiceSection
from workers.runtime import Worker

STUB_TICKS = Counter("optimizer_stub_ticks", "Ticks of the stub worker's loop.", ["service"])


class StubWorker(Worker):
    tasks: list[asyncio.Task]

    @property
    def settings(self) -> dict[str, Any]:
        section = self.context.section
        assert isinstance(section, ExtraServiceSection)
        return section.settings

    async def start(self) -> None:
        s = self.settings
        self.tasks = []
        if s.get("ready_delay"):
            await asyncio.sleep(float(s["ready_delay"]))
        if s.get("fail_start"):
            raise RuntimeError("fail_start is set")
        if s.get("exit_after") is not None:
            self.tasks.append(asyncio.create_task(self.exit_later(float(s["exit_after"]))))
        if s.get("hang_after") is not None:
            self.tasks.append(asyncio.create_task(self.hang_later(float(s["hang_after"]))))
        self.tasks.append(asyncio.create_task(self.tick()))
        if s.get("marker"):
            with open(s["marker"], "a") as f:
                f.write(f"{os.getpid()}\n")

    async def tick(self) -> None:
        counter = STUB_TICKS.labels(service=self.context.service)
        while True:
            counter.inc()
            await asyncio.sleep(0.1)

    async def exit_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.log.info("exit_after reached: exiting with %s", self.settings.get("exit_code", 1))
        os._exit(int(self.settings.get("exit_code", 1)))

    async def hang_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.log.info("hang_after reached: blocking the event loop")
        while True:
            time.sleep(3600)

    def health(self) -> tuple[str, str]:
        return self.settings.get("health", "ok"), self.settings.get("health_reason", "")

    def status(self) -> dict[str, Any]:
        return {"settings": self.settings}

    async def stop(self) -> None:
        if self.settings.get("ignore_stop"):
            await asyncio.Event().wait()  # never: the supervisor must escalate
        for task in self.tasks:
            task.cancel()

    async def reload(self, new: Config) -> bool:
        mode = new.service_sections()[self.context.service].settings.get("reload", "live")
        return mode == "live"
