"""The interface every storage backend implements, its typed failures, and request validation.

The storage server validates each operation once (names, namespaces, sizes, limits), then hands
writes to ``Backend.write`` in groups (one durable commit for the whole group: group commit)
and reads to ``Backend.read``. A backend answers each write of a group on its own: one
conflicting document update does not fail its neighbours.
"""
from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from ipc import storage as s
from ipc.storage import (BadRequest, Conflict, NotFound, StorageFailure, TooLarge,  # noqa: F401
                         Unavailable, UnknownNamespace)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _name(kind: str, value: str) -> None:
    if not NAME_PATTERN.match(value):
        raise BadRequest(f"{kind} {value!r}: 1-128 characters of A-Z a-z 0-9 _ . : -")


def _namespace(ns: str) -> None:
    if ns not in s.NAMESPACES:
        known = ", ".join(sorted(s.NAMESPACES))
        raise UnknownNamespace(f"unknown namespace {ns!r}; known: {known}")


def _key(key: bytes) -> None:
    if not key or len(key) > s.MAX_KEY_BYTES:
        raise BadRequest(f"key of {len(key)} bytes: must be 1 to {s.MAX_KEY_BYTES}")


def _value(value: bytes, what: str = "value") -> None:
    if len(value) > s.MAX_VALUE_BYTES:
        raise TooLarge(f"{what} of {len(value)} bytes exceeds {s.MAX_VALUE_BYTES}")


def _int64(value: int, what: str) -> None:
    if not -(1 << 63) <= value < (1 << 63):
        raise BadRequest(f"{what} {value} does not fit in a signed 64-bit integer")


def _limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise BadRequest(f"limit {limit}: must be 1 to {most}")


def validate(op: s.Op) -> None:
    """Raise a StorageFailure for anything a backend should never see."""
    if hasattr(op, "ns"):
        _namespace(op.ns)
    if isinstance(op, (s.Get, s.Delete)):
        _key(op.key)
    elif isinstance(op, s.Put):
        _key(op.key)
        _value(op.value)
    elif isinstance(op, s.Scan):
        _limit(op.limit, s.MAX_SCAN_LIMIT)
        if len(op.prefix) > s.MAX_KEY_BYTES:
            raise BadRequest("prefix longer than a key can be")
    elif isinstance(op, s.Batch):
        if not op.ops:
            raise BadRequest("empty batch")
        for inner in op.ops:
            validate(inner)
    elif isinstance(op, s.TsAppend):
        _name("series", op.series)
        for point in op.points:
            _int64(point.ts, "ts")
            _value(point.value, "point")
    elif isinstance(op, s.TsRange):
        _name("series", op.series)
        _int64(op.start, "start")
        _int64(op.end, "end")
        _limit(op.limit, s.MAX_SCAN_LIMIT)
    elif isinstance(op, (s.DocPut, s.DocGet, s.DocHistory)):
        _name("document id", op.id)
        if isinstance(op, s.DocPut):
            _value(op.body, "document")
            if op.expected_version is not None and op.expected_version < 0:
                raise BadRequest("expected_version must be >= 0")
            _int64(op.expected_version or 0, "expected_version")
        if isinstance(op, s.DocGet) and op.version is not None:
            if op.version < 0:
                raise BadRequest("version must be >= 0 (0 or none: the current one)")
            _int64(op.version, "version")
        if isinstance(op, s.DocHistory):
            _limit(op.limit, s.MAX_SCAN_LIMIT)
    elif isinstance(op, s.DocList):
        _limit(op.limit, s.MAX_SCAN_LIMIT)
    elif isinstance(op, (s.LogAppend, s.LogRead, s.LogInfo)):
        _name("log", op.log)
        if isinstance(op, s.LogAppend):
            if not op.records:
                raise BadRequest("no records to append")
            for record in op.records:
                _value(record, "record")
        if isinstance(op, s.LogRead):
            _limit(op.max_records, s.MAX_LOG_READ)
            if op.offset < 0:
                raise BadRequest("offset must be >= 0")
            _int64(op.offset, "offset")
            if not 0 <= op.wait_ms <= s.MAX_WAIT_MS:
                raise BadRequest(f"wait_ms must be 0 to {s.MAX_WAIT_MS}")
    elif isinstance(op, (s.LogCommit, s.LogCommitted)):
        _name("log", op.log)
        _name("consumer group", op.group)
        if isinstance(op, s.LogCommit):
            if op.offset < 0:
                raise BadRequest("offset must be >= 0")
            _int64(op.offset, "offset")


def stage_each(ops: Sequence[s.Op], stage: Callable[[s.Op], Any]) -> list[Any]:
    """Stage every op of a write group: its result, or the StorageFailure that refused it
    (a refusal never stops its neighbours)."""
    results: list[Any] = []
    for op in ops:
        try:
            results.append(stage(op))
        except StorageFailure as exc:
            results.append(exc)
    return results


class Backend(ABC):
    """Where the storage worker keeps state. Only the storage worker talks to it."""

    name = "backend"

    @abstractmethod
    async def open(self) -> None:
        """Connect or open; raise Unavailable when the store cannot be reached."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def check(self) -> None:
        """A real round trip to the store; raise Unavailable when it fails."""

    @abstractmethod
    def backup(self, target: str) -> dict[str, Any]:
        """A consistent copy of the running store in the new directory ``target`` (blocking:
        called in a thread); the result holds at least ``path``."""

    @abstractmethod
    async def write(self, ops: Sequence[s.Op]) -> list[Any]:
        """Apply validated write operations in one durable commit. Returns, per op, its result
        or the StorageFailure that refused it (the others are still applied)."""

    @abstractmethod
    async def read(self, op: s.Op) -> Any:
        """Answer a validated read operation."""

    @abstractmethod
    async def apply_retention(self, max_age_ms: int, max_records: int) -> int:
        """Drop event-log records older than max_age_ms or beyond the newest max_records of
        each log (0: no limit); returns how many were dropped."""

    def stats(self) -> dict[str, Any]:
        return {"backend": self.name}
