"""Event-time windows: boundaries, watermark, lateness, panes vs direct, checkpoint/restore."""
from __future__ import annotations

import numpy as np
import pytest

from ipc.events import LLMEvent
from workers.processor.aggregates import Aggregate, event_key
from workers.processor.windows import (
    LATE_SAMPLES,
    CheckpointDecodeError,
    WindowAssigner,
    WindowConfigError,
    WindowedAggregator,
)

NS = 1_000_000_000


def ev(t_s: float, i: int = 0, service: str = "svc", **fields) -> LLMEvent:
    base = dict(event_id=f"e{i}-{t_s}", time_ns=round(t_s * NS), service=service, model="m",
                input_tokens=10, output_tokens=5, latency_ms=50.0 + i % 97)
    return LLMEvent(**(base | fields))


def stream(n: int, seed: int, span_s: int = 1800, late_share: float = 0.01) -> list[LLMEvent]:
    """Roughly ordered events over ``span_s``: jitter up to 20 s, a share up to 6 min late."""
    rng = np.random.default_rng(seed)
    times = np.linspace(0, span_s * NS, n).astype(np.int64) - rng.integers(0, 20 * NS, n)
    late = rng.random(n) < late_share
    times[late] -= rng.integers(0, 360 * NS, int(late.sum()))
    times = np.maximum(times, 0)
    latency = rng.lognormal(5.0, 0.7, n)
    keys = rng.integers(0, 6, n)
    fingerprints = rng.integers(0, 12, n)
    quality = rng.random(n)
    return [LLMEvent(event_id=f"e{i}", time_ns=int(times[i]), service=f"s{keys[i] % 3}",
                     model="m", variant="ab"[keys[i] % 2], input_tokens=int(keys[i]),
                     output_tokens=1, latency_ms=float(latency[i]), cost_usd=0.25 * (i % 4),
                     quality=float(quality[i]) if i % 2 else None,
                     prompt_fingerprint=f"fp{fingerprints[i]}",
                     status="error" if i % 13 == 0 else "ok")
            for i in range(n)]


def described(windows) -> list[tuple]:
    return [(w.kind, w.start_ns, w.end_ns, w.key, w.aggregate.summary()) for w in windows]


# --- assignment ---------------------------------------------------------------------------

def test_assigner_aligns_to_the_epoch_and_puts_a_boundary_in_the_next_window():
    tumbling = WindowAssigner(60)
    assert tumbling.windows_for(0) == [0]
    assert tumbling.windows_for(60 * NS - 1) == [0]
    assert tumbling.windows_for(60 * NS) == [60 * NS]
    sliding = WindowAssigner(300, 60)
    assert sliding.windows_for(60 * NS) == [s * NS for s in (-180, -120, -60, 0, 60)]
    assert sliding.windows_for(119 * NS) == [s * NS for s in (-180, -120, -60, 0, 60)]
    assert sliding.windows_for(1_700_000_000 * NS)[-1] == 1_699_999_980 * NS


def test_invalid_window_sizes_are_rejected():
    with pytest.raises(WindowConfigError):
        WindowAssigner(300, 70)
    with pytest.raises(WindowConfigError):
        WindowAssigner(0)
    with pytest.raises(WindowConfigError):
        WindowedAggregator(allowed_lateness_s=-1)


def test_event_exactly_at_a_boundary_belongs_to_the_window_it_starts():
    agg = WindowedAggregator(tumbling_s=60, sliding_s=60, slide_s=60, allowed_lateness_s=0)
    agg.add(ev(59.999999999))
    agg.add(ev(60))
    agg.add(ev(120))  # watermark 120: closes [0, 60) and [60, 120)
    closed = agg.drain_closed()
    tumbling = [(w.start_ns, w.aggregate.count) for w in closed if w.kind == "tumbling"]
    assert tumbling == [(0, 1), (60 * NS, 1)]


# --- watermark and lateness ---------------------------------------------------------------

