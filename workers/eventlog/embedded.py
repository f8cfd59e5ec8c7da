"""The embedded event log: records and committed offsets kept by the storage worker."""
from __future__ import annotations

from collections.abc import Sequence

from ipc import storage as s
from workers.eventlog import ConsumedRecord, Consumer, EventLogError, Producer
from workers.storage_client import StorageClient



class EmbeddedProducer(Producer):
    def __init__(self, log: str, runtime_dir: str):
        self.log = log
        self.client = StorageClient(runtime_dir)

    async def append(self, payloads: Sequence[bytes], key: bytes | None = None) -> None:
        try:
            await self.client.append(self.log, list(payloads))
        except s.StorageFailure as exc:
            raise EventLogError(f"append to {self.log} failed: {exc}") from exc

    async def close(self) -> None:
        await self.client.close()


class EmbeddedConsumer(Consumer):
    def __init__(self, log: str, runtime_dir: str, group: str):
        self.log, self.group = log, group
        self.client = StorageClient(runtime_dir)
        self.position: int | None = None  # next offset to read

    async def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[ConsumedRecord]:
        try:
            if self.position is None:
                self.position = await self.client.committed(self.group, self.log)
            # A long poll: the storage worker answers at the next append or after the timeout.
            result = await self.client.call(
                s.LogRead(log=self.log, offset=self.position, max_records=max_records,
                          wait_ms=int(timeout * 1000)), timeout=timeout + 5.0)
        except s.StorageFailure as exc:
            raise EventLogError(f"read of {self.log} failed: {exc}") from exc
        self.position = result.next_offset
        return [ConsumedRecord(0, r.offset, r.appended_ms, r.payload) for r in result.records]

    def resume_from(self, positions: dict[int, int]) -> None:
        if 0 in positions:
            self.position = positions[0]

    async def commit(self, records: Sequence[ConsumedRecord]) -> None:
        if not records:
            return
        try:
            await self.client.commit(self.group, self.log, max(r.offset for r in records) + 1)
        except s.StorageFailure as exc:
            raise EventLogError(f"commit on {self.log} failed: {exc}") from exc

    async def close(self) -> None:
        await self.client.close()
