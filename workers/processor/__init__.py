"""The processor service: windows, analyzers, decisions. Filled in by the processor issue; until
then it runs, heartbeats and reports that it processes nothing."""
from __future__ import annotations

from typing import Any

from workers.runtime import Worker


class ProcessorWorker(Worker):
    def status(self) -> dict[str, Any]:
        return {"processing": "not implemented yet"}
