"""Versioned service configs: validated writes with optimistic concurrency, history, diff and
rollback, over a small document-store interface.

Every write is a new version of the document named after the service; nothing is overwritten,
so history and rollback come from the store. A writer names the version it read
(``expected_version``, 0 for a service that has none yet) and loses with ``ConfigConflict`` if
someone wrote in between, instead of silently undoing their change. ``MemoryDocStore`` is the
in-process store for tests; ``StorageDocStore`` maps the same calls onto the storage worker's
document operations.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ipc import storage as s
from ipc.variants import BASELINE, BUCKETS, OVERRIDABLE, SECTIONS, LLMConfig, merge

if TYPE_CHECKING:
    from workers.storage_client import StorageClient

METADATA = ("version", "updated_ns", "reason")  # not content: diff and rollback skip them
# document ids the storage worker accepts (its NAME_PATTERN; not imported, to keep the storage
# worker's backends out of the processor)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
# parameters that are never negative (others, like presence_penalty, may be)
NON_NEGATIVE_PARAMETERS = frozenset({"temperature", "top_p", "top_k", "max_tokens",
                                     "max_output_tokens", "n", "timeout_s"})


class ConfigError(Exception):
    """Base of the config manager's failures."""


class InvalidConfig(ConfigError, ValueError):
    """A config that may not be stored: ``path`` names the field, as ``variants[1].weight_bp``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


class ConfigNotFound(ConfigError, LookupError):
    def __init__(self, service: str, version: int | None = None) -> None:
        which = f" version {version}" if version else ""
        super().__init__(f"no config{which} for service {service!r}")
        self.service, self.version = service, version


class ConfigConflict(ConfigError):
    """Someone else wrote the config after the version this writer read."""

    def __init__(self, service: str, expected: int, current: int | None) -> None:
        super().__init__(f"config of {service!r} is at version {current}, "
                         f"not the expected {expected}")
        self.service, self.expected, self.current = service, expected, current


class DocConflict(Exception):
    """A document store's refusal of a put whose expected version is not the current one."""

    def __init__(self, doc_id: str, expected: int, current: int | None) -> None:
        super().__init__(f"document {doc_id!r} is at version {current}, not {expected}")
        self.doc_id, self.expected, self.current = doc_id, expected, current


class DocStore(Protocol):
    """Versioned documents (versions count from 1); ids as the storage worker allows them."""

    async def get(self, doc_id: str, version: int | None = None) -> tuple[int, bytes] | None: ...

    async def put(self, doc_id: str, body: bytes, expected_version: int | None) -> int: ...

    async def history(self, doc_id: str, limit: int = 100) -> list[tuple[int, bytes]]: ...

    async def list(self, prefix: str = "") -> list[tuple[str, int, bytes]]: ...


def _check_id(doc_id: str) -> None:
    if not NAME_PATTERN.match(doc_id):
        raise ValueError(f"document id {doc_id!r}: 1-128 characters of A-Z a-z 0-9 _ . : -")


class MemoryDocStore:
    """A DocStore in a dict, with the storage worker's rules (ids, versions, conflicts)."""

    def __init__(self) -> None:
        self.docs: dict[str, list[bytes]] = {}  # id -> bodies, version i+1 at index i

    async def get(self, doc_id: str, version: int | None = None) -> tuple[int, bytes] | None:
        versions = self.docs.get(doc_id, [])
        number = version or len(versions)
        if not 1 <= number <= len(versions):
            return None
        return number, versions[number - 1]

    async def put(self, doc_id: str, body: bytes, expected_version: int | None) -> int:
        _check_id(doc_id)
        versions = self.docs.setdefault(doc_id, [])
        if expected_version is not None and expected_version != len(versions):
            raise DocConflict(doc_id, expected_version, len(versions))
        versions.append(bytes(body))
        return len(versions)

    async def history(self, doc_id: str, limit: int = 100) -> list[tuple[int, bytes]]:
        versions = self.docs.get(doc_id, [])
        return [(i + 1, versions[i]) for i in range(len(versions) - 1, -1, -1)][:limit]

    async def list(self, prefix: str = "") -> list[tuple[str, int, bytes]]:
        return [(doc_id, len(v), v[-1]) for doc_id, v in sorted(self.docs.items())
                if doc_id.startswith(prefix) and v]


class StorageDocStore:
    """A DocStore over the storage worker's DocGet/DocPut/DocHistory/DocList in one namespace."""

    def __init__(self, client: StorageClient, ns: str = "configs") -> None:
        self.client, self.ns = client, ns

    async def get(self, doc_id: str, version: int | None = None) -> tuple[int, bytes] | None:
        try:
            doc = await self.client.call(s.DocGet(ns=self.ns, id=doc_id, version=version))
        except s.NotFound:
            return None
        return doc.version, doc.body

    async def put(self, doc_id: str, body: bytes, expected_version: int | None) -> int:
        op = s.DocPut(ns=self.ns, id=doc_id, body=body, expected_version=expected_version)
        try:
            return await self.client.call(op)
        except s.Conflict:
            current = await self.get(doc_id)
            raise DocConflict(doc_id, expected_version or 0,
                              current[0] if current else 0) from None

    async def history(self, doc_id: str, limit: int = 100) -> list[tuple[int, bytes]]:
        docs = await self.client.call(s.DocHistory(ns=self.ns, id=doc_id, limit=limit))
        return [(doc.version, doc.body) for doc in docs]

    async def list(self, prefix: str = "") -> list[tuple[str, int, bytes]]:
        found: list[tuple[str, int, bytes]] = []
        cursor = None
        while True:
            page = await self.client.call(s.DocList(ns=self.ns, prefix=prefix, limit=1000,
                                                    cursor=cursor))
            found.extend((doc.id, doc.version, doc.body) for doc in page.documents)
            if page.next_cursor is None:
                return found
            cursor = page.next_cursor


