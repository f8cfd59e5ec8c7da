"""API keys: ``llmo_<id>_<secret>``, stored hashed in the storage worker's "api_keys" namespace.

The id (12 base32 characters) names the record; the secret (32 random bytes, URL-safe base64)
is shown once, at creation, and only its salted SHA-256 is stored. A key carries 256 bits of
entropy, so nobody can guess it from the hash by trying candidates: a slow password hash (bcrypt,
argon2) would only cost every request time without adding protection.

``verify`` runs on every request, so records are cached for a few seconds in this process, and
so is each key that verified, for as long as its record: a key sent again is then found by a
dict lookup instead of being parsed, hashed and compared (a lookup's string comparison only
runs on a hash match, so its timing tells nothing about stored keys). ``revoke`` drops its key
from this process's caches at once, other processes refuse a revoked key within
``CACHE_TTL_S``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from ipc import storage as s
from workers.rest_api.auth import API_KEY_PREFIX, Role

NAMESPACE = "api_keys"
ID_CHARS = 12
CACHE_TTL_S = 5.0
CACHE_MAX_ENTRIES = 10_000
_KEY_PATTERN = re.compile(rf"{API_KEY_PREFIX}(?P<id>[a-z2-7]{{{ID_CHARS}}})_"
                          r"(?P<secret>[A-Za-z0-9_-]{43})")


class StorageCaller(Protocol):
    """What the store needs of storage: ``StorageClient`` has it, and so do test fakes."""

    async def call(self, op: s.Op, timeout: float | None = None) -> Any: ...


class ApiKey(msgspec.Struct, kw_only=True, frozen=True):
    """What may be shown about a key: never its secret nor its hash."""

    id: str
    name: str
    role: Role
    created_ms: int
    revoked: bool = False


class StoredKey(ApiKey, frozen=True):
    salt: bytes
    secret_hash: bytes

    def public(self) -> ApiKey:
        return ApiKey(id=self.id, name=self.name, role=self.role, created_ms=self.created_ms,
                      revoked=self.revoked)


def hash_secret(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def parse_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    found = _KEY_PATTERN.fullmatch(key)
    return (found["id"], found["secret"]) if found else None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StoredKey)


class ApiKeyStore:
    def __init__(self, storage: StorageCaller, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.clock, self.wall_clock = clock, wall_clock
        # id -> (expiry, record or None for "no such key"): misses are cached too, so that a
        # flood of made-up ids does not reach storage.
        self.cache: OrderedDict[str, tuple[float, StoredKey | None]] = OrderedDict()
        # key -> (expiry, writes when verified, record): keys that verified, for as long as
        # their record is cached and nothing was written since.
        self.verified: OrderedDict[str, tuple[float, int, ApiKey]] = OrderedDict()
        # Bumped by every write: a load that raced with a write is not cached, so that a key
        # revoked here can never be served from a stale cache entry.
        self.writes = 0

    async def create(self, name: str, role: Role) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself, which is never available again."""
        key_id = base64.b32encode(secrets.token_bytes(8)).decode().lower()[:ID_CHARS]
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        record = StoredKey(id=key_id, name=name, role=role,
                           created_ms=int(self.wall_clock() * 1000), salt=salt,
                           secret_hash=hash_secret(salt, secret))
        await self._put(record)
        return record.public(), f"{API_KEY_PREFIX}{key_id}_{secret}"

    async def verify(self, key: str) -> ApiKey | None:
        """The key's record if the key is valid and not revoked, else None."""
        hit = self.verified.get(key)
        if hit is not None and hit[0] > self.clock() and hit[1] == self.writes:
            return hit[2]
        parsed = parse_key(key)
        if parsed is None:
            return None
        key_id, secret = parsed
        writes = self.writes
        record = await self._cached(key_id)
        if record is None or record.revoked:
            return None
        if not hmac.compare_digest(hash_secret(record.salt, secret), record.secret_hash):
            return None
        public = record.public()
        cached = self.cache.get(key_id)
        if cached is not None and cached[1] is record:  # as long as the record is cached
            self.verified[key] = (cached[0], writes, public)
            while len(self.verified) > CACHE_MAX_ENTRIES:
                self.verified.popitem(last=False)
        return public

    async def get(self, key_id: str) -> ApiKey | None:
        record = await self._load(key_id)
        return record.public() if record else None

    async def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, in id order."""
        found: list[ApiKey] = []
        cursor: bytes | None = None
        while True:
            page: s.ScanResult = await self.storage.call(
                s.Scan(ns=NAMESPACE, limit=1000, cursor=cursor))
            found.extend(_decoder.decode(r.value).public() for r in page.records)
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Mark the key revoked (idempotent); None if there is no such key."""
        record = await self._load(key_id)
        if record is None:
            return None
        if not record.revoked:
            record = msgspec.structs.replace(record, revoked=True)
            await self._put(record)
        return record.public()

    # --- storage and cache ----------------------------------------------------------------

    async def _load(self, key_id: str) -> StoredKey | None:
        value = await self.storage.call(s.Get(ns=NAMESPACE, key=key_id.encode()))
        return None if value is None else _decoder.decode(value)

    async def _put(self, record: StoredKey) -> None:
        await self.storage.call(s.Put(ns=NAMESPACE, key=record.id.encode(),
                                      value=_encoder.encode(record)))
        self.writes += 1
        self.cache.pop(record.id, None)

    async def _cached(self, key_id: str) -> StoredKey | None:
        now = self.clock()
        hit = self.cache.get(key_id)
        if hit is not None and hit[0] > now:
            self.cache.move_to_end(key_id)
            return hit[1]
        writes = self.writes
        record = await self._load(key_id)
        if writes != self.writes:
            return record
        self.cache[key_id] = (now + CACHE_TTL_S, record)
        self.cache.move_to_end(key_id)
        while len(self.cache) > CACHE_MAX_ENTRIES:
            self.cache.popitem(last=False)
        return record
