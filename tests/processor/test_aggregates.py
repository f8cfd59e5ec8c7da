"""Aggregate and Space-Saving against exact answers computed with numpy on known data."""
from __future__ import annotations

import numpy as np
import pytest

from ipc.events import LLMEvent
from workers.processor.aggregates import (
    MAX_ERROR_TYPES,
    OTHER_ERROR,
    Aggregate,
    AggregateDecodeError,
    event_key,
)
from workers.processor.heavy_hitters import HeavyHittersDecodeError, SpaceSaving

NS = 1_000_000_000


def make_event(i: int, latency: float = 100.0, **fields) -> LLMEvent:
    base = dict(event_id=f"e{i}", time_ns=i * NS, service="svc", model="m", input_tokens=10,
                output_tokens=5, latency_ms=latency)
    return LLMEvent(**(base | fields))


def random_events(n: int, seed: int) -> list[LLMEvent]:
    rng = np.random.default_rng(seed)
    latency = rng.lognormal(5.5, 0.8, n)
    quality = rng.beta(5, 2, n)
    fingerprints = rng.integers(0, 20, n)
    return [make_event(i, float(latency[i]), ttft_ms=float(latency[i]) / 3,
                       cost_usd=None if i % 7 == 0 else 0.001 * (i % 5),
                       status="error" if i % 10 == 0 else "ok",
                       error_type="timeout" if i % 20 == 0 else None,
                       quality=float(quality[i]) if i % 3 else None,
                       cache_hit=None if i % 4 == 0 else bool(i % 2),
                       prompt_fingerprint=f"fp{fingerprints[i]}" if i % 5 else None)
            for i in range(n)]


def aggregate(events: list[LLMEvent]) -> Aggregate:
    agg = Aggregate()
    for event in events:
        agg.add(event)
    return agg


def test_quantiles_within_one_percent_of_numpy():
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(6.0, 1.0, 50_000)
    agg = aggregate([make_event(i, float(v)) for i, v in enumerate(latencies)])
    for q in (0.5, 0.95, 0.99):
        exact = np.quantile(latencies, q, method="lower")
        assert agg.quantile(q) == pytest.approx(exact, rel=0.0101)
    summary = agg.summary()
    assert summary["p99_ms"] == agg.quantile(0.99)
    assert Aggregate().quantile(0.5) is None


def test_summary_quantiles_and_bins_match_the_library():
    """summary() reads its quantiles from one cumulative sum and buffered values are binned
    in bulk: the same bins as the library's own add, and the same quantile values as its
    get_quantile_value, for small and full buffers, zeros included."""
    from ddsketch import LogCollapsingLowestDenseDDSketch

    rng = np.random.default_rng(5)
    for n in (1, 7, 127, 128, 129, 2_000):
        latencies = [float(v) for v in rng.lognormal(5.0, 1.5, n)]
        latencies[0] = 0.0
        agg = aggregate([make_event(i, v, ttft_ms=v / 4) for i, v in enumerate(latencies)])
        library = LogCollapsingLowestDenseDDSketch(0.01, 2048)
        for value in latencies:
            library.add(value)
        ours = agg.latency
        assert ours.count == library.count and ours._zero_count == library._zero_count
        low, high = library._store.min_key, library._store.max_key
        assert (ours._store.min_key, ours._store.max_key) == (low, high)
        keys = range(low, high + 1) if library._store.count else range(0)
        assert [ours._store.bins[k - ours._store.offset] for k in keys] == \
            [library._store.bins[k - library._store.offset] for k in keys]
        summary = agg.summary()
        for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            assert summary[name] == ours.get_quantile_value(q) == library.get_quantile_value(q)
        assert summary["ttft_p95_ms"] == agg.ttft.get_quantile_value(0.95)


