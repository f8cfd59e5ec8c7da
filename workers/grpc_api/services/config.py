"""ConfigService (protos/llm_optimizer/v1/config.proto) over the REST config operations
(workers/rest_api/endpoints/configs.py): each RPC converts its request, calls the operation and
converts the answer; validation, versioning, rollout checks and the change records are theirs.

DeleteConfig answers UNIMPLEMENTED: the config store keeps each service's config as a version
history and has no operation that retires one. BatchUpdateConfig checks every update before
writing any, but its writes are one put_config each (see its docstring).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import msgspec
from google.protobuf import json_format, struct_pb2

from ipc import storage as s
from ipc.variants import SECTIONS, LLMConfig
from protos.llm_optimizer.v1 import config_pb2, config_pb2_grpc
from workers.grpc_api.convert import plain, struct, timestamp_ns
from workers.grpc_api.interceptor import GuardedServer, current_principal
from workers.grpc_api.layer import ServiceLayer
from workers.processor.configs import InvalidConfig, content, validate
from workers.rest_api.auth import authorize
from workers.rest_api.endpoints.common import (EVENTS_LOG, MAX_PAGE, decode_cursor,
                                               encode_cursor, refuse_during_rollout)
from workers.rest_api.problems import TYPE_PREFIX, Problem
from workers.rest_api.sse import KEEPALIVE_S, READ_BATCH

REASON = "set through the gRPC API"
FIELDS = ("model", *SECTIONS, "variants")  # ConfigContent's fields, the update_mask paths
DEFAULT_PAGE = 20
Event = config_pb2.ConfigEvent


def _content(message: config_pb2.ConfigContent) -> dict[str, Any]:
    """A ConfigContent message as the REST API's ConfigContent JSON."""
    data: dict[str, Any] = {"model": message.model}
    for name in SECTIONS:
        data[name] = plain(getattr(message, name))
    data["variants"] = [{"name": v.name, "weight_bp": v.weight_bp,
                         "overrides": plain(v.overrides)} for v in message.variants]
    return data


def _content_message(data: Mapping[str, Any]) -> config_pb2.ConfigContent:
    return config_pb2.ConfigContent(
        model=data["model"], **{name: struct(data[name]) for name in SECTIONS},
        variants=[config_pb2.Variant(name=v["name"], weight_bp=v["weight_bp"],
                                     overrides=struct(v["overrides"]))
                  for v in data["variants"]])


def _config_message(config: Any) -> config_pb2.LLMConfig:
    """An LLMConfig of the operations (msgspec) as the message."""
    data = msgspec.to_builtins(config)
    return config_pb2.LLMConfig(service=data["service"], version=data["version"],
                                update_time=timestamp_ns(data["updated_ns"]),
                                reason=data["reason"], content=_content_message(data))


def _value(value: Any) -> struct_pb2.Value:
    return json_format.ParseDict(value, struct_pb2.Value())


def _invalid(detail: str, path: str) -> Problem:
    return Problem(422, "Unprocessable Content", detail, path=path, type_suffix="invalid-input")


def _page_size(size: int) -> int:
    """The common.proto convention: 0 the default, above the maximum the maximum."""
    if size < 0:
        raise _invalid(f"page_size must not be negative, got {size}", "page_size")
    return min(size, MAX_PAGE) if size else DEFAULT_PAGE


def _masked(update: config_pb2.UpdateConfigRequest,
            now: Mapping[str, Any] | None) -> dict[str, Any]:
    """The content to write: the request's, or with an update_mask, the current content with
    the masked fields taken from the request (``now`` None: the service has no config)."""
    given = _content(update.config)
    paths = list(update.update_mask.paths)
    if not paths:
        return given
    for i, path in enumerate(paths):
        if path not in FIELDS:
            raise _invalid(f"update_mask: {path!r} is not a field of ConfigContent; one of "
                           f"{', '.join(FIELDS)}", f"update_mask.paths[{i}]")
    if now is None:
        raise Problem(404, "Not Found", f"update_mask needs a current config of "
                      f"{update.service!r} to update; it has none (send the whole content "
                      "with expected_version 0)", type_suffix="not-found")
    return {name: (given if name in paths else now)[name] for name in FIELDS}


