"""Sticky variant routing: determinism, proportions over many keys, stickiness as weights grow."""
from __future__ import annotations

import hashlib

import pytest

from ipc.variants import (
    BASELINE,
    LLMConfig,
    Variant,
    bucket_of,
    effective_config,
    resolve_variant,
    variant_ranges,
    with_overrides,
)

KEYS = [f"user-{i}" for i in range(100_000)]


def config(*variants: Variant, service: str = "chat") -> LLMConfig:
    return LLMConfig(service=service, model="gpt-4o", parameters={"temperature": 0.7},
                     variants=list(variants))


def test_bucket_is_a_stable_blake2b_hash():
    digest = hashlib.blake2b(b"chat\0user-1", digest_size=8).digest()
    assert bucket_of("chat", "user-1") == int.from_bytes(digest, "big") % 10_000
    assert bucket_of("chat", "user-1") == bucket_of("chat", "user-1")
    # the service is part of the hash: keys are not routed alike in every service
    same = sum(bucket_of("chat", k) == bucket_of("search", k) for k in KEYS[:10_000])
    assert same < 20


def test_resolve_is_deterministic_and_ranges_are_consecutive():
    cfg = config(Variant("a", 1000), Variant("b", 2000))
    assert variant_ranges(cfg) == [("a", 0, 1000), ("b", 1000, 3000)]
    first = [resolve_variant(cfg, k) for k in KEYS[:1000]]
    assert first == [resolve_variant(cfg, k) for k in KEYS[:1000]]
    for key, name in zip(KEYS[:1000], first, strict=True):
        bucket = bucket_of("chat", key)
        assert name == ("a" if bucket < 1000 else "b" if bucket < 3000 else BASELINE)


@pytest.mark.parametrize("weights", [(500,), (2500, 1000), (5000, 2500, 2500), (10_000,)])
def test_proportions_within_one_point_over_100k_keys(weights):
    cfg = config(*(Variant(f"v{i}", w) for i, w in enumerate(weights)))
    counts: dict[str, int] = {}
    for key in KEYS:
        name = resolve_variant(cfg, key)
        counts[name] = counts.get(name, 0) + 1
    expected = {f"v{i}": w / 10_000 for i, w in enumerate(weights)}
    expected[BASELINE] = 1 - sum(weights) / 10_000
    for name, share in expected.items():
        assert abs(counts.get(name, 0) / len(KEYS) - share) <= 0.01, (name, counts)


def test_a_canary_keeps_its_keys_as_its_weight_grows():
    members = None
    for weight in (500, 2500, 5000, 10_000):
        cfg = config(Variant("other", 1000), Variant("canary", weight))
        now = {k for k in KEYS if resolve_variant(cfg, k) == "canary"}
        if members is not None:
            assert members <= now
        assert {k for k in KEYS if resolve_variant(cfg, k) == "other"} == {
            k for k in KEYS if bucket_of("chat", k) < 1000}
        members = now
    assert len(members) == sum(bucket_of("chat", k) >= 1000 for k in KEYS)


def test_effective_config_merges_the_variant_overrides_deeply():
    cfg = config(Variant("canary", 10_000, {"model": "gpt-4o-mini",
                                            "parameters": {"max_tokens": 256}}))
    effective = effective_config(cfg, "user-1")
    assert effective["variant"] == "canary"
    assert effective["model"] == "gpt-4o-mini"
    assert effective["parameters"] == {"temperature": 0.7, "max_tokens": 256}
    assert effective_config(config(), "user-1")["model"] == "gpt-4o"
    assert cfg.parameters == {"temperature": 0.7}  # the config itself is untouched


def test_with_overrides_promotes_a_change_and_refuses_unknown_keys():
    promoted = with_overrides(config(Variant("canary", 500)), {"model": "m2"}, variants=[])
    assert promoted.model == "m2" and promoted.variants == []
    with pytest.raises(ValueError, match="overrides: unknown key"):
        with_overrides(config(), {"modle": "m2"})
