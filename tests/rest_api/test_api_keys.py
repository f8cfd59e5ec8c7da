"""ApiKeyStore: keys shown once, stored hashed, verified in constant time, revocable, cached."""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from ipc import storage as s
from workers.rest_api import api_keys
from workers.rest_api.api_keys import ApiKeyStore, StoredKey, parse_key
from workers.rest_api.auth import Role
from workers.storage_client import StorageClient


class MemoryStorage:
    """The Get/Put/Scan subset of the storage worker, in memory, counting calls."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], bytes] = {}
        self.calls: list[s.Op] = []

    async def call(self, op: s.Op, timeout: float | None = None) -> Any:
        self.calls.append(op)
        if isinstance(op, s.Get):
            return self.data.get((op.ns, op.key))
        if isinstance(op, s.Put):
            self.data[(op.ns, op.key)] = op.value
            return None
        if isinstance(op, s.Scan):
            keys = sorted(k for ns, k in self.data if ns == op.ns and k.startswith(op.prefix)
                          and (op.cursor is None or k > op.cursor))
            page = keys[:op.limit]
            more = len(keys) > op.limit
            return s.ScanResult(records=[s.Record(key=k, value=self.data[(op.ns, k)])
                                         for k in page],
                                next_cursor=page[-1] if more else None)
        raise NotImplementedError(type(op).__name__)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_create_shows_the_key_once_and_stores_only_a_salted_hash() -> None:
    async def go() -> None:
        storage = MemoryStorage()
        store = ApiKeyStore(storage, wall_clock=lambda: 1700000000.5)
        record, key = await store.create("ci", Role.OPERATOR)
        key_id, secret = parse_key(key)
        assert key.startswith("llmo_") and key_id == record.id and len(key_id) == 12
        assert len(secret) == 43 and record.created_ms == 1700000000500
        assert not hasattr(record, "secret_hash")  # the public record carries no hash
        raw = storage.data[("api_keys", record.id.encode())]
        assert secret.encode() not in raw and key.encode() not in raw
        stored = api_keys._decoder.decode(raw)
        assert isinstance(stored, StoredKey) and len(stored.salt) == 16
        assert stored.secret_hash == hashlib.sha256(stored.salt + secret.encode()).digest()
        assert stored.secret_hash != hashlib.sha256(secret.encode()).digest()
        assert await store.verify(key) == record
    run(go())


def test_verify_refuses_wrong_malformed_and_revoked_keys() -> None:
    async def go() -> None:
        store = ApiKeyStore(MemoryStorage())
        record, key = await store.create("ci", Role.VIEWER)
        other_record, other = await store.create("bot", Role.ADMIN)
        key_id, secret = parse_key(key)
        tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
        assert await store.verify(tampered) is None
        # another key's secret under this id
        assert await store.verify(f"llmo_{key_id}_{parse_key(other)[1]}") is None
        for bad in ("", "llmo_", "llmo_short_x", key + "x", key.replace("llmo_", "llmx_")):
            assert await store.verify(bad) is None
        assert await store.verify("llmo_aaaaaaaaaaaa_" + "A" * 43) is None  # unknown id
        assert (await store.revoke(record.id)).revoked
        assert await store.verify(key) is None
        assert (await store.revoke(record.id)).revoked  # idempotent
        assert await store.revoke("zzzzzzzzzzzz") is None
        assert await store.verify(other) == other_record
    run(go())


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = api_keys.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)

    async def go() -> None:
        store = ApiKeyStore(MemoryStorage())
        _, key = await store.create("ci", Role.VIEWER)
        assert await store.verify(key) is not None
        assert await store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    run(go())
    assert len(compared) == 2 and all(len(a) == len(b) == 32 for a, b in compared)


def test_list_pages_through_every_key() -> None:
    async def go() -> None:
        store = ApiKeyStore(MemoryStorage())
        made = [(await store.create(f"k{i}", Role.VIEWER))[0] for i in range(5)]
        await store.revoke(made[0].id)
        listed = await store.list()
        assert sorted(k.id for k in listed) == sorted(k.id for k in made)
        assert [k.id for k in listed if k.revoked] == [made[0].id]
        assert await store.get(made[1].id) == made[1]
    run(go())


def test_verify_cache_spares_storage_and_is_invalidated_on_revoke() -> None:
    async def go() -> None:
        storage, clock = MemoryStorage(), Clock()
        store = ApiKeyStore(storage, clock=clock)
        record, key = await store.create("ci", Role.VIEWER)
        gets = lambda: sum(isinstance(op, s.Get) for op in storage.calls)  # noqa: E731
        assert await store.verify(key) == record
        assert await store.verify(key) == record
        assert gets() == 1
        clock.now += api_keys.CACHE_TTL_S + 0.1
        assert await store.verify(key) == record
        assert gets() == 2
        await store.revoke(record.id)
        assert await store.verify(key) is None  # at once in this process, not after the TTL
        # unknown ids are cached as misses too
        unknown = "llmo_aaaaaaaaaaaa_" + "A" * 43
        before = gets()
        assert await store.verify(unknown) is None and await store.verify(unknown) is None
        assert gets() == before + 1
    run(go())


def test_against_a_real_storage_worker(make_daemon: Any) -> None:
    d = make_daemon(builtins=["storage"]).start()

    async def go() -> None:
        client = StorageClient(d.runtime)
        try:
            store = ApiKeyStore(client)
            record, key = await store.create("ci", Role.ADMIN)
            assert await store.verify(key) == record
            assert [k.id for k in await store.list()] == [record.id]
            await store.revoke(record.id)
            assert await store.verify(key) is None
            assert (await ApiKeyStore(client).get(record.id)).revoked
        finally:
            await client.close()
    run(go())


def test_a_verified_key_is_not_hashed_again_while_its_record_is_cached(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = api_keys.hash_secret
    monkeypatch.setattr(api_keys, "hash_secret",
                        lambda salt, secret: hashed.append(secret) or real(salt, secret))

    async def go() -> None:
        storage, clock = MemoryStorage(), Clock()
        store = ApiKeyStore(storage, clock=clock)
        other_process = ApiKeyStore(storage, clock=clock)
        record, key = await store.create("ci", Role.VIEWER)
        hashed.clear()
        for _ in range(3):
            assert await store.verify(key) == record
        assert len(hashed) == 1
        # a wrong secret is always hashed and refused, even next to a verified key
        wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
        assert await store.verify(wrong) is None and await store.verify(wrong) is None
        assert len(hashed) == 3
        # revoked by another process: refused here once the record's cache expires, as before
        await other_process.revoke(record.id)
        clock.now += api_keys.CACHE_TTL_S - 0.1
        assert await store.verify(key) == record
        clock.now += 0.2
        assert await store.verify(key) is None
        # any write here drops every verified key at once
        second, key2 = await store.create("bot", Role.ADMIN)
        assert await store.verify(key2) == second
        await store.create("third", Role.VIEWER)
        hashed.clear()
        assert await store.verify(key2) == second and len(hashed) == 1
    run(go())
