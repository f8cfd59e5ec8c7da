"""Service configs: read, version history, optimistic writes, diff, rollback, export/import,
and variant resolution for clients.

Configs are read and written directly in storage through the processor's ``ConfigManager``
(the same validation and versioning); a write first asks the processor whether the service has
a rollout running and refuses it then (409), since a rollout owns its service's config.
Every write is announced in the ``optimizer-events`` log as a ``config`` record, so that the
event stream carries config changes with the rollout transitions.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct, field

from ipc.variants import ConfigContent, LLMConfig, effective_config, resolve_variant
from workers.processor.configs import (ConfigConflict, ConfigNotFound, InvalidConfig, content,
                                       validate)
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import (EVENTS_LOG, MAX_PAGE, Deps, conflict,
                                               decode_cursor, encode_cursor, not_found,
                                               refuse_during_rollout)
from workers.rest_api.problems import Problem
from workers.rest_api.routes import Call, Reply, RouteTable

SERVICE_NAME = "^[A-Za-z0-9_.:-]{1,128}$"  # a config document's id in storage
SERVICE = "{service:[A-Za-z0-9_.:-]{1,128}}"
TAGS = ("configs",)
MAX_VERSION = 2 ** 63 - 1  # storage encodes versions as 64-bit integers
Version = Annotated[int, Meta(ge=1, le=MAX_VERSION)]




class ConfigWrite(Struct, kw_only=True, forbid_unknown_fields=True):
    expected_version: Annotated[int, Meta(ge=0, description=(
        "The version the change is based on (0: the service has none yet); 409 otherwise."))]
    config: ConfigContent
    reason: str = "set through the REST API"


class ConfigPage(Struct, kw_only=True):
    items: list[LLMConfig]
    next_cursor: str | None = None


class PageQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 20
    cursor: str | None = None


class DiffQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    from_: Version = field(name="from")
    to: Version


class DiffEntry(Struct):
    path: str
    old: Any
    new: Any


class RollbackBody(Struct, kw_only=True, forbid_unknown_fields=True):
    version: Version
    reason: str = ""


class ServiceConfig(ConfigContent, kw_only=True, forbid_unknown_fields=True):
    service: str


class ConfigExport(Struct, kw_only=True, forbid_unknown_fields=True):
    configs: list[ServiceConfig]


class ImportResult(Struct, kw_only=True):
    written: list[LLMConfig]
    unchanged: list[str]


class ResolveQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    key: Annotated[str, Meta(min_length=1, max_length=1024)]


class Resolution(Struct, kw_only=True):
    service: str
    version: int
    variant: str
    config: dict[str, Any]


def _invalid(exc: InvalidConfig, prefix: str) -> Problem:
    return Problem(422, "Unprocessable Content", f"invalid config at {prefix}{exc.path}: "
                   f"{exc.problem}", path=f"{prefix}{exc.path}", type_suffix="invalid-config")


def _config(service: str, body: ConfigContent, reason: str = "") -> LLMConfig:
    return LLMConfig(service=service, updated_ns=time.time_ns(), reason=reason,
                     **msgspec.structs.asdict(body))


async def current(deps: Deps, service: str, version: int | None = None) -> LLMConfig:
    try:
        return await deps.configs.get(service, version)
    except ConfigNotFound as exc:
        raise not_found(str(exc)) from None


async def announce(deps: Deps, stored: LLMConfig, call: Call) -> None:
    who = call.principal.subject if call.principal else ""
    record = {"type": "config", "id": f"{stored.service}.{stored.version}",
              "time_ns": stored.updated_ns,
              "body": {"service": stored.service, "version": stored.version,
                       "reason": stored.reason, "by": who}}
    await deps.storage.append(EVENTS_LOG, [json.dumps(record).encode()])
    deps.resolve_cache.pop(stored.service, None)


async def write(deps: Deps, config: LLMConfig, reason: str, expected: int, call: Call,
                path_prefix: str = "config.") -> LLMConfig:
    await refuse_during_rollout(deps, config.service)
    try:
        stored = await deps.configs.put(config, reason, expected)
    except InvalidConfig as exc:
        raise _invalid(exc, path_prefix) from None
    except ConfigConflict as exc:
        raise conflict(str(exc)) from None
    await announce(deps, stored, call)
    return stored


def install(table: RouteTable, deps: Deps) -> None:
    viewer, operator = Role.VIEWER, Role.OPERATOR

    @table.route("GET", "/v1/config/export", role=viewer, responses={200: ConfigExport},
                 tags=TAGS)
    async def export_configs(_call: Call) -> ConfigExport:
        """Every service's current config, in the form import takes."""
        configs = []
        for service in await deps.configs.services():
            data = content(await deps.configs.get(service))
            configs.append(msgspec.convert(data, ServiceConfig))
        return ConfigExport(configs=configs)

    @table.route("POST", "/v1/config/import", role=operator, body=ConfigExport,
                 responses={200: ImportResult}, problems=(409,), tags=TAGS)
    async def import_configs(call: Call) -> ImportResult:
        """Write each config that differs from the current one as a new version.

        All configs are validated first; nothing is written if any is invalid (422 naming
        ``configs[i]...``) or if any of their services has a rollout running (409)."""
        body: ConfigExport = call.body
        plans = []
        for i, item in enumerate(body.configs):
            data = msgspec.structs.asdict(item)
            service = data.pop("service")
            config = _config(service, msgspec.convert(data, ConfigContent), "imported")
            try:
                validate(config)
            except InvalidConfig as exc:
                raise _invalid(exc, f"configs[{i}].") from None
            try:
                existing = await deps.configs.get(service)
            except ConfigNotFound:
                existing = None
            if existing is not None and content(existing) == content(config):
                plans.append((config, None))
            else:
                plans.append((config, existing.version if existing else 0))
        for config, _ in plans:
            await refuse_during_rollout(deps, config.service)
        written, unchanged = [], []
        for i, (config, expected) in enumerate(plans):
            if expected is None:
                unchanged.append(config.service)
            else:
                written.append(await write(deps, config, "imported", expected, call,
                                           f"configs[{i}]."))
        return ImportResult(written=written, unchanged=unchanged)

    @table.route("GET", f"/v1/config/{SERVICE}", role=viewer, responses={200: LLMConfig},
                 problems=(404,), tags=TAGS, cached=True)
    async def get_config(call: Call) -> LLMConfig:
        """The service's current config."""
        return await current(deps, call.params["service"])

    @table.route("PUT", f"/v1/config/{SERVICE}", role=operator, body=ConfigWrite,
                 responses={200: LLMConfig, 201: LLMConfig}, problems=(409,), tags=TAGS)
    async def put_config(call: Call) -> Reply:
        """Store a new version, based on ``expected_version`` (409 if it is not current)."""
        body: ConfigWrite = call.body
        stored = await write(deps, _config(call.params["service"], body.config), body.reason,
                             body.expected_version, call)
        return Reply(201 if stored.version == 1 else 200, stored)

    @table.route("GET", f"/v1/config/{SERVICE}/versions", role=viewer, query=PageQuery,
                 responses={200: ConfigPage}, problems=(404,), tags=TAGS, cached=True)
    async def list_config_versions(call: Call) -> ConfigPage:
        """Versions, newest first; ``next_cursor`` continues with older ones."""
        query: PageQuery = call.query
        service = call.params["service"]
        top = decode_cursor(query.cursor)
        if top is None:
            top = (await current(deps, service)).version
        if not isinstance(top, int) or top < 1:
            raise Problem(422, "Unprocessable Content", "the cursor is not one this API made",
                          path="cursor", type_suffix="invalid-input")
        numbers = list(range(top, max(top - query.limit, 0), -1))
        items = await asyncio.gather(*(deps.configs.get(service, n) for n in numbers))
        low = numbers[-1] if numbers else 1
        return ConfigPage(items=list(items),
                          next_cursor=encode_cursor(low - 1) if low > 1 else None)

    @table.route("GET", f"/v1/config/{SERVICE}/versions/{{version:[0-9]+}}", role=viewer,
                 responses={200: LLMConfig}, problems=(404,), tags=TAGS)
    async def get_config_version(call: Call) -> LLMConfig:
        """One version of the service's config."""
        version = int(call.params["version"])
        if version < 1:
            raise not_found("versions count from 1")
        if version > MAX_VERSION:
            raise not_found(f"no version {version} of {call.params['service']!r}")
        return await current(deps, call.params["service"], version)

    @table.route("GET", f"/v1/config/{SERVICE}/diff", role=viewer, query=DiffQuery,
                 responses={200: list[DiffEntry]}, problems=(404,), tags=TAGS)
    async def diff_config(call: Call) -> list[DiffEntry]:
        """Leaves that differ between two versions (metadata not compared)."""
        query: DiffQuery = call.query
        service = call.params["service"]
        for version in (query.from_, query.to):
            await current(deps, service, version)
        changes = await deps.configs.diff(service, query.from_, query.to)
        return [DiffEntry(path, old, new) for path, old, new in changes]

    @table.route("POST", f"/v1/config/{SERVICE}/rollback", role=operator, body=RollbackBody,
                 responses={200: LLMConfig}, problems=(404, 409), tags=TAGS)
    async def rollback_config(call: Call) -> LLMConfig:
        """A new version with the content of an earlier one (history is kept)."""
        body: RollbackBody = call.body
        service = call.params["service"]
        now = await current(deps, service)
        target = await current(deps, service, body.version)
        restored = msgspec.structs.replace(target, updated_ns=time.time_ns())
        reason = body.reason or f"rolled back to version {body.version}"
        return await write(deps, restored, reason, now.version, call)

    @table.route("GET", f"/v1/config/{SERVICE}/resolve", role=viewer, query=ResolveQuery,
                 responses={200: Resolution}, problems=(404,), tags=TAGS)
    async def resolve_config(call: Call) -> Resolution:
        """The variant and effective config a request key gets; sticky per key.

        The config, and each variant's effective config (made once, shared by the answers:
        never changed), are reused for ``[rest_api] cache_ttl_s`` (1 s) per API process."""
        service = call.params["service"]
        hit = deps.resolve_cache.get(service)
        now = time.monotonic()
        if hit is None or hit[0] <= now:
            hit = (now + deps.section.cache_ttl_s, await current(deps, service), {})
            deps.resolve_cache[service] = hit
        _, config, by_variant = hit
        key = call.query.key
        variant = resolve_variant(config, key)
        effective = by_variant.get(variant)
        if effective is None:
            effective = by_variant[variant] = effective_config(config, key)
            effective.pop("variant")
        return Resolution(service=service, version=config.version, variant=variant,
                          config=effective)

