"""FindingTracker: a finding is announced once while it lasts, a key without a new window is
not analyzed again (its findings stand), and a finding gone for an interval is resolved."""
from __future__ import annotations

from tests.processor.test_analyzers import WINDOW_NS, healthy, scale
from workers.processor.findings import FindingTracker

KEY = ("search", "gpt-4o", "", "chat")


def latency(updates) -> list:
    return [u for u in updates if u.finding.kind == "latency_regression"]


def test_findings_persist_without_new_windows_and_resolve_when_gone():
    tracker = FindingTracker()
    slow = scale(healthy(40, 2), "p95_ms", 1.3, 6)
    [first] = latency(tracker.analyze([(KEY, slow)], 40 * WINDOW_NS, None))
    assert first.new

    # No new window: not analyzed again (no update at all), the finding still active ...
    assert tracker.analyze([(KEY, slow)], 41 * WINDOW_NS, 40 * WINDOW_NS) == []
    # ... so that when a new window comes and the regression is still there, it is the same
    # finding, updated rather than announced again.
    more = slow + [{**slow[-1], "window_start_ns": 40 * WINDOW_NS,
                    "window_end_ns": 41 * WINDOW_NS}]
    [again] = latency(tracker.analyze([(KEY, more)], 42 * WINDOW_NS, 41 * WINDOW_NS))
    assert not again.new and again.id == first.id

    # Back to normal: resolved; a later regression is a new finding with a new id.
    normal = healthy(42, 2)
    assert latency(tracker.analyze([(KEY, normal)], 43 * WINDOW_NS, 42 * WINDOW_NS)) == []
    relapse = scale(healthy(43, 3), "p95_ms", 1.3, 6)
    [later] = latency(tracker.analyze([(KEY, relapse)], 44 * WINDOW_NS, 43 * WINDOW_NS))
    assert later.new and later.id != first.id

    restored = FindingTracker.from_bytes(tracker.to_bytes())
    assert restored.analyze([(KEY, relapse)], 45 * WINDOW_NS, 44 * WINDOW_NS) == []