def test_watermark_is_max_time_minus_lateness_and_never_moves_back():
    agg = WindowedAggregator(allowed_lateness_s=30)
    seen = []
    for t in (100, 90, 130, 95, 131):
        agg.add(ev(t))
        seen.append(agg.watermark_ns // NS)
    assert seen == [70, 70, 100, 100, 101]


def test_a_window_closes_when_the_watermark_reaches_its_end():
    agg = WindowedAggregator(tumbling_s=60, sliding_s=60, slide_s=60, allowed_lateness_s=30)
    agg.add(ev(10))
    agg.add(ev(89.999))  # watermark 59.999: still open
    assert agg.drain_closed() == []
    agg.add(ev(90))  # watermark 60 = end
    closed = agg.drain_closed()
    assert [(w.kind, w.start_ns, w.end_ns, w.aggregate.count) for w in closed] == \
        [("tumbling", 0, 60 * NS, 1), ("sliding", 0, 60 * NS, 1)]
    assert agg.drain_closed() == []  # drained windows are forgotten


def test_lateness_inside_the_allowance_is_accepted_outside_is_counted_late():
    agg = WindowedAggregator(tumbling_s=60, sliding_s=60, slide_s=60, allowed_lateness_s=30)
    assert agg.add(ev(85)) == "accepted"  # watermark 55
    assert agg.add(ev(59, i=1)) == "accepted"  # 26 s late, [0, 60) still open
    assert agg.add(ev(95)) == "accepted"  # watermark 65 closes [0, 60)
    assert agg.add(ev(59, i=2)) == "late"
    assert agg.late_count == 1
    assert list(agg.late_samples) == [("e2-59", 59 * NS, 65 * NS)]
    first = agg.drain_closed()[0]
    assert (first.start_ns, first.aggregate.count) == (0, 1)  # the late one is not in it


def test_partly_late_event_goes_into_its_open_sliding_windows_only():
    agg = WindowedAggregator(allowed_lateness_s=30)  # 60 s tumbling, 300/60 s sliding
    agg.add(ev(100))
    agg.add(ev(400))  # watermark 370
    before = {(w.kind, w.start_ns) for w in agg.drain_closed()}
    assert {("tumbling", 60 * NS), ("sliding", 60 * NS)} <= before
    assert agg.add(ev(130, i=1)) == "accepted"  # [120, 180) is closed, [120, 420) is not
    assert agg.partly_late_count == 1
    assert agg.add(ev(110, i=2)) == "late"  # its last window, [60, 360), is closed
    agg.add(ev(1000))
    after = {(w.kind, w.start_ns): w.aggregate.count for w in agg.drain_closed()}
    assert after[("sliding", 120 * NS)] == 2  # the 130 s and the 400 s events
    assert ("tumbling", 120 * NS) not in after  # a closed window is never emitted again


def test_late_samples_are_bounded():
    agg = WindowedAggregator(allowed_lateness_s=0)
    agg.add(ev(10_000))
    for i in range(LATE_SAMPLES + 50):
        assert agg.add(ev(1, i=i)) == "late"
    assert agg.late_count == LATE_SAMPLES + 50
    assert len(agg.late_samples) == LATE_SAMPLES
    assert agg.late_samples[-1][0] == f"e{LATE_SAMPLES + 49}-1"


# --- panes vs direct computation ----------------------------------------------------------

def run_all(agg: WindowedAggregator, events: list[LLMEvent]) -> list:
    closed = []
    for event in events:
        agg.add(event)
        closed += agg.drain_closed()
    return closed


def flush(agg: WindowedAggregator, closed: list) -> list:
    agg.add(ev(10 ** 6, service="flush"))
    return closed + [w for w in agg.drain_closed() if w.key[0] != "flush"]


def test_windows_from_panes_equal_direct_computation():
    events = stream(4000, seed=11, span_s=1200, late_share=0)
    agg = WindowedAggregator(tumbling_s=60, sliding_s=300, slide_s=60, allowed_lateness_s=30)
    closed = flush(agg, run_all(agg, events))
    assert agg.late_count == 0
    ends = [(w.end_ns, w.key) for w in closed]
    assert ends == sorted(ends)
    kinds = {w.kind for w in closed}
    assert kinds == {"tumbling", "sliding"}
    for window in closed:
        direct = Aggregate()
        for event in events:
            if window.start_ns <= event.time_ns < window.end_ns and \
                    event_key(event) == window.key:
                direct.add(event)
        got, want = window.aggregate.summary(), direct.summary()
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=1e-9), name
            else:
                assert got[name] == value, (window.kind, window.start_ns, name)
    n_keys = len({event_key(e) for e in events})
    assert len([w for w in closed if w.kind == "tumbling"]) == 20 * n_keys


def test_state_is_bounded_by_open_windows_times_keys():
    events = stream(30_000, seed=12, span_s=6 * 3600, late_share=0)
    agg = WindowedAggregator()
    most = 0
    for event in events:
        agg.add(event)
        agg.drain_closed()
        most = max(most, agg.open_panes)
    # 6 keys; a pane lives until its last sliding window closes: 5 panes plus the lateness
    assert most <= 6 * 7


# --- checkpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("drain_before_checkpoint", [True, False])
def test_restore_and_continue_gives_exactly_the_uninterrupted_windows(drain_before_checkpoint):
    events = stream(6000, seed=13, span_s=3600, late_share=0.02)
    whole = WindowedAggregator()
    expected = described(flush(whole, run_all(whole, events)))

    first = WindowedAggregator()
    closed = []
    for event in events[:3000]:
        first.add(event)
        if drain_before_checkpoint:
            closed += first.drain_closed()
    restored = WindowedAggregator.from_state_bytes(first.state_to_bytes())
    assert restored.watermark_ns == first.watermark_ns
    closed = flush(restored, closed + run_all(restored, events[3000:]))
    assert described(closed) == expected
    assert (restored.late_count, restored.partly_late_count) == \
        (whole.late_count, whole.partly_late_count)
    assert restored.late_count > 0
    assert list(restored.late_samples) == list(whole.late_samples)


def test_bad_checkpoint_raises_a_typed_error():
    with pytest.raises(CheckpointDecodeError):
        WindowedAggregator.from_state_bytes(b"\x01\x02")
