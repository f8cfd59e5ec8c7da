"""A service's LLM configuration, its weighted variants, and which variant a request gets.

Routing is sticky: a request key is hashed (blake2b of ``service NUL key``, not Python's
salted ``hash()``) to a bucket 0..9999 that never changes, and each variant owns a run of
consecutive buckets in list order, starting at 0; buckets past the last variant get the base
config ("baseline"). Growing a variant's weight only extends its run, so a key that was in a 5%
canary stays in it at 25%. (Growing a variant does shift the runs of the variants listed after
it; the canary deployer appends its variant last for that reason.)
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any

import msgspec
from msgspec import Struct, field

BUCKETS = 10_000  # weights are in basis points of this
BASELINE = "baseline"
SECTIONS = ("parameters", "cache", "rate_limit", "batching", "prompt")
OVERRIDABLE = ("model", *SECTIONS)  # what a variant's overrides may change


class Variant(Struct):
    name: str
    weight_bp: int  # share of buckets, in basis points of BUCKETS
    overrides: dict[str, Any] = field(default_factory=dict)  # keys of OVERRIDABLE, merged deep


class ConfigContent(Struct, kw_only=True, forbid_unknown_fields=True):
    """What a config says: the model and its policies, with the variants that override them."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    rate_limit: dict[str, Any] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)


class LLMConfig(ConfigContent, kw_only=True, forbid_unknown_fields=True):
    """One version of a service's config, as the config store keeps it."""

    service: str
    version: int = 0  # assigned by the store
    updated_ns: int = 0  # event time of the change
    reason: str = ""


def bucket_of(service: str, request_key: str) -> int:
    """The request's fixed bucket 0..BUCKETS-1 (modulo bias of 2**64 % 10**4 is negligible)."""
    digest = hashlib.blake2b(f"{service}\0{request_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def variant_ranges(config: LLMConfig) -> list[tuple[str, int, int]]:
    """(name, first bucket, end bucket exclusive) of each variant, in list order."""
    ranges, start = [], 0
    for variant in config.variants:
        ranges.append((variant.name, start, start + variant.weight_bp))
        start += variant.weight_bp
    return ranges


def variant_for_bucket(config: LLMConfig, bucket: int) -> str:
    for name, start, end in variant_ranges(config):
        if start <= bucket < end:
            return name
    return BASELINE


def resolve_variant(config: LLMConfig, request_key: str) -> str:
    """The variant name this request key gets: always the same for the same service and key."""
    return variant_for_bucket(config, bucket_of(config.service, request_key))


def base_dict(config: LLMConfig) -> dict[str, Any]:
    """The overridable part of a config, as plain builtins (a deep copy)."""
    return {key: copy.deepcopy(getattr(config, key)) for key in OVERRIDABLE}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: nested dicts merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def with_overrides(config: LLMConfig, overrides: dict[str, Any], *,
                   variants: list[Variant] | None = None) -> LLMConfig:
    """A copy of ``config`` whose base has ``overrides`` applied (used to promote a variant)."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"overrides: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(OVERRIDABLE)}")
    merged = merge(base_dict(config), overrides)
    kept = copy.deepcopy(config.variants) if variants is None else variants
    return msgspec.structs.replace(config, variants=kept, **merged)


def effective_config(config: LLMConfig, request_key: str) -> dict[str, Any]:
    """What the request runs with: the base, merged with its variant's overrides, plus the
    variant's name under "variant"."""
    name = resolve_variant(config, request_key)
    result = base_dict(config)
    for variant in config.variants:
        if variant.name == name:
            result = merge(result, variant.overrides)
            break
    result["variant"] = name
    return result
