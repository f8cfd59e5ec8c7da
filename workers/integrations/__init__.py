"""The integrations service: Slack, Jira, GitHub, Anthropic. Filled in by the integrations issue;
until then it runs, heartbeats and reports that no integration is configured."""
from __future__ import annotations

from typing import Any

from workers.runtime import Worker


class IntegrationsWorker(Worker):
    def status(self) -> dict[str, Any]:
        return {"integrations": []}