def test_counts_sums_and_rates():
    events = random_events(1000, seed=2)
    s = aggregate(events).summary()
    costs = [e.cost_usd for e in events if e.cost_usd is not None]
    assert s["count"] == 1000
    assert s["errors"] == 100 and s["error_rate"] == 0.1
    assert s["errors_by_type"] == {"(unknown)": 50, "timeout": 50}
    assert s["tokens_in"] == 10_000 and s["tokens_out"] == 5_000
    assert s["uncosted"] == 1000 - len(costs)
    assert s["cost_usd"] == pytest.approx(sum(costs))
    assert s["cost_per_call"] == pytest.approx(sum(costs) / len(costs))
    known = [e.cache_hit for e in events if e.cache_hit is not None]
    assert s["cache_hit_rate"] == pytest.approx(sum(known) / len(known))
    assert s["first_ns"] == 0 and s["last_ns"] == 999 * NS


def test_welford_mean_and_variance_match_numpy_also_after_merge():
    events = random_events(3000, seed=3)
    scores = np.array([e.quality for e in events if e.quality is not None])
    whole = aggregate(events)
    assert whole.quality_n == len(scores)
    assert whole.summary()["quality_mean"] == pytest.approx(scores.mean(), rel=1e-12)
    assert whole.quality_var == pytest.approx(scores.var(ddof=1), rel=1e-10)
    parts = [aggregate(events[i:i + 700]) for i in range(0, 3000, 700)]
    merged = Aggregate()
    for part in parts:
        merged.merge(part)
    assert merged.quality_n == len(scores)
    assert merged.quality_mean == pytest.approx(scores.mean(), rel=1e-12)
    assert merged.quality_var == pytest.approx(scores.var(ddof=1), rel=1e-10)


def assert_summaries_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
        else:
            assert a[key] == b[key], key


def test_merge_of_disjoint_parts_equals_the_whole_and_is_associative():
    events = random_events(2000, seed=4)
    a, b, c = aggregate(events[:500]), aggregate(events[500:1200]), aggregate(events[1200:])
    left = Aggregate()
    for part in (a, b):
        left.merge(part)
    left.merge(c)
    bc = Aggregate()
    bc.merge(b)
    bc.merge(c)
    right = Aggregate()
    right.merge(a)
    right.merge(bc)
    whole = aggregate(events).summary()
    assert_summaries_close(left.summary(), whole)
    assert_summaries_close(right.summary(), whole)
    assert a.count == 500  # merge leaves its argument alone


def test_bytes_round_trip_is_exact_and_keeps_evolving_identically():
    events = random_events(3000, seed=5)
    original = aggregate(events[:2050])  # not a multiple of the buffer: values pending
    restored = Aggregate.from_bytes(original.to_bytes())
    for event in events[2050:2100]:
        original.add(event)
        restored.add(event)
    assert restored.to_bytes() == original.to_bytes()
    assert restored.summary() == original.summary()
    for q in np.linspace(0, 1, 101):
        assert restored.quantile(q) == original.quantile(q)
        assert restored.ttft_quantile(q) == original.ttft_quantile(q)
    for event in events[2100:]:
        original.add(event)
        restored.add(event)
    assert restored.to_bytes() == original.to_bytes()  # bit for bit, buffers included
    assert restored.summary() == original.summary()


def test_sketch_memory_is_bounded_even_for_absurd_latency_ranges():
    agg = Aggregate()
    for i, latency in enumerate(np.geomspace(1e-200, 1e200, 20_000)):
        agg.add(make_event(i, float(latency)))
    assert len(agg.latency._store.bins) <= 2048
    assert agg.latency._store.is_collapsed
    # the lowest quantiles lose accuracy, the high ones keep it
    assert agg.quantile(0.99) == pytest.approx(np.quantile(np.geomspace(1e-200, 1e200, 20_000),
                                                           0.99, method="lower"), rel=0.0101)
    restored = Aggregate.from_bytes(agg.to_bytes())
    assert [restored.quantile(q) for q in (0, 0.5, 0.99)] == \
        [agg.quantile(q) for q in (0, 0.5, 0.99)]


def test_error_types_are_capped():
    agg = aggregate([make_event(i, status="error", error_type=f"type{i}") for i in range(100)])
    assert len(agg.errors_by_type) == MAX_ERROR_TYPES + 1
    assert agg.errors_by_type[OTHER_ERROR] == 100 - MAX_ERROR_TYPES


