"""Running the analyzers over every key's recent windows, and telling new findings from ones
already reported.

A regression lasting an hour would otherwise be reported again at every analysis interval.
A finding is identified by its kind and key: while the analyzers keep finding it at every
interval it is the same finding (its document gets a new version with the latest evidence, no
new notification); once an interval passes without it, it is resolved, and a later occurrence
is a new finding with a new id. A key without a new window since the last analysis is not
analyzed again: its findings stand as they were.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from ipc.window_series import KeyT, key_digest
from workers.processor.analyzers import (
    Finding,
    InvalidSeries,
    SeriesKey,
    anomaly,
    cost,
    pattern,
    performance,
    quality,
)

log = logging.getLogger("workers.processor.findings")
ANALYZERS = (performance, cost, quality, pattern, anomaly)
CANARY_VARIANT = "canary"  # canary traffic is judged by the rollout, not the analyzers


@dataclass(slots=True)
class FindingUpdate:
    id: str
    finding: Finding
    key: KeyT
    new: bool  # first seen at this interval (else: still present, evidence updated)

    def to_dict(self) -> dict:
        return {"id": self.id, "variant": self.key[2], "new": self.new,
                **self.finding.to_dict()}


class _Active(msgspec.Struct, array_like=True):
    id: str
    last_boundary_ns: int


class FindingTracker:
    def __init__(self) -> None:
        self._active: dict[tuple[str, str], _Active] = {}  # (kind, key digest) -> active
        self._analyzed_end: dict[str, int] = {}  # key digest -> newest window end analyzed
        self.analyzer_errors = 0

    def analyze(self, history: Iterable[tuple[KeyT, list[dict]]], boundary_ns: int,
                previous_boundary_ns: int | None) -> list[FindingUpdate]:
        updates = []
        seen: dict[str, int] = {}
        for key, series in history:
            if key[2] == CANARY_VARIANT or not series:
                continue
            digest, newest = key_digest(key), series[-1]["window_end_ns"]
            seen[digest] = newest
            if self._analyzed_end.get(digest) == newest:
                # No new window since the last analysis: the same findings hold.
                for (_, of_key), active in self._active.items():
                    if of_key == digest:
                        active.last_boundary_ns = boundary_ns
                continue
            series_key = SeriesKey(service=key[0], model=key[1], operation=key[3])
            for analyzer in ANALYZERS:
                try:
                    found = analyzer.analyze(series, series_key)
                except InvalidSeries:
                    self.analyzer_errors += 1
                    log.exception("analyzer %s failed on %s", analyzer.__name__, key)
                    continue
                updates += [self._track(f, key, boundary_ns, previous_boundary_ns)
                            for f in found]
        # Findings not seen at this boundary are resolved.
        self._active = {k: a for k, a in self._active.items()
                        if a.last_boundary_ns == boundary_ns}
        self._analyzed_end = seen
        return updates

    def _track(self, finding: Finding, key: KeyT, boundary_ns: int,
               previous_boundary_ns: int | None) -> FindingUpdate:
        ident = (finding.kind, key_digest(key))
        active = self._active.get(ident)
        if active is not None and active.last_boundary_ns in (boundary_ns, previous_boundary_ns):
            active.last_boundary_ns = boundary_ns
            return FindingUpdate(active.id, finding, key, new=False)
        finding_id = f"{finding.kind}.{ident[1]}.{boundary_ns // 1_000_000_000}"
        self._active[ident] = _Active(finding_id, boundary_ns)
        return FindingUpdate(finding_id, finding, key, new=True)

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(([(k, a) for k, a in self._active.items()],
                                       self._analyzed_end))

    @classmethod
    def from_bytes(cls, data: bytes) -> FindingTracker:
        tracker = cls()
        active, tracker._analyzed_end = msgspec.msgpack.decode(
            data, type=tuple[list[tuple[tuple[str, str], _Active]], dict[str, int]])
        for (kind, digest), entry in active:
            tracker._active[(kind, digest)] = entry
        return tracker
