"""The collector service: ingest of LLM-call telemetry. Its ingest paths come with the collector
issue; until then it runs, heartbeats and reports that it ingests nothing."""
from __future__ import annotations

from typing import Any

from workers.runtime import Worker


class CollectorWorker(Worker):
    def status(self) -> dict[str, Any]:
        return {"ingest": "not implemented yet"}