def test_empty_aggregate_summary_has_no_divisions_by_zero():
    s = Aggregate().summary()
    assert s["count"] == 0
    assert all(s[k] is None for k in ("error_rate", "p50_ms", "cost_per_call", "quality_mean",
                                      "quality_var", "cache_hit_rate", "repeat_share"))
    assert Aggregate.from_bytes(Aggregate().to_bytes()).summary() == s


def test_bad_bytes_raise_a_typed_error():
    with pytest.raises(AggregateDecodeError):
        Aggregate.from_bytes(b"\x93\x01\x02\x03")
    with pytest.raises(AggregateDecodeError):
        Aggregate.from_bytes(b"not msgpack at all")


def test_event_key_uses_empty_variant():
    assert event_key(make_event(1)) == ("svc", "m", "", "chat")
    assert event_key(make_event(1, variant="b", operation="embed")) == ("svc", "m", "b", "embed")


# --- Space-Saving ---------------------------------------------------------------------------

def zipf_stream(n: int, seed: int, universe: int = 5000) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"fp{v}" for v in np.minimum(rng.zipf(1.5, n), universe)]


def test_space_saving_finds_the_true_top_items_on_a_zipf_stream():
    stream = zipf_stream(100_000, seed=6)
    summary = SpaceSaving(64)
    for item in stream:
        summary.add(item)
    items, counts = np.unique(stream, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    true_top = [str(items[i]) for i in order[:10]]
    assert [row[0] for row in summary.top(10)] == true_top
    exact = dict(zip(items.tolist(), counts.tolist(), strict=True))
    for item, count, error in summary.top(64):
        assert count - error <= exact[item] <= count  # the algorithm's guarantee


def test_space_saving_merge_keeps_the_top_and_its_guarantee():
    stream = zipf_stream(60_000, seed=7)
    halves = [SpaceSaving(64), SpaceSaving(64)]
    for i, item in enumerate(stream):
        halves[i % 2].add(item)
    halves[0].merge(halves[1])
    items, counts = np.unique(stream, return_counts=True)
    exact = dict(zip(items.tolist(), counts.tolist(), strict=True))
    true_top = sorted(exact, key=lambda k: -exact[k])[:5]
    assert [row[0] for row in halves[0].top(5)] == true_top
    assert len(halves[0]) == 64
    for item, count, error in halves[0].top():
        assert count - error <= exact[item] <= count


def test_space_saving_round_trip_evolves_identically():
    stream = zipf_stream(20_000, seed=8)
    a = SpaceSaving(16)
    for item in stream[:10_000]:
        a.add(item)
    b = SpaceSaving.from_list(a.to_list(), 16)
    for item in stream[10_000:]:
        a.add(item)
        b.add(item)
    assert a.to_list() == b.to_list()
    with pytest.raises(HeavyHittersDecodeError):
        SpaceSaving.from_list([("x", 1, 5)], 16)


def test_repeat_share_holds_with_many_more_distinct_prompts_than_the_top_list():
    agg = aggregate([make_event(i, prompt_fingerprint=f"fp{i % 4}") for i in range(40)])
    assert agg.repeat_share == pytest.approx(36 / 40, rel=0.01)
    assert agg.summary()["top_fingerprints"][0] == ["fp0", 10, 0]
    unique = aggregate([make_event(i, prompt_fingerprint=f"u{i}") for i in range(1000)])
    assert unique.repeat_share == pytest.approx(0.0, abs=0.02)
    # 40% of 3,000 calls repeat 24 hot prompts, the rest are unique: far more distinct
    # prompts than the top list holds, and the share is still right within a few percent.
    calls = [make_event(i, prompt_fingerprint=f"hot{i % 24}" if i % 5 < 2 else f"u{i}")
             for i in range(3_000)]
    mixed = aggregate(calls)
    assert mixed.repeat_share == pytest.approx((1_200 - 24) / 3_000, rel=0.05)
    halves = Aggregate.merged([aggregate(calls[:1_500]), aggregate(calls[1_500:])])
    assert halves.repeat_share == pytest.approx(mixed.repeat_share, rel=0.02)
