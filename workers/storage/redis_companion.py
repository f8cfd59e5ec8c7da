"""Redis beside the durable backend: change notifications and a shared cache, never the only copy.

When a document of a watched namespace (configs, optimizations, flags) gets a new version, the
storage worker publishes ``{"ns", "id", "version"}`` on ``CHANGES_CHANNEL`` after the write is
durable, so that every replica of every service can refresh at once. Redis being down makes the
storage service degraded, never unavailable: the durable write has happened either way.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import redis.asyncio as redis
from redis.exceptions import RedisError

log = logging.getLogger("workers.storage.redis")
CHANGES_CHANNEL = "llm-optimizer:changes"
WATCHED_NAMESPACES = frozenset({"configs", "optimizations", "flags"})
QUEUE_LIMIT = 10_000


def redacted(url: str) -> str:
    """The URL without its password, for logs and status."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"


class RedisCompanion:
    def __init__(self, url: str):
        self.url = url
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2,
                                           health_check_interval=30)
        self.problem = ""
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_LIMIT)
        self.publisher: asyncio.Task | None = None

    async def check(self) -> None:
        try:
            await self.client.ping()
            self.problem = ""
        except (RedisError, OSError) as exc:
            self.problem = f"redis at {redacted(self.url)}: {exc}"

    async def document_changed(self, ns: str, id_: str, version: int) -> None:
        """Queue a notification; a slow or absent Redis never holds up the storage loop."""
        if ns not in WATCHED_NAMESPACES:
            return
        if self.publisher is None:
            self.publisher = asyncio.create_task(self.publish_queued())
        try:
            self.queue.put_nowait(json.dumps({"ns": ns, "id": id_, "version": version}))
        except asyncio.QueueFull:
            log.warning("change notification for %s/%s v%d dropped: %d waiting", ns, id_,
                        version, QUEUE_LIMIT)

    async def publish_queued(self) -> None:
        while True:
            message = await self.queue.get()
            try:
                await self.client.publish(CHANGES_CHANNEL, message)
                self.problem = ""
            except (RedisError, OSError) as exc:
                self.problem = f"redis at {redacted(self.url)}: {exc}"
                log.warning("change notification %s not published: %s", message, exc)

    async def close(self) -> None:
        if self.publisher is not None:
            self.publisher.cancel()
            await asyncio.gather(self.publisher, return_exceptions=True)
        await self.client.aclose()


async def changes(url: str) -> AsyncIterator[dict]:
    """Change notifications as they are published: for services that cache documents."""
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANGES_CHANNEL)
    try:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                yield json.loads(message["data"])
    finally:
        await pubsub.aclose()
        await client.aclose()
