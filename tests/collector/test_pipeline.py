"""The ingest pipeline's own rules, without processes: bounds and the event-log breaker."""
from __future__ import annotations

import asyncio

import pytest

from ipc.events import parse_json_event
from ipc.prices import shipped_prices
from workers.collector.pipeline import IngestPipeline, NotDurable, Overloaded
from workers.eventlog import EventLogError, Producer

EVENT = parse_json_event({"event_id": "e", "time": 1_700_000_000, "service": "s",
                          "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1,
                          "latency_ms": 1}, 0)


class FailingLog(Producer):
    def __init__(self) -> None:
        self.calls = 0

    async def append(self, payloads, key=None) -> None:
        self.calls += 1
        raise EventLogError("storage is restarting")

    async def close(self) -> None:
        pass


def test_a_failing_event_log_opens_the_breaker_so_requests_fail_fast():
    log = FailingLog()
    pipeline = IngestPipeline(log, storage=None, prices=shipped_prices(), max_in_flight=100)

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(NotDurable):
                await pipeline.submit("json", [EVENT], 0.0)
        with pytest.raises(NotDurable) as refused:
            await pipeline.submit("json", [EVENT], 0.0)
        assert log.calls == 3, "an open breaker must not try the event log again"
        assert refused.value.retry_after >= 1.0
        assert pipeline.in_flight == 0

    asyncio.run(scenario())


class GatedLog(Producer):
    """Appends wait until ``opened`` is set: events stay in flight meanwhile."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.appended: list[bytes] = []

    async def append(self, payloads, key=None) -> None:
        await self.opened.wait()
        self.appended += payloads

    async def close(self) -> None:
        pass


def test_a_batch_over_the_in_flight_bound_is_refused_whole_while_others_are_in_flight():
    log = GatedLog()
    pipeline = IngestPipeline(log, storage=None, prices=shipped_prices(), max_in_flight=2)

    async def scenario() -> None:
        first = asyncio.create_task(pipeline.submit("json", [EVENT], 0.0))
        while pipeline.in_flight == 0:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await pipeline.submit("json", [EVENT] * 2, 0.0)
        assert refused.value.retry_after > 0 and pipeline.in_flight == 1
        log.opened.set()
        await first
        # Alone, a batch larger than the bound goes through: refusing it would be for ever.
        await pipeline.submit("json", [EVENT] * 3, 0.0)
        assert len(log.appended) == 4 and pipeline.in_flight == 0

    asyncio.run(scenario())