def _item_problem(exc: Problem, index: int, note: str = "") -> Problem:
    """``exc`` about the batch's update ``index``: its path and detail name the update."""
    path = f"updates[{index}].{exc.path}" if exc.path else f"updates[{index}]"
    suffix = exc.type.removeprefix(TYPE_PREFIX) if exc.type.startswith(TYPE_PREFIX) else None
    return Problem(exc.status, exc.title, f"updates[{index}]: {exc.detail}{note}", path=path,
                   type_suffix=suffix, retry_after=exc.retry_after)


class ConfigService(config_pb2_grpc.ConfigServiceServicer):
    def __init__(self, layer: ServiceLayer) -> None:
        self.layer = layer

    def _require(self, operation_id: str) -> None:
        """The caller may call ``operation_id``: checked before work that does not go through
        the operation (reading the log) or comes before it (a batch's checks)."""
        principal = current_principal()
        if principal is None:  # the call guard sets one for every non-public RPC
            raise PermissionError(f"{operation_id} needs a caller")
        role = self.layer.operations.route(operation_id).role
        if role is not None:
            authorize(principal, role)

    async def _get(self, service: str, version: int = 0) -> Any:
        if version:
            return await self.layer.call("get_config_version", params={
                "service": service, "version": str(version)})
        return await self.layer.call("get_config", params={"service": service})

    async def _get_or_none(self, service: str) -> Any:
        try:
            return await self._get(service)
        except Problem as exc:
            if exc.status != 404:
                raise
            return None

    async def _put(self, service: str, expected: int, data: dict[str, Any],
                   reason: str) -> config_pb2.LLMConfig:
        stored = await self.layer.call("put_config", params={"service": service}, body={
            "expected_version": expected, "config": data, "reason": reason or REASON})
        return _config_message(stored)

    async def CreateConfig(self, request: config_pb2.CreateConfigRequest,
                           context: grpc.aio.ServicerContext) -> config_pb2.LLMConfig:
        """put_config with expected_version 0: an existing config makes it FAILED_PRECONDITION
        (the operation's 409), not ALREADY_EXISTS."""
        return await self._put(request.service, 0, _content(request.config), request.reason)

    async def GetConfig(self, request: config_pb2.GetConfigRequest,
                        context: grpc.aio.ServicerContext) -> config_pb2.LLMConfig:
        config = await self._get(request.service, request.version)
        if request.version:
            return _config_message(config)
        return self.layer.converted(config, _config_message)  # the current one is a cached read

    async def ListConfigs(self, request: config_pb2.ListConfigsRequest,
                          context: grpc.aio.ServicerContext) -> config_pb2.ListConfigsResponse:
        """Pages over export_configs' services by name (the token is the last name sent); each
        config is read with get_config for its version metadata, which export leaves out."""
        size = _page_size(request.page_size)
        after = decode_cursor(request.page_token)
        if after is not None and not isinstance(after, str):
            raise _invalid("the page token is not one this API made", "page_token")
        exported = await self.layer.call("export_configs")
        services = sorted(item.service for item in exported.configs
                          if after is None or item.service > after)
        page = services[:size]
        configs = await asyncio.gather(*(self._get(service) for service in page))
        return config_pb2.ListConfigsResponse(
            configs=[_config_message(config) for config in configs],
            next_page_token=encode_cursor(page[-1]) if len(services) > size else "")

    async def UpdateConfig(self, request: config_pb2.UpdateConfigRequest,
                           context: grpc.aio.ServicerContext) -> config_pb2.LLMConfig:
        """With an update_mask, the current config is read first and the masked fields laid
        over it; the write is still guarded by expected_version, so a change made since the
        read is refused (FAILED_PRECONDITION), never overwritten."""
        now = None
        if request.update_mask.paths:
            found = await self._get_or_none(request.service)
            now = msgspec.to_builtins(found) if found is not None else None
        return await self._put(request.service, request.expected_version,
                               _masked(request, now), request.reason)

    async def DeleteConfig(self, request: config_pb2.DeleteConfigRequest,
                           context: grpc.aio.ServicerContext) -> config_pb2.DeleteConfigResponse:
        raise Problem(501, "Not Implemented", "configs cannot be deleted: the config store keeps "
                      "each service's config as a version history and has no operation that "
                      "retires one; use UpdateConfig or RollbackConfig to change it instead",
                      type_suffix="not-implemented")

    async def ListConfigVersions(
            self, request: config_pb2.ListConfigVersionsRequest,
            context: grpc.aio.ServicerContext) -> config_pb2.ListConfigVersionsResponse:
        query: dict[str, Any] = {"limit": _page_size(request.page_size)}
        if request.page_token:
            query["cursor"] = request.page_token
        page = await self.layer.call("list_config_versions",
                                     params={"service": request.service}, query=query)
        return config_pb2.ListConfigVersionsResponse(
            configs=[_config_message(config) for config in page.items],
            next_page_token=page.next_cursor or "")

    async def DiffConfigVersions(
            self, request: config_pb2.DiffConfigVersionsRequest,
            context: grpc.aio.ServicerContext) -> config_pb2.DiffConfigVersionsResponse:
        entries = await self.layer.call(
            "diff_config", params={"service": request.service},
            query={"from": request.from_version, "to": request.to_version})
        return config_pb2.DiffConfigVersionsResponse(entries=[
            config_pb2.DiffEntry(path=e.path, old_value=_value(e.old), new_value=_value(e.new))
            for e in entries])

    async def RollbackConfig(self, request: config_pb2.RollbackConfigRequest,
                             context: grpc.aio.ServicerContext) -> config_pb2.LLMConfig:
        stored = await self.layer.call("rollback_config", params={"service": request.service},
                                       body={"version": request.version,
                                             "reason": request.reason})
        return _config_message(stored)

    async def ResolveConfig(self, request: config_pb2.ResolveConfigRequest,
                            context: grpc.aio.ServicerContext) -> config_pb2.Resolution:
        found = await self.layer.call("resolve_config", params={"service": request.service},
                                      query={"key": request.key})
        return config_pb2.Resolution(service=found.service, version=found.version,
                                     variant=found.variant,
                                     config=self.layer.converted(found.config, struct))

    async def ExportConfigs(self, request: config_pb2.ExportConfigsRequest,
                            context: grpc.aio.ServicerContext) -> config_pb2.ConfigExport:
        wanted = set(request.services)
        exported = await self.layer.call("export_configs")
        return config_pb2.ConfigExport(configs=[
            config_pb2.ServiceConfig(service=item.service,
                                     config=_content_message(msgspec.to_builtins(item)))
            for item in exported.configs if not wanted or item.service in wanted])

    async def ImportConfigs(self, request: config_pb2.ImportConfigsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> config_pb2.ImportConfigsResponse:
        """Problems name the REST body's paths (``configs[i].model``): the config's fields sit
        beside ``service`` there, under ``config`` here."""
        result = await self.layer.call("import_configs", body={"configs": [
            {"service": item.service, **_content(item.config)} for item in request.configs]})
        return config_pb2.ImportConfigsResponse(
            written=[_config_message(config) for config in result.written],
            unchanged=list(result.unchanged))

    async def WatchConfig(self, request: config_pb2.WatchConfigRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[Event]:
        """Tails the optimizer-events log for ``config`` records (put there by every write)
        and reads each new version with get_config_version.

        Without since_offset the log's end is taken before the current versions are read, so
        a change made in between is sent rather than lost; a version is sent at most once
        per service (records appended twice, or already sent as CURRENT, are skipped). The
        caller needs the role that reads a config (get_config's)."""
        self._require("get_config")
        services = set(request.services)
        sent: dict[str, int] = {}  # service -> the newest version sent
        storage = self.layer.deps.storage
        if request.HasField("since_offset"):
            offset = request.since_offset
        else:
            offset = (await storage.call(s.LogInfo(log=EVENTS_LOG))).next_offset
            if services:
                names = sorted(services)
            else:
                names = sorted(item.service for item in
                               (await self.layer.call("export_configs")).configs)
            for name in names:
                found = await self._get_or_none(name)
                if found is not None:
                    sent[name] = found.version
                    yield Event(kind=Event.KIND_CURRENT, config=_config_message(found))
        while True:
            page = await storage.call(s.LogRead(
                log=EVENTS_LOG, offset=offset, max_records=READ_BATCH,
                wait_ms=int(KEEPALIVE_S * 1000)), timeout=KEEPALIVE_S + 10)
            for record in page.records:
                change = _config_change(record.payload)
                if change is None:
                    continue
                service, version, by = change
                if (services and service not in services) or version <= sent.get(service, 0):
                    continue
                sent[service] = version
                found = await self._get(service, version)
                yield Event(kind=Event.KIND_CHANGED, config=_config_message(found), by=by,
                            offset=record.offset)
            offset = page.next_offset

    async def BatchUpdateConfig(
            self, request_iterator: AsyncIterator[config_pb2.UpdateConfigRequest],
            context: grpc.aio.ServicerContext) -> config_pb2.BatchUpdateConfigResponse:
        """All or nothing as far as the operations allow.

        Every update is checked before any is written: one update per service, its
        expected_version is the current version (FAILED_PRECONDITION), its content passes the
        validation put_config applies (INVALID_ARGUMENT at ``updates[i].config...``), and no
        service has a rollout running. Then each changed config is written by put_config
        with its expected_version. Storage has no multi-document transaction, so this is not
        atomic against what happens during those writes: if a write is refused (a concurrent
        writer took the version, a rollout started, storage failed), the updates before it
        stay written; the error names the failed update and lists the written ones, and a
        concurrent change is never overwritten."""
        self._require("put_config")
        updates = [update async for update in request_iterator]
        plans: list[tuple[config_pb2.UpdateConfigRequest, dict[str, Any], Any]] = []
        for i, update in enumerate(updates):
            try:
                plans.append(await self._check(update, {p[0].service for p in plans}))
            except Problem as exc:
                raise _item_problem(exc, i) from None
        for update, _, _ in plans:
            await refuse_during_rollout(self.layer.deps, update.service)
        results, written = [], []
        for i, (update, data, now) in enumerate(plans):
            if now is not None and content(now) == {"service": update.service, **data}:
                results.append(config_pb2.BatchUpdateConfigResult(
                    index=i, service=update.service, config=_config_message(now),
                    unchanged=True))
                continue
            try:
                stored = await self._put(update.service, update.expected_version, data,
                                         update.reason)
            except Problem as exc:
                note = (f" (not undone: updates {', '.join(written)} were written before it)"
                        if written else " (nothing was written)")
                raise _item_problem(exc, i, note) from None
            written.append(f"{i} ({update.service} version {stored.version})")
            results.append(config_pb2.BatchUpdateConfigResult(index=i, service=update.service,
                                                              config=stored))
        return config_pb2.BatchUpdateConfigResponse(results=results)

    async def _check(self, update: config_pb2.UpdateConfigRequest, earlier: set[str]
                     ) -> tuple[config_pb2.UpdateConfigRequest, dict[str, Any], Any]:
        """(update, content to write, current config or None), or the Problem refusing it."""
        if update.service in earlier:
            raise _invalid(f"{update.service!r} has an earlier update in this batch; send one "
                           "update per service", "service")
        now = await self._get_or_none(update.service)
        version = now.version if now is not None else 0
        if update.expected_version != version:
            raise Problem(409, "Conflict", f"{update.service!r} is at version {version}, not "
                          f"{update.expected_version}", path="expected_version",
                          type_suffix="conflict")
        data = _masked(update, msgspec.to_builtins(now) if now is not None else None)
        try:
            validate(msgspec.convert({"service": update.service, **data,
                                      "version": version + 1, "updated_ns": time.time_ns()},
                                     LLMConfig),
                     self.layer.deps.configs.known_models)
        except InvalidConfig as exc:
            path = exc.path if exc.path == "service" else f"config.{exc.path}"
            raise _invalid(f"invalid config at {path}: {exc.problem}", path) from None
        return update, data, now


def _config_change(payload: bytes) -> tuple[str, int, str] | None:
    """(service, version, by) of a ``config`` record of the events log; None for others."""
    try:
        record = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("type") != "config":
        return None
    body = record.get("body")
    if not isinstance(body, dict):
        return None
    service, version = body.get("service"), body.get("version")
    if not isinstance(service, str) or not isinstance(version, int):
        return None
    return service, version, str(body.get("by") or "")


def register(server: GuardedServer, layer: ServiceLayer) -> str:
    config_pb2_grpc.add_ConfigServiceServicer_to_server(ConfigService(layer), server)
    return config_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name
