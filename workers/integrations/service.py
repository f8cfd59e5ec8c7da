"""The integrations service at work: optimizer events in, notifications out, reliably.

Three tasks:

* **events**: tails the ``optimizer-events`` log from the position kept in storage (the first
  run starts at its end: no flood of history), turns records into notifications
  (``events.from_record``), queues one outbox entry per destination the router picks, and only
  then stores the new position;
* **supervisor**: polls the supervisor's status and notifies each service that enters
  ``failed``;
* **delivery**: sends what is due, one destination's circuit breaker and rate limit at a time.
  A transient failure (429, 5xx, timeout) waits the server's Retry-After or an exponential
  backoff with full jitter; after ``max_attempts``, or at once for a permanent refusal (4xx), the
  entry becomes a dead letter. Delivery never blocks the processor: it only reads its log.

Destinations are built from ``[integrations.*]``; one that is enabled but misconfigured (no
token, bad URL) is reported ``misconfigured`` with the key at fault, and the others work.
Operators may switch a destination and change its routing at run time (``configure``); those
overrides are kept in storage (``integrations`` ``overrides/<name>``), over the config file.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import msgspec
from prometheus_client import Counter, Gauge

from ipc import storage as s
from ipc.config import IntegrationsSection, RoutingSection
from workers.integrations.anthropic import AnthropicClient, SuggestionRequest
from workers.integrations.events import from_record, service_failed
from workers.integrations.github import GithubClient
from workers.integrations.http import PermanentError, redact
from workers.integrations.jira import JiraClient
from workers.integrations.notification import Notification
from workers.integrations.outbox import Entry, Outbox, now_ms
from workers.integrations.routing import Router
from workers.integrations.slack import SlackClient
from workers.integrations.webhook import WebhookClient
from workers.resilience.breaker import CircuitBreaker, CircuitOpen, CircuitState
from workers.resilience.retry import TransientError
from workers.rest_api.problems import Problem
from workers.rest_api.processor_link import ControlLink
from workers.storage_client import StorageClient

log = logging.getLogger("workers.integrations")

EVENTS_LOG = "optimizer-events"
STATE_NS = "integrations"
POSITION_KEY = b"position"
READ_BATCH = 200
LONG_POLL_MS = 5_000
SUPERVISOR_POLL_S = 2.0
BACKOFF_CAP_S = 300.0
ROUTING_KEYS = frozenset(RoutingSection.__struct_fields__) - {"templates"}

DELIVERIES = Counter("integrations_deliveries", "Notification deliveries tried, by destination "
                     "and outcome (delivered, retry, dead, deferred).",
                     ["destination", "outcome"])
OUTBOX = Gauge("integrations_outbox_messages", "Outbox entries by state (pending, dead).",
               ["state"], multiprocess_mode="livemax")
BREAKER_OPEN = Gauge("integrations_breaker_open", "1 while a destination's circuit breaker "
                     "is open.", ["destination"], multiprocess_mode="livemax")


class Destination(Protocol):
    name: str

    @property
    def secrets(self) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...

    async def deliver(self, session: aiohttp.ClientSession, note: Notification
                      ) -> dict[str, Any]: ...


class Link:
    """One destination with its breaker and delivery figures."""

    def __init__(self, name: str, client: Destination | None, section: IntegrationsSection,
                 problem: str = "") -> None:
        self.name, self.client, self.problem = name, client, problem
        self.breaker = CircuitBreaker(name, failure_threshold=section.breaker_failures,
                                      recovery_timeout=section.breaker_recovery_s)
        self.delivered = self.failed = 0
        self.last_error = ""
        self.last_delivered_ms = self.last_failed_ms = 0


def build_destinations(section: IntegrationsSection) -> dict[str, tuple[Any, RoutingSection]]:
    """name -> (client factory, routing) of every configured destination."""
    timeout = section.timeout_s
    found: dict[str, tuple[Any, RoutingSection]] = {
        "slack": (lambda: SlackClient(section.slack, timeout), section.slack),
        "jira": (lambda: JiraClient(section.jira, timeout), section.jira),
        "github": (lambda: GithubClient(section.github, timeout), section.github)}
    for name, hook in section.webhooks.items():
        found[f"webhook:{name}"] = (
            lambda name=name, hook=hook: WebhookClient(name, hook, timeout), hook)
    return found


class IntegrationsService:
    def __init__(self, section: IntegrationsSection, runtime_dir: str) -> None:
        self.section = section
        self.storage = StorageClient(runtime_dir)
        self.link = ControlLink(runtime_dir)
        self.outbox = Outbox(self.storage)
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None
        self.position: int | None = None
        self.failed_seen: set[str] = set()
        self.waiting = "starting"  # why the service does not deliver yet; empty once it does
        self.links: dict[str, Link] = {}
        self.routes: dict[str, RoutingSection] = {}
        for name, (factory, routing) in build_destinations(section).items():
            self.routes[name] = routing
            if not routing.enabled:
                self.links[name] = Link(name, None, section)
                continue
            try:
                self.links[name] = Link(name, factory(), section)
            except ValueError as exc:  # SecretError included: the message names the key
                log.error("integration %s is misconfigured: %s", name, exc)
                self.links[name] = Link(name, None, section, problem=str(exc))
        self.anthropic: AnthropicClient | None = None
        self.anthropic_problem = ""
        if section.anthropic.enabled:
            try:
                self.anthropic = AnthropicClient(section.anthropic, section.timeout_s)
            except ValueError as exc:
                self.anthropic_problem = str(exc)
                log.error("integration anthropic is misconfigured: %s", exc)
        self.router = Router(self.routes)

    @property
    def secrets(self) -> list[str]:
        found = [secret for link in self.links.values() if link.client is not None
                 for secret in link.client.secrets]
        return found + (self.anthropic.secrets if self.anthropic is not None else [])

    # --- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Ready at once: what needs storage (the outbox, the position, the overrides) is
        loaded by a task that waits for storage as long as it takes, so that the service
        comes up (degraded) while PostgreSQL is away instead of failing its start."""
        self.session = aiohttp.ClientSession(headers={"User-Agent": "llm-auto-optimizer"})
        self.tasks.append(asyncio.create_task(self.run(), name="integrations"))

    async def run(self) -> None:
        while True:
            try:
                await self.prepare()
                break
            except (s.StorageFailure, Problem) as exc:
                self.waiting = f"waiting for storage: {exc}"
                log.warning("integrations: %s; again in 1 s", self.waiting)
                await asyncio.sleep(1.0)
        self.waiting = ""
        self.update_gauges()
        log.info("integrations: %s; outbox %d pending, %d dead",
                 ", ".join(f"{n} {self.state_of(n)}" for n in self.links) or "none",
                 len(self.outbox.pending), self.outbox.dead_count)
        await asyncio.gather(*(self.forever(name, job) for name, job in (
            ("events", self.follow_events), ("supervisor", self.follow_supervisor),
            ("delivery", self.deliver_loop))))

    async def prepare(self) -> None:
        await self.load_overrides()
        await self.outbox.load()
        raw = await self.storage.call(s.Get(ns=STATE_NS, key=POSITION_KEY))
        if raw is not None:
            self.position = int(raw)
        else:
            self.position = (await self.storage.call(s.LogInfo(log=EVENTS_LOG))).next_offset
            await self.save_position()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.session is not None:
            await self.session.close()
        await self.link.close()
        await self.storage.close()

    async def forever(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` again after a failure (storage away), logged, never silently."""
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except (s.StorageFailure, Problem) as exc:
                log.warning("integrations %s: %s; again in 1 s", name, exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("integrations %s failed; again in 1 s", name)
                await asyncio.sleep(1.0)

    # --- in: events and failures ----------------------------------------------------------

    async def follow_events(self) -> None:
        while True:
            assert self.position is not None
            page = await self.storage.call(
                s.LogRead(log=EVENTS_LOG, offset=self.position, max_records=READ_BATCH,
                          wait_ms=LONG_POLL_MS), timeout=LONG_POLL_MS / 1000 + 10)
            for record in page.records:
                try:
                    note = from_record(json.loads(record.payload))
                except ValueError as exc:
                    log.error("optimizer-events record %d is not JSON, skipped: %s",
                              record.offset, exc)
                    continue
                if note is not None:
                    await self.accept(note)
            if page.next_offset != self.position:
                self.position = page.next_offset
                await self.save_position()

    async def follow_supervisor(self) -> None:
        while True:
            status = await self.link.request("status")
            failed = {f"{svc.get('name')}:{svc.get('instance')}": svc
                      for svc in status.get("services", []) if svc.get("state") == "failed"}
            for ident in failed.keys() - self.failed_seen:
                await self.accept(service_failed(failed[ident]))
            self.failed_seen = set(failed)
            await asyncio.sleep(SUPERVISOR_POLL_S)

    async def accept(self, note: Notification) -> int:
        """Queue ``note`` for every destination that takes it; returns how many."""
        queued = 0
        for name in self.router.targets(note):
            if self.links[name].client is None:
                continue
            if await self.outbox.enqueue(name, self.router.worded(name, note)):
                queued += 1
        if queued:
            self.update_gauges()
            self.wake.set()
        return queued

    async def save_position(self) -> None:
        await self.storage.call(s.Put(ns=STATE_NS, key=POSITION_KEY,
                                      value=str(self.position).encode()))

    # --- out: delivery --------------------------------------------------------------------

    async def deliver_loop(self) -> None:
        while True:
            self.wake.clear()
            for entry in self.outbox.due(now_ms()):
                await self.deliver(entry)
            next_ms = self.outbox.next_due_ms()
            timeout = None if next_ms is None else max(0.0, (next_ms - now_ms()) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def deliver(self, entry: Entry) -> None:
        link = self.links.get(entry.destination)
        if link is None or link.client is None:  # switched off or gone since it was queued
            await self.outbox.bury(entry, f"destination {entry.destination} is not enabled")
            DELIVERIES.labels(entry.destination, "dead").inc()
            return
        wait = self.router.wait_s(entry.destination)
        if wait > 0:
            await self.outbox.postpone(entry, wait, attempt=False)
            DELIVERIES.labels(entry.destination, "deferred").inc()
            return
        try:
            result = await self.send(link, entry.note)
        except CircuitOpen as exc:
            await self.outbox.postpone(entry, exc.retry_after, attempt=False)
            DELIVERIES.labels(entry.destination, "deferred").inc()
        except TransientError as exc:
            error = redact(str(exc), self.secrets)
            if entry.attempts + 1 >= self.section.max_attempts:
                await self.outbox.bury(entry, f"gave up after {entry.attempts + 1} attempts: "
                                       f"{error}")
                DELIVERIES.labels(entry.destination, "dead").inc()
            else:
                ceiling = min(BACKOFF_CAP_S, self.section.retry_base_s * 2 ** entry.attempts)
                wait = exc.retry_after if exc.retry_after is not None else \
                    random.uniform(ceiling / 2, ceiling)
                await self.outbox.postpone(entry, wait, error)
                DELIVERIES.labels(entry.destination, "retry").inc()
            log.warning("delivery of %s to %s failed (attempt %d): %s", entry.note.key,
                        entry.destination, entry.attempts, error)
        except PermanentError as exc:
            error = redact(str(exc), self.secrets)
            await self.outbox.bury(entry, error)
            DELIVERIES.labels(entry.destination, "dead").inc()
            log.error("delivery of %s to %s refused for good: %s", entry.note.key,
                      entry.destination, error)
        else:
            await self.outbox.delivered(entry, result)
            DELIVERIES.labels(entry.destination, "delivered").inc()
            log.info("delivered %s to %s", entry.note.key, entry.destination)
        self.update_gauges()

    async def send(self, link: Link, note: Notification) -> dict[str, Any]:
        """One attempt through the destination's breaker; figures kept for status."""
        assert link.client is not None and self.session is not None
        token = link.breaker.admit()
        try:
            result = await link.client.deliver(self.session, note)
        except (TransientError, PermanentError) as exc:
            link.breaker.record(token, exc if isinstance(exc, TransientError) else None)
            link.failed += 1
            link.last_failed_ms = now_ms()
            link.last_error = redact(str(exc), self.secrets)
            raise
        except BaseException:
            link.breaker.release(token)
            raise
        link.breaker.record(token, None)
        link.delivered += 1
        link.last_delivered_ms = now_ms()
        return result

    def update_gauges(self) -> None:
        OUTBOX.labels("pending").set(len(self.outbox.pending))
        OUTBOX.labels("dead").set(self.outbox.dead_count)
        for name, link in self.links.items():
            BREAKER_OPEN.labels(name).set(1 if link.breaker.state is CircuitState.OPEN else 0)

    # --- operators ------------------------------------------------------------------------

    def state_of(self, name: str) -> str:
        link = self.links[name]
        if link.problem:
            return "misconfigured"
        if link.client is None:
            return "disabled"
        if link.breaker.state is not CircuitState.CLOSED:
            return "degraded"
        return "healthy"

    def describe(self, name: str) -> dict[str, Any]:
        link, route = self.links[name], self.routes[name]
        pending = sum(1 for e in self.outbox.pending.values() if e.destination == name)
        return {"name": name, "kind": name.partition(":")[0], "state": self.state_of(name),
                "problem": link.problem, "breaker": link.breaker.state.value,
                "delivered": link.delivered, "failed": link.failed, "pending": pending,
                "last_error": link.last_error, "last_delivered_ms": link.last_delivered_ms,
                "last_failed_ms": link.last_failed_ms,
                "consecutive_failures": link.breaker.failures,
                "routing": {k: v for k, v in msgspec.to_builtins(route).items()
                            if k in ROUTING_KEYS or k == "templates"},  # never URLs, secrets
                "target": link.client.describe() if link.client is not None else {}}

    def anthropic_view(self) -> dict[str, Any]:
        if self.anthropic is None:
            return {"name": "anthropic", "kind": "anthropic",
                    "state": "misconfigured" if self.anthropic_problem else "disabled",
                    "problem": self.anthropic_problem}
        return {"name": "anthropic", "kind": "anthropic", "state": "healthy",
                "target": self.anthropic.describe(), "usage": self.anthropic.usage()}

    def status(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "destinations": [self.describe(n) for n in self.links],
                "anthropic": self.anthropic_view(), "position": self.position,
                "outbox": {"pending": len(self.outbox.pending),
                           "dead": self.outbox.dead_count,
                           "delivered": self.outbox.done_count}}

    def health(self) -> tuple[str, str]:
        if self.waiting:
            return "degraded", self.waiting
        troubled = [n for n in self.links if self.state_of(n) in ("degraded", "misconfigured")]
        if troubled:
            return "degraded", "integrations " + ", ".join(
                f"{n} {self.state_of(n)}" for n in troubled)
        return "ok", ""

    def known(self, name: str) -> Link:
        if name not in self.links:
            raise ValueError(f"no integration {name!r}; integrations are: "
                             f"{', '.join(self.links)}")
        return self.links[name]

    async def test(self, name: str, by: str) -> dict[str, Any]:
        """Send a test message to ``name`` now, past the outbox and the rate limit, and say
        how it went (the breaker still applies: an open one answers at once)."""
        link = self.known(name)
        if link.client is None:
            raise ValueError(f"integration {name!r} is {self.state_of(name)}"
                             + (f": {link.problem}" if link.problem else ""))
        note = Notification(key=f"test:{name}:{now_ms()}", kind="test", severity="info",
                            title="Test message from the LLM Auto Optimizer",
                            text=f"Sent by {by} to check the {name} integration.",
                            time_ns=time.time_ns(), fields={"destination": name})
        started = time.monotonic()
        try:
            result = await self.send(link, note)
        except (TransientError, PermanentError, CircuitOpen) as exc:
            return {"name": name, "ok": False, "error": redact(str(exc), self.secrets),
                    "duration_ms": round((time.monotonic() - started) * 1000, 1)}
        return {"name": name, "ok": True, "result": result,
                "duration_ms": round((time.monotonic() - started) * 1000, 1)}

    async def configure(self, name: str, changes: dict[str, Any], by: str) -> dict[str, Any]:
        """Switch ``name`` or change its routing at run time; kept in storage."""
        self.known(name)
        unknown = set(changes) - ROUTING_KEYS
        if unknown:
            raise ValueError(f"configure takes {', '.join(sorted(ROUTING_KEYS))}; not "
                             f"{', '.join(sorted(unknown))}")
        merged = {**msgspec.to_builtins(self.routes[name]), **changes}
        try:
            route = msgspec.convert(merged, type(self.routes[name]))
        except msgspec.ValidationError as exc:
            raise ValueError(f"configure {name}: {exc}") from None
        stored = {k: merged[k] for k in ROUTING_KEYS if k in merged}
        await self.storage.call(s.Put(ns=STATE_NS, key=f"overrides/{name}".encode(),
                                      value=json.dumps(stored).encode()))
        self.apply_route(name, route)
        log.warning("integration %s reconfigured by %s: %s", name, by, changes)
        return self.describe(name)

    async def load_overrides(self) -> None:
        page = await self.storage.call(s.Scan(ns=STATE_NS, prefix=b"overrides/", limit=1000))
        for record in page.records:
            name = record.key.decode().removeprefix("overrides/")
            if name in self.routes:
                merged = {**msgspec.to_builtins(self.routes[name]), **json.loads(record.value)}
                self.apply_route(name, msgspec.convert(merged, type(self.routes[name])))

    def apply_route(self, name: str, route: RoutingSection) -> None:
        self.routes[name] = route
        link = self.links[name]
        if route.enabled and link.client is None and not link.problem:
            factory = build_destinations(self.section)[name][0]
            try:
                link.client = factory()
            except ValueError as exc:
                link.problem = str(exc)
        elif not route.enabled:
            link.client, link.problem = None, ""
        self.router = Router(self.routes)

    async def suggest(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.anthropic is None:
            raise ValueError("the anthropic integration is "
                             + (f"misconfigured: {self.anthropic_problem}"
                                if self.anthropic_problem else "not enabled"))
        assert self.session is not None
        try:
            suggestion = await self.anthropic.suggest(
                self.session, msgspec.convert(request, SuggestionRequest))
        except (TransientError, PermanentError) as exc:
            raise ValueError(f"anthropic: {redact(str(exc), self.secrets)}") from None
        return msgspec.to_builtins(suggestion)
