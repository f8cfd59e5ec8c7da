"""Versioned configs: validation paths, optimistic concurrency, history, diff, rollback, and the
storage-backed document store (against a fake client that speaks the storage ops)."""
from __future__ import annotations

import asyncio

import msgspec
import pytest

from ipc import storage as s
from ipc.variants import LLMConfig, Variant
from workers.processor.configs import (
    ConfigConflict,
    ConfigManager,
    ConfigNotFound,
    DocConflict,
    InvalidConfig,
    MemoryDocStore,
    StorageDocStore,
    validate,
)

BASE = LLMConfig(service="chat", model="gpt-4o", parameters={"temperature": 0.7},
                 cache={"ttl_s": 300}, rate_limit={"rpm": 600}, updated_ns=1)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(("change", "path"), [
    ({"model": ""}, "model"),
    ({"service": "Chat!"}, "service"),
    ({"cache": {"ttl_s": -1}}, "cache.ttl_s"),
    ({"rate_limit": {"tiers": [{"rpm": 5}, {"rpm": -5}]}}, "rate_limit.tiers[1].rpm"),
    ({"parameters": {"temperature": -0.1}}, "parameters.temperature"),
    ({"variants": [Variant("a", 6000), Variant("b", 5000)]}, "variants"),
    ({"variants": [Variant("a", -1)]}, "variants[0].weight_bp"),
    ({"variants": [Variant("a", 1), Variant("a", 1)]}, "variants[1].name"),
    ({"variants": [Variant("baseline", 1)]}, "variants[0].name"),
    ({"variants": [Variant("a", 1, {"modle": "x"})]}, "variants[0].overrides.modle"),
    ({"variants": [Variant("a", 1, {"batching": {"max": -2}})]},
     "variants[0].overrides.batching.max"),
    ({"variants": [Variant("a", 1, {"model": " "})]}, "variants[0].overrides.model"),
])
def test_validation_names_the_field(change, path):
    with pytest.raises(InvalidConfig) as info:
        validate(msgspec.structs.replace(BASE, **change))
    assert info.value.path == path and str(info.value).startswith(f"{path}: ")


def test_validation_accepts_a_sound_config_and_negative_penalties():
    validate(msgspec.structs.replace(BASE, parameters={"presence_penalty": -1.0},
                                     variants=[Variant("a", 5000), Variant("b", 5000)]))
    with pytest.raises(InvalidConfig, match="unknown model 'gpt-9'"):
        validate(msgspec.structs.replace(BASE, model="gpt-9"), known_models={"gpt-4o"})


def test_put_versions_history_and_conflicts():
    manager = ConfigManager(MemoryDocStore())

    async def go() -> None:
        first = await manager.put(BASE, "initial", 0)
        assert first.version == 1 and first.reason == "initial"
        second = await manager.put(msgspec.structs.replace(first, model="gpt-4o-mini"),
                                   "cheaper", first.version)
        assert second.version == 2 and (await manager.get("chat")).model == "gpt-4o-mini"
        with pytest.raises(ConfigConflict) as info:
            await manager.put(msgspec.structs.replace(first, model="x"), "stale", 1)
        assert (info.value.service, info.value.expected, info.value.current) == ("chat", 1, 2)
        assert "'chat' is at version 2, not the expected 1" in str(info.value)
        with pytest.raises(ConfigConflict):
            await manager.put(BASE, "exists already", 0)
        assert [c.version for c in await manager.history("chat")] == [2, 1]
        assert (await manager.get("chat", 1)).model == "gpt-4o"
        assert await manager.services() == ["chat"]
        with pytest.raises(ConfigNotFound, match="no config version 9"):
            await manager.get("chat", 9)
        with pytest.raises(ConfigNotFound):
            await manager.get("search")
        with pytest.raises(InvalidConfig):  # nothing stored on a refusal
            await manager.put(msgspec.structs.replace(second, model=""), "bad", 2)
        assert len(await manager.history("chat")) == 2

    run(go())