# --- validation ------------------------------------------------------------------------------

def _non_negative(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _non_negative(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _non_negative(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise InvalidConfig(path, f"must not be negative, got {value:g}")


def _check_base(base: dict[str, Any], path: str, known_models: Collection[str] | None) -> None:
    """The overridable part (model and sections), at ``path`` ("" for the config itself)."""
    model = base["model"]
    if not isinstance(model, str) or not model.strip():
        raise InvalidConfig(f"{path}model", "must be a non-empty model name")
    if known_models is not None and model not in known_models:
        raise InvalidConfig(f"{path}model", f"unknown model {model!r}")
    for section in SECTIONS:
        if not isinstance(base[section], dict):
            raise InvalidConfig(f"{path}{section}", "must be an object")
    for section in ("cache", "rate_limit", "batching"):
        _non_negative(base[section], f"{path}{section}")
    for key, value in base["parameters"].items():
        if key in NON_NEGATIVE_PARAMETERS:
            _non_negative(value, f"{path}parameters.{key}")


def validate(config: LLMConfig, known_models: Collection[str] | None = None) -> None:
    """Raise InvalidConfig for the first problem, naming its field path."""
    if not NAME_PATTERN.match(config.service):
        raise InvalidConfig("service", f"{config.service!r}: an application's service name "
                                       "here is 1-128 of A-Z a-z 0-9 _ . : -")
    for name in ("version", "updated_ns"):
        _non_negative(getattr(config, name), name)
    base = {key: getattr(config, key) for key in OVERRIDABLE}
    _check_base(base, "", known_models)
    names: set[str] = set()
    total = 0
    for i, variant in enumerate(config.variants):
        path = f"variants[{i}]"
        if not variant.name or variant.name == BASELINE or variant.name in names:
            raise InvalidConfig(f"{path}.name", f"{variant.name!r}: must be non-empty, unique "
                                                f"and not {BASELINE!r}")
        names.add(variant.name)
        if not 0 <= variant.weight_bp <= BUCKETS:
            raise InvalidConfig(f"{path}.weight_bp", f"must be 0..{BUCKETS}, "
                                                     f"got {variant.weight_bp}")
        total += variant.weight_bp
        unknown = sorted(set(variant.overrides) - set(OVERRIDABLE))
        if unknown:
            raise InvalidConfig(f"{path}.overrides.{unknown[0]}",
                                f"not overridable; one of {', '.join(OVERRIDABLE)}")
        _check_base(merge(base, variant.overrides), f"{path}.overrides.", known_models)
    if total > BUCKETS:
        raise InvalidConfig("variants", f"weights sum to {total} bp, over {BUCKETS}")


def flatten(value: Any, path: str = "") -> dict[str, Any]:
    """Leaf values by path: ``parameters.temperature``, ``variants[0].weight_bp``."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{path}[{i}]"))
        return out
    return {path: value}


def content(config: LLMConfig) -> dict[str, Any]:
    """The config without its metadata (version, updated_ns, reason)."""
    data = msgspec.to_builtins(config)
    return {key: value for key, value in data.items() if key not in METADATA}


# --- the manager -----------------------------------------------------------------------------

class ConfigManager:
    """Reads and writes service configs as versioned documents (id: the service name)."""

    def __init__(self, store: DocStore, known_models: Collection[str] | None = None) -> None:
        self.store = store
        self.known_models = known_models

    async def get(self, service: str, version: int | None = None) -> LLMConfig:
        found = await self.store.get(service, version)
        if found is None:
            raise ConfigNotFound(service, version)
        return msgspec.json.decode(found[1], type=LLMConfig)

    async def put(self, config: LLMConfig, reason: str, expected_version: int) -> LLMConfig:
        """Store ``config`` as the version after ``expected_version``; returns it as stored."""
        stored = msgspec.structs.replace(config, version=expected_version + 1, reason=reason)
        validate(stored, self.known_models)
        try:
            version = await self.store.put(config.service, msgspec.json.encode(stored),
                                           expected_version)
        except DocConflict as exc:
            raise ConfigConflict(config.service, expected_version, exc.current) from None
        return msgspec.structs.replace(stored, version=version)

    async def history(self, service: str, limit: int = 100) -> list[LLMConfig]:
        """Versions, newest first."""
        return [msgspec.json.decode(body, type=LLMConfig)
                for _, body in await self.store.history(service, limit)]

    async def services(self) -> list[str]:
        return [doc_id for doc_id, _, _ in await self.store.list("")]

    async def diff(self, service: str, v1: int, v2: int) -> list[tuple[str, Any, Any]]:
        """(path, value in v1, value in v2) for every leaf that differs (None: absent);
        metadata (version, updated_ns, reason) is not compared."""
        old = flatten(content(await self.get(service, v1)))
        new = flatten(content(await self.get(service, v2)))
        return [(path, old.get(path), new.get(path)) for path in sorted(old.keys() | new.keys())
                if old.get(path) != new.get(path)]

    async def rollback(self, service: str, to_version: int, reason: str,
                       now_ns: int | None = None) -> LLMConfig:
        """Write a new version whose content is that of ``to_version`` (history is kept)."""
        current = await self.get(service)
        target = await self.get(service, to_version)
        updated = current.updated_ns if now_ns is None else now_ns
        restored = msgspec.structs.replace(target, updated_ns=updated)
        return await self.put(restored, reason, current.version)
