"""The processor's state and its steps, without I/O: events in, closed windows and findings out.

``ProcessorWorker`` feeds it what it reads from the logs and persists what comes out; the
whole state is one ``state_to_bytes()``, checkpointed with the log positions it reflects.
Everything advances on event time: windows close, analysis intervals pass and canary stages
are judged as the watermark (the newest event time minus the allowed lateness) passes their
ends, never by the wall clock, so hours of traffic replay in seconds with the same results.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ipc.config import ProcessorSection
from ipc.events import Feedback, LLMEvent
from ipc.prices import PriceTable
from workers.processor.dedup import Deduplicator
from workers.processor.findings import CANARY_VARIANT, FindingTracker, FindingUpdate
from workers.processor.history import WindowHistory
from workers.processor.proposals import Entry, ProposalBook
from workers.processor.recent import RecentEvents
from workers.processor.strategies.engine import DecisionEngine
from workers.processor.strategies.policy import DecisionPolicy
from workers.processor.windows import ClosedWindow, WindowedAggregator

NS = 1_000_000_000
FORMAT_VERSION = 1


class CoreStateError(ValueError):
    """A checkpointed state this version cannot continue from."""


class _State(msgspec.Struct, array_like=True):
    version: int
    dedup: bytes
    windows: bytes
    history: bytes
    recent: bytes
    findings: bytes
    proposals: bytes
    next_analysis_ns: int | None
    last_analysis_ns: int | None
    counters: dict[str, int]


@dataclass(slots=True)
class Analysis:
    boundary_ns: int
    findings: list[FindingUpdate]
    new_proposals: list[Entry]
    refreshed_proposals: list[Entry]


@dataclass(slots=True)
class Counters:
    events: int = 0        # events read from the log
    duplicates: int = 0    # dropped: an event id seen before
    late: int = 0          # after every window holding them had closed: counted, not aggregated
    feedback: int = 0      # quality scores joined to their event
    feedback_unmatched: int = 0  # scores for an event not (or no longer) known
    feedback_late: int = 0  # scores whose event's windows had closed


class ProcessorCore:
    def __init__(self, section: ProcessorSection, prices: PriceTable):
        self.section = section
        self.engine = DecisionEngine(decision_policy(section), prices)
        self.proposals = ProposalBook()
        self.dedup = Deduplicator(section.dedup_horizon_s, section.dedup_max_ids)
        self.windows = WindowedAggregator(section.tumbling_window_s, section.sliding_window_s,
                                          section.sliding_step_s, section.allowed_lateness_s)
        self.history = WindowHistory(section.lookback_windows, section.tumbling_window_s * NS)
        self.recent = RecentEvents()
        self.findings = FindingTracker()
        self.analysis_ns = section.analysis_interval_s * NS
        self.next_analysis_ns: int | None = None
        self.last_analysis_ns: int | None = None
        self.counters = Counters()
        # Set from the feature flags by the worker (not checkpointed: the flags are stored).
        self.proposing = True
        self.paused_strategies: frozenset[str] = frozenset()

    @property
    def watermark_ns(self) -> int:
        return self.windows.watermark_ns

    # --- events ---------------------------------------------------------------------------

    def ingest(self, events: Sequence[LLMEvent],
               observe: Callable[[LLMEvent], None] | None = None) -> int:
        """Count ``events`` in (in order) until the watermark passes the next analysis
        boundary; returns how many were taken, so that the caller runs the analysis before
        the rest. ``observe`` sees every event counted (not duplicates or late ones)."""
        counters, windows, dedup, recent = self.counters, self.windows, self.dedup, self.recent
        taken = 0
        for event in events:
            taken += 1
            counters.events += 1
            if dedup.seen(event.event_id, event.time_ns, windows.watermark_ns):
                counters.duplicates += 1
                continue
            if windows.add(event) == "late":
                counters.late += 1
                continue
            recent.remember(event.event_id,
                            (event.service, event.model, event.variant or "", event.operation),
                            event.time_ns)
            if observe is not None:
                observe(event)
            if self.next_analysis_ns is None:
                watermark = windows.watermark_ns
                self.next_analysis_ns = watermark - watermark % self.analysis_ns \
                    + self.analysis_ns
            elif windows.watermark_ns >= self.next_analysis_ns:
                break
        return taken

    def add_feedback(self, items: Iterable[Feedback]) -> None:
        for item in items:
            found = self.recent.find(item.event_id)
            if found is None:
                self.counters.feedback_unmatched += 1
                continue
            key, time_ns = found
            if self.windows.add_quality(key, time_ns, item.quality) == "late":
                self.counters.feedback_late += 1
            else:
                self.counters.feedback += 1

    def drain_windows(self) -> list[ClosedWindow]:
        """Windows closed since the last call; tumbling ones join the analysis history."""
        closed = self.windows.drain_closed()
        for window in closed:
            if window.kind == "tumbling":
                self.history.add(window.key, window.start_ns, window.end_ns,
                                 window.aggregate.summary())
        return closed

    # --- analysis -------------------------------------------------------------------------

    def due_analysis(self) -> int | None:
        """The next analysis boundary if the watermark has passed it (one at a time)."""
        due = self.next_analysis_ns
        if due is None or self.windows.watermark_ns < due:
            return None
        return due

    def analyze(self, boundary_ns: int) -> Analysis:
        """Findings and proposals at ``boundary_ns`` (from due_analysis), after draining the
        windows."""
        findings = self.findings.analyze(self.history.items(), boundary_ns,
                                         self.last_analysis_ns)
        new, refreshed = [], []
        if (self.proposing and boundary_ns // self.analysis_ns
                % self.section.decisions.every_intervals == 0):
            # Canary traffic is the rollout's to judge, not a base for new proposals.
            settled = {key: rows for key, rows in self.history.items()
                       if key[2] != CANARY_VARIANT}
            proposals = self.engine.propose(self.engine.views(settled), boundary_ns,
                                            skip=self.paused_strategies)
            new, refreshed = self.proposals.update(proposals, boundary_ns)
        self.last_analysis_ns = boundary_ns
        self.next_analysis_ns = boundary_ns + self.analysis_ns
        return Analysis(boundary_ns, findings, new, refreshed)

    def summary(self) -> dict[str, Any]:
        """Counters and sizes for status."""
        by_status: dict[str, int] = {}
        for entry in self.proposals.entries.values():
            by_status[entry.status] = by_status.get(entry.status, 0) + 1
        return {**vars_of(self.counters), "watermark_ns": self.watermark_ns,
                "open_panes": self.windows.open_panes, "keys": len(self.history),
                "dedup_ids": len(self.dedup), "last_analysis_ns": self.last_analysis_ns,
                "partly_late": self.windows.partly_late_count,
                "late_recent": [{"event_id": e, "time_ns": t, "watermark_ns": w}
                                for e, t, w in list(self.windows.late_samples)[-5:]],
                "proposals": by_status}

    # --- checkpoint -----------------------------------------------------------------------

    def state_to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(_State(
            FORMAT_VERSION, self.dedup.to_bytes(), self.windows.state_to_bytes(),
            self.history.to_bytes(), self.recent.to_bytes(), self.findings.to_bytes(),
            self.proposals.to_bytes(), self.next_analysis_ns, self.last_analysis_ns,
            vars_of(self.counters)))

    @classmethod
    def from_state_bytes(cls, section: ProcessorSection, prices: PriceTable,
                         data: bytes) -> ProcessorCore:
        try:
            state = msgspec.msgpack.decode(data, type=_State)
        except msgspec.DecodeError as exc:
            raise CoreStateError(f"processor state unreadable: {exc}") from exc
        if state.version != FORMAT_VERSION:
            raise CoreStateError(f"processor state format {state.version}; this version "
                                 f"continues from {FORMAT_VERSION}")
        core = cls(section, prices)
        core.dedup = Deduplicator.from_bytes(state.dedup)
        core.windows = WindowedAggregator.from_state_bytes(state.windows)
        core.history = WindowHistory.from_bytes(state.history)
        core.recent = RecentEvents.from_bytes(state.recent)
        core.findings = FindingTracker.from_bytes(state.findings)
        core.proposals = ProposalBook.from_bytes(state.proposals)
        core.next_analysis_ns, core.last_analysis_ns = (state.next_analysis_ns,
                                                        state.last_analysis_ns)
        core.counters = Counters(**state.counters)
        return core


def decision_policy(section: ProcessorSection) -> DecisionPolicy:
    decisions = section.decisions
    return DecisionPolicy(strategies=list(decisions.strategies),
                          quality_tolerance=decisions.quality_tolerance,
                          latency_tolerance=decisions.latency_tolerance,
                          latency_budget_ms=decisions.latency_budget_ms or None,
                          min_samples=decisions.min_samples, auto_deploy=decisions.auto_deploy,
                          lookback_windows=section.lookback_windows)


def vars_of(counters: Counters) -> dict[str, int]:
    return {name: getattr(counters, name) for name in Counters.__slots__}