def test_diff_and_rollback():
    manager = ConfigManager(MemoryDocStore())

    async def go() -> None:
        v1 = await manager.put(BASE, "initial", 0)
        v2 = await manager.put(msgspec.structs.replace(
            v1, parameters={"temperature": 0.2, "max_tokens": 512},
            variants=[Variant("canary", 500, {"model": "gpt-4o-mini"})]), "canary", 1)
        assert await manager.diff("chat", 1, 2) == [
            ("parameters.max_tokens", None, 512),
            ("parameters.temperature", 0.7, 0.2),
            ("variants", [], None),
            ("variants[0].name", None, "canary"),
            ("variants[0].overrides.model", None, "gpt-4o-mini"),
            ("variants[0].weight_bp", None, 500),
        ]
        restored = await manager.rollback("chat", 1, "undo the canary", now_ns=99)
        assert restored.version == 3 and restored.reason == "undo the canary"
        assert restored.updated_ns == 99 and v2.version == 2
        assert await manager.diff("chat", 1, 3) == []
        assert [c.version for c in await manager.history("chat")] == [3, 2, 1]
        assert (await manager.get("chat")).variants == []

    run(go())


class FakeStorage:
    """Answers DocGet/DocPut/DocHistory/DocList as the storage worker does."""

    def __init__(self) -> None:
        self.docs: dict[str, list[bytes]] = {}
        self.ops: list[s.Op] = []

    async def call(self, op: s.Op):
        self.ops.append(op)
        versions = self.docs.setdefault(op.id, []) if hasattr(op, "id") else []
        if isinstance(op, s.DocPut):
            if op.expected_version is not None and op.expected_version != len(versions):
                raise s.Conflict(f"{op.ns}/{op.id} is at version {len(versions)}")
            versions.append(op.body)
            return len(versions)
        if isinstance(op, s.DocGet):
            number = op.version or len(versions)
            if not 1 <= number <= len(versions):
                raise s.NotFound(f"{op.ns}/{op.id} does not exist")
            return s.Document(op.id, number, versions[number - 1], 0)
        if isinstance(op, s.DocHistory):
            return [s.Document(op.id, i + 1, versions[i], 0)
                    for i in reversed(range(len(versions)))][:op.limit]
        assert isinstance(op, s.DocList)
        docs = [s.Document(i, len(v), v[-1], 0) for i, v in sorted(self.docs.items()) if v]
        return s.DocListResult(docs, None)


def test_storage_doc_store_maps_the_storage_ops():
    fake = FakeStorage()
    store = StorageDocStore(fake, ns="configs")  # type: ignore[arg-type]
    manager = ConfigManager(store)

    async def go() -> None:
        assert await store.get("chat") is None
        await manager.put(BASE, "initial", 0)
        await manager.put(msgspec.structs.replace(BASE, model="m2"), "second", 1)
        with pytest.raises(ConfigConflict) as info:
            await manager.put(BASE, "stale", 1)
        assert info.value.current == 2
        assert [c.model for c in await manager.history("chat")] == ["m2", "gpt-4o"]
        assert await manager.services() == ["chat"]
        assert (await manager.rollback("chat", 1, "back")).model == "gpt-4o"

    run(go())
    assert {type(op) for op in fake.ops} == {s.DocGet, s.DocPut, s.DocHistory, s.DocList}
    assert all(op.ns == "configs" for op in fake.ops)
    put = next(op for op in fake.ops if isinstance(op, s.DocPut))
    assert put.id == "chat" and put.expected_version == 0


def test_memory_store_keeps_the_storage_rules():
    store = MemoryDocStore()

    async def go() -> None:
        assert await store.put("rollout:chat:p1", b"a", 0) == 1
        with pytest.raises(DocConflict):
            await store.put("rollout:chat:p1", b"b", 0)
        with pytest.raises(ValueError, match="document id"):
            await store.put("rollout/chat/p1", b"a", 0)
        assert await store.put("rollout:chat:p1", b"b", None) == 2
        assert await store.history("rollout:chat:p1", 1) == [(2, b"b")]
        assert await store.list("rollout:") == [("rollout:chat:p1", 2, b"b")]

    run(go())
