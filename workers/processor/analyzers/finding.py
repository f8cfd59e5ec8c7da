"""What every analyzer returns: a Finding about one key (service, model, operation) over a span
of windows, with the numbers that back it, so that a decision can be audited later."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

Severity = Literal["info", "warning", "critical"]


class SeriesKey(msgspec.Struct, frozen=True):
    service: str
    model: str
    operation: str


class Finding(msgspec.Struct, frozen=True):
    kind: str  # e.g. "latency_regression", "spend_spike", "quality_drop"
    service: str
    model: str
    operation: str
    severity: Severity
    title: str
    detail: str
    evidence: dict[str, float]
    window_start_ns: int
    window_end_ns: int

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


def make_finding(key: SeriesKey, kind: str, severity: Severity, title: str, detail: str,
                 evidence: Mapping[str, float], windows: list[dict]) -> Finding:
    """A finding spanning ``windows`` (in time order); evidence values become plain floats."""
    return Finding(kind, key.service, key.model, key.operation, severity, title, detail,
                   {k: float(v) for k, v in evidence.items()},
                   int(windows[0]["window_start_ns"]), int(windows[-1]["window_end_ns"]))
