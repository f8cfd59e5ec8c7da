"""What every endpoint module shares: the connections it uses, opaque cursors, bounded document
scans, and problems for what the processor refuses."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc import storage as s
from ipc.config import Config, RestApiSection
from workers.processor.configs import ConfigManager
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.processor_link import CommandFailed, ControlLink
from workers.rest_api.problems import Problem
from workers.storage_client import StorageClient

EVENTS_LOG = "optimizer-events"  # the processor's outputs.EVENTS_LOG
MAX_PAGE = 500
SCAN_PAGE = 1000
MAX_SCAN = 10_000


@dataclass
class Deps:
    """The connections and settings the handlers use; one per process."""

    config: Config
    section: RestApiSection
    storage: StorageClient
    link: ControlLink
    configs: ConfigManager
    api_keys: ApiKeyStore
    # service -> (expiry, config, variant -> its effective config): /resolve answers from here
    # for cache_ttl_s
    resolve_cache: dict[str, tuple[float, Any, dict[str, dict[str, Any]]]] = field(
        default_factory=dict)
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # ends the event streams


def encode_cursor(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    """The value inside a cursor from ``encode_cursor``; None for none; 422 if forged."""
    if not cursor:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise Problem(422, "Unprocessable Content", "the cursor is not one this API made",
                      path="cursor", type_suffix="invalid-input") from None


def not_found(what: str) -> Problem:
    return Problem(404, "Not Found", what, type_suffix="not-found")


def conflict(detail: str) -> Problem:
    return Problem(409, "Conflict", detail, type_suffix="conflict")


def command_problem(exc: CommandFailed) -> Problem:
    """A refused processor command: unknown things are 404, the rest conflicts with state."""
    if exc.message.startswith(("no proposal", "no config", "no flag", "no job")):
        return not_found(exc.message)
    if exc.message.startswith("the processor is not running yet"):
        return Problem(503, "Service Unavailable", exc.message, retry_after=1,
                       type_suffix="upstream-unavailable")
    return conflict(exc.message)


async def active_rollouts(deps: Deps) -> dict[str, Any]:
    """service -> running rollout, from the processor that owns them."""
    try:
        return await deps.link.call("processor", "rollouts")
    except CommandFailed as exc:
        raise Problem(503, "Service Unavailable", f"processor: {exc.message}", retry_after=1,
                      type_suffix="upstream-unavailable") from None


async def refuse_during_rollout(deps: Deps, service: str) -> None:
    rollouts = await active_rollouts(deps)
    if service in rollouts:
        raise conflict(f"service {service!r} has a rollout running "
                       f"({rollouts[service].get('proposal_id')}); its config changes only "
                       "through the rollout until it is promoted or rolled back")


async def scan_documents(deps: Deps, ns: str, prefix: str, cursor: str | None, limit: int,
                         match: Callable[[dict[str, Any]], bool]
                         ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """Up to ``limit`` (id, JSON body) documents that ``match``, after ``cursor`` (a document
    id), and the cursor to continue from; at most ``MAX_SCAN`` documents are read per call,
    so a rare filter answers a short page with a cursor rather than scanning everything."""
    found: list[tuple[str, dict[str, Any]]] = []
    scanned = 0
    while True:
        page = await deps.storage.call(s.DocList(ns=ns, prefix=prefix, limit=SCAN_PAGE,
                                                 cursor=cursor))
        for doc in page.documents:
            cursor = doc.id
            scanned += 1
            body = json.loads(doc.body)
            if match(body):
                found.append((doc.id, body))
                if len(found) == limit:
                    return found, cursor
        if page.next_cursor is None:
            return found, None
        cursor = page.next_cursor
        if scanned >= MAX_SCAN:
            return found, cursor
