"""Deduplicator: duplicates found, memory bounded by the horizon and by max_ids."""
from __future__ import annotations

import pytest

from workers.processor.dedup import DedupDecodeError, Deduplicator

NS = 1_000_000_000


def test_a_repeated_id_is_a_duplicate_a_new_one_is_not():
    dedup = Deduplicator(horizon_s=600)
    assert dedup.seen("a", 10 * NS, 0) is False
    assert dedup.seen("b", 10 * NS, 0) is False
    assert dedup.seen("a", 10 * NS, 0) is True
    assert dedup.seen("a", 70 * NS, 0) is True  # same id, other time: still a duplicate
    assert len(dedup) == 2


def test_ids_are_stored_as_16_byte_digests():
    dedup = Deduplicator()
    dedup.seen("x" * 256, 0, 0)
    assert [len(d) for d in dedup._ids] == [16]


def test_buckets_older_than_the_horizon_are_evicted():
    dedup = Deduplicator(horizon_s=600, bucket_s=60)
    for i in range(100):
        dedup.seen(f"old{i}", 30 * NS, 0)  # bucket [0, 60)
    dedup.seen("new", 700 * NS, 659 * NS)  # threshold 59 s: bucket still inside
    assert len(dedup) == 101
    dedup.seen("newer", 700 * NS, 660 * NS)  # threshold 60 s: [0, 60) is gone
    assert len(dedup) == 2
    assert dedup.horizon_evictions == 100
    assert dedup.seen("old0", 30 * NS, 660 * NS) is False  # beyond the horizon: not judged
    assert dedup.too_old == 1
    assert len(dedup) == 2
    assert dedup.seen("new", 700 * NS, 660 * NS) is True


def test_memory_stays_bounded_over_a_long_stream():
    dedup = Deduplicator(horizon_s=300, bucket_s=60, max_ids=10**6)
    most = 0
    for i in range(100_000):
        t = i * NS // 10  # 10 events/s for 10,000 s
        dedup.seen(f"e{i}", t, t - 30 * NS)
        most = max(most, len(dedup))
    # horizon + lateness + one bucket of 60 s at 10 events/s
    assert most <= (300 + 30 + 60) * 10
    assert dedup.pressure_evictions == 0


def test_max_ids_is_a_hard_cap_and_evicts_the_oldest_buckets_first():
    dedup = Deduplicator(horizon_s=3600, bucket_s=60, max_ids=250)
    for i in range(1000):
        dedup.seen(f"e{i}", i * NS, 0)  # 60 ids per bucket, watermark never advances
        assert len(dedup) <= 250
    assert dedup.pressure_evictions >= 750
    assert dedup.seen("e999", 999 * NS, 0) is True  # the newest are kept
    assert dedup.seen("e0", 0, 0) is False  # the oldest went first


def test_round_trip_gives_the_same_answers():
    dedup = Deduplicator(horizon_s=600, max_ids=500)
    for i in range(800):
        dedup.seen(f"e{i}", i * NS, 0)
    restored = Deduplicator.from_bytes(dedup.to_bytes())
    assert len(restored) == len(dedup)
    assert restored.pressure_evictions == dedup.pressure_evictions
    for i in range(0, 900, 7):
        assert restored.seen(f"e{i}", i * NS, 0) == dedup.seen(f"e{i}", i * NS, 0)


def test_bad_bytes_and_bad_config_raise():
    with pytest.raises(DedupDecodeError):
        Deduplicator.from_bytes(b"\xc1")
    with pytest.raises(ValueError):
        Deduplicator(horizon_s=0)
