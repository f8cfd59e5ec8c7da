"""The integrations service: optimizer events routed to Slack, Jira, GitHub and signed webhooks
through a persisted outbox, and Claude (the Anthropic Messages API) asked for prompt
suggestions. ``service.IntegrationsService`` does the work; this module stays light (the
clients are imported in ``start``).

Admin commands (``optimizerctl call integrations ...``, and the REST and gRPC APIs):
``integrations`` (every destination with its state and figures), ``test {"name"}`` (send a
test message now), ``configure {"name", ...routing keys}`` (switch or reroute at run time),
``dead-letters {"limit"}``, ``suggest {...}`` (Claude's suggestions for a service).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ipc.config import IntegrationsSection
from workers.runtime import Worker

if TYPE_CHECKING:
    from workers.integrations.service import IntegrationsService


class IntegrationsWorker(Worker):
    service: IntegrationsService | None = None

    async def start(self) -> None:
        from workers.integrations.service import IntegrationsService

        section = self.context.section
        assert isinstance(section, IntegrationsSection)
        self.service = IntegrationsService(section, self.context.runtime_dir)
        await self.service.start()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()

    def health(self) -> tuple[str, str]:
        return self.service.health() if self.service is not None else ("ok", "")

    def status(self) -> dict[str, Any]:
        return self.service.status() if self.service is not None else {"starting": True}

    async def admin(self, command: str, args: dict[str, Any]) -> Any:
        service = self.service
        if service is None:
            return await super().admin(command, args)
        by = str(args.get("by") or "an operator")
        if command == "integrations":
            return [*service.status()["destinations"], service.anthropic_view()]
        if command == "test":
            return await service.test(str(args.get("name", "")), by)
        if command == "configure":
            changes = {k: v for k, v in args.items() if k not in ("name", "by")}
            return await service.configure(str(args.get("name", "")), changes, by)
        if command == "dead-letters":
            limit = int(args.get("limit") or 100)
            return [{"destination": e.destination, "key": e.note.key, "kind": e.note.kind,
                     "title": e.note.title, "attempts": e.attempts, "error": e.last_error,
                     "created_ms": e.created_ms}
                    for e in await service.outbox.dead_letters(min(limit, 1000))]
        if command == "suggest":
            return await service.suggest(dict(args.get("request") or {}))
        return await super().admin(command, args)
