"""The HyperLogLog distinct counter behind repeat shares: accuracy, merging, round trip."""
from __future__ import annotations

import pytest

from workers.processor.distinct import DistinctCounter, DistinctDecodeError


def counter(items) -> DistinctCounter:
    c = DistinctCounter()
    for item in items:
        c.add(item)
    return c


@pytest.mark.parametrize("n", [0, 1, 50, 744, 5_000, 100_000])
def test_estimates_within_a_few_percent_whatever_the_repeats(n):
    c = counter(f"fp-{i % n}" for i in range(3 * n)) if n else DistinctCounter()
    assert c.estimate() == pytest.approx(n, rel=0.05, abs=1)


def test_merge_estimates_the_union_and_survives_a_round_trip():
    a = counter(f"x{i}" for i in range(3_000))
    b = counter(f"x{i}" for i in range(2_000, 6_000))
    a.merge(b)
    assert a.estimate() == pytest.approx(6_000, rel=0.05)
    again = DistinctCounter.from_bytes(a.to_bytes())
    assert again.estimate() == a.estimate()
    assert DistinctCounter.from_bytes(b"").estimate() == 0
    with pytest.raises(DistinctDecodeError):
        DistinctCounter.from_bytes(b"short")
