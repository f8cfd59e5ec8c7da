"""The event log between the collector and the processor: one interface, two implementations.

``embedded`` keeps the log in the storage worker's backend (LevelDB or PostgreSQL) with one
partition; ``kafka`` uses a Kafka topic, whose partitions the consumers of a group share.
Producers return from ``append`` only once the records are durable (fsynced by the storage
worker, or acknowledged by all in-sync Kafka replicas), so the collector may then acknowledge
its client. Consumers ``commit`` only after processing: a crash re-delivers what was not
committed, never loses it (the processor drops duplicates by event id).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from msgspec import Struct

from ipc.config import Config


class ConsumedRecord(Struct, frozen=True):
    partition: int
    offset: int
    timestamp_ms: int
    payload: bytes
    key: bytes | None = None  # the Kafka record's key, if any


class EventLogError(Exception):
    """The log could not be written or read; the reason says why."""


class Producer(ABC):
    @abstractmethod
    async def append(self, payloads: Sequence[bytes], key: bytes | None = None) -> None:
        """Return once every payload is durable, or raise EventLogError."""

    @abstractmethod
    async def close(self) -> None: ...


class Consumer(ABC):
    @abstractmethod
    async def poll(self, max_records: int = 500, timeout: float = 1.0) -> list[ConsumedRecord]:
        """The next records after the committed position (or after the last poll); an empty
        list when none arrived within ``timeout``."""

    @abstractmethod
    def resume_from(self, positions: dict[int, int]) -> None:
        """Read on from these (partition -> next offset) positions instead of the committed
        ones, for a reader that keeps its positions with its own state; called before the
        first poll."""

    @abstractmethod
    async def commit(self, records: Sequence[ConsumedRecord]) -> None:
        """Mark these records (and everything before them in their partitions) processed."""

    @abstractmethod
    async def close(self) -> None: ...


def open_producer(config: Config, runtime_dir: str) -> Producer:
    section = config.event_log
    if section.backend == "kafka":
        from workers.eventlog.kafka import KafkaProducer

        return KafkaProducer(section)
    from workers.eventlog.embedded import EmbeddedProducer

    return EmbeddedProducer(section.log, runtime_dir)


def open_consumer(config: Config, runtime_dir: str, group: str) -> Consumer:
    section = config.event_log
    if section.backend == "kafka":
        from workers.eventlog.kafka import KafkaConsumer

        return KafkaConsumer(section, group)
    from workers.eventlog.embedded import EmbeddedConsumer

    return EmbeddedConsumer(section.log, runtime_dir, group)
