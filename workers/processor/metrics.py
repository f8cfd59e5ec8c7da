"""The processor's Prometheus series: what it counted, found, proposed and rolled out, and the
monitored applications' calls, errors and spend per service and model (from closed tumbling
windows), so that alerts can watch cost, quality findings and rollbacks.

Series are per process and start from zero at a restart, as counters do; events read again
after a crash (between two checkpoints) are counted again here, never in the stored state.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge

from workers.processor.core import Analysis, Counters
from workers.processor.windows import ClosedWindow

EVENTS = Counter("processor_events", "LLM-call events read from the event log, by outcome "
                 "(counted, duplicate, late).", ["outcome"])
FINDINGS = Counter("processor_findings", "New findings, by kind (e.g. spend_spike, "
                   "quality_drop, latency_regression, drift) and severity.",
                   ["kind", "severity"])
PROPOSALS = Counter("processor_proposals", "New proposals, by strategy.", ["strategy"])
TRANSITIONS = Counter("processor_rollout_transitions", "Canary rollout transitions, by kind "
                      "(started, stage_advanced, promoted, rolled_back).", ["kind"])
CALLS = Counter("processor_llm_calls", "Monitored LLM calls in closed windows.",
                ["service", "model"])
ERRORS = Counter("processor_llm_errors", "Monitored LLM calls that failed, in closed windows.",
                 ["service", "model"])
COST = Counter("processor_llm_cost_usd", "Spend of the monitored LLM calls in closed windows, "
               "in USD.", ["service", "model"])
WATERMARK = Gauge("processor_watermark_seconds", "Event-time watermark (Unix seconds): windows "
                  "before it are closed.", multiprocess_mode="max")


def _outcomes(counters: Counters) -> dict[str, int]:
    return {"duplicate": counters.duplicates, "late": counters.late,
            "counted": counters.events - counters.duplicates - counters.late}


# Shown at 0 from the start, so that alerts and dashboards see the series before the first
# finding or rollback (a labelled series appears only once a label set is used).
FINDING_KINDS = ("spend_spike", "cost_per_call_drift", "latency_regression", "quality_drop",
                 "anomaly", "burst", "repeated_prompts")
TRANSITION_KINDS = ("started", "stage_advanced", "promoted", "rolled_back")


class ProcessorMetrics:
    def __init__(self, restored: Counters) -> None:
        """``restored``: the totals a checkpoint brought back, counted by an earlier process
        (whose series the supervisor keeps in the aggregate)."""
        self.seen = _outcomes(restored)
        for outcome in self.seen:
            EVENTS.labels(outcome)
        for kind in FINDING_KINDS:
            for severity in ("info", "warning", "critical"):
                FINDINGS.labels(kind, severity)
        for kind in TRANSITION_KINDS:
            TRANSITIONS.labels(kind)

    def counters(self, counters: Counters, watermark_ns: int) -> None:
        """The core's running totals as counter increments."""
        for outcome, total in _outcomes(counters).items():
            if total > self.seen[outcome]:
                EVENTS.labels(outcome).inc(total - self.seen[outcome])
            self.seen[outcome] = total
        if watermark_ns > 0:
            WATERMARK.set(watermark_ns / 1e9)

    @staticmethod
    def windows(closed: Sequence[ClosedWindow]) -> None:
        for window in closed:
            if window.kind != "tumbling":
                continue  # sliding windows overlap: counting them would count calls twice
            service, model, aggregate = window.key[0], window.key[1], window.aggregate
            # the raw counts, not summary(): that computes quantiles, already paid for once
            CALLS.labels(service, model).inc(aggregate.count)
            ERRORS.labels(service, model).inc(aggregate.errors)
            COST.labels(service, model).inc(aggregate.cost_usd)

    @staticmethod
    def analysis(analysis: Analysis) -> None:
        for update in analysis.findings:
            if update.new:
                FINDINGS.labels(update.finding.kind, update.finding.severity).inc()
        for entry in analysis.new_proposals:
            PROPOSALS.labels(entry.proposal.strategy).inc()

    @staticmethod
    def transitions(items: Iterable[dict[str, Any]]) -> None:
        for transition in items:
            TRANSITIONS.labels(transition["kind"]).inc()
