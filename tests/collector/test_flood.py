"""A flood beyond capacity: the collector refuses what it cannot hold (503 with Retry-After),
its memory stays bounded, and what it acknowledged is exactly what is in the log."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import psutil

from ipc.events import decode_event
from tests.collector.in_flight import EVENT, STORAGE_NOT_RESTARTED, events_held_in_flight
from tests.collector.test_json_ingest import read_log

BATCH = 500
MAX_IN_FLIGHT = 2_000
RSS_GROWTH_LIMIT = 64 << 20  # each flood below sends ~110 MB of JSON


def body(prefix: str, n: int) -> bytes:
    return json.dumps({"events": [dict(EVENT, event_id=f"{prefix}-{n}-{i}")
                                  for i in range(BATCH)]}).encode()


async def flood(url: str, prefix: str, requests: int, concurrency: int
                ) -> tuple[list[str], int, list[str]]:
    """(acknowledged event ids, 503 answers, other problems) of ``requests`` posts."""
    acked: list[str] = []
    refused = 0
    problems: list[str] = []
    queue = iter(range(requests))
    template = body(prefix, 0)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal refused
        for n in queue:
            data = template.replace(f'"{prefix}-0-'.encode(), f'"{prefix}-{n}-'.encode())
            async with session.post(url, data=data,
                                    headers={"Content-Type": "application/json"}) as answer:
                if answer.status == 200:
                    assert (await answer.json())["accepted"] == BATCH
                    acked.extend(f"{prefix}-{n}-{i}" for i in range(BATCH))
                elif answer.status == 503 and int(answer.headers["Retry-After"]) >= 1:
                    refused += 1
                else:
                    problems.append(f"{answer.status} {await answer.text()}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return acked, refused, problems


def test_a_flood_is_refused_with_retry_after_and_memory_stays_bounded(make_daemon):
    d = make_daemon(builtins=["storage", "collector"],
                    extra={"collector": {"max_in_flight": MAX_IN_FLIGHT},
                           "storage": STORAGE_NOT_RESTARTED}).start()
    url = f"http://{d.doc['collector']['listen']}/v1/events"
    collector = psutil.Process(d.services()["collector"]["pid"])
    rss_before = collector.memory_info().rss

    # While the event log cannot take anything, everything beyond the bound is refused at once.
    with events_held_in_flight(d, MAX_IN_FLIGHT):
        acked, refused, problems = asyncio.run(flood(url, "stalled", 400, 8))
        peak = collector.memory_info().rss
    assert not problems, problems[:3]
    assert acked == [] and refused == 400
    assert peak - rss_before < RSS_GROWTH_LIMIT, (rss_before, peak)

    # Running, more clients than it can serve at once: some answers are 200, some 503, and
    # the log holds exactly what was acknowledged.
    acked, refused, problems = asyncio.run(flood(url, "live", 400, 16))
    assert not problems, problems[:3]
    assert acked, "nothing was accepted"
    stored = [decode_event(p).event_id for p in read_log(d.runtime, "llm-events")]
    assert sorted(e for e in stored if e.startswith("live-")) == sorted(acked)
    assert collector.memory_info().rss - rss_before < RSS_GROWTH_LIMIT
    assert d.services()["collector"]["restarts"] == 0
