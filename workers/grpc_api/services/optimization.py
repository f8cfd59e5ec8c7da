"""OptimizationService (protos/llm_optimizer/v1/optimization.proto) over the REST API's
operations (workers/rest_api/endpoints/optimizations.py): the same role checks, answers and
errors, and the same audit trail for every action.

What the daemon has no backing for is refused rather than faked:

* ``CreateOptimization`` starts an experiment (REST ``POST /v1/optimizations``) per target
  service. ``auto_deploy=false`` is UNIMPLEMENTED: the processor owns optimizations and has no
  command that stores an operator's change as an OPEN one (its proposals come only from its
  strategies). So are per-rollout ``constraints`` (every rollout is judged by the daemon's
  ``[processor.canary]`` settings; ignoring guard rails a caller set would be worse than
  refusing them) and a request without a change whose strategy asks the decision engine to
  make one. CHANGE_TYPE_REMOVE is INVALID_ARGUMENT naming it (a rollout's change is a
  variant's overrides, which can only set values). An experiment has no optimization
  document: the answer describes it (id empty, ``proposal_id`` the rollout's, status
  DEPLOYING, the started rollout); its title, rationale and expected impact are echoed, not
  stored, and it shows afterwards as a rollout. All targets are validated before any rollout
  starts; if a start still fails, the rollouts already started run on and the error names
  them.
* ``ValidateOptimization`` answers a malformed ConfigurationChange like a change the config
  refuses: valid=false with its path (``changes[i].parameter``...).
* ``OptimizationSession`` answers a query with the service's OPEN proposals, ranked as the
  engine ranks them for auto-deploy (direct evidence first, then by savings;
  COST_PERFORMANCE_SCORING: any strategy, model selection first), filtered by operation,
  strategies and the query's ``quality_tolerance``, each checked as ValidateOptimization
  checks a change (which needs the operator role: a viewer's suggestions say valid=false and
  a note says why); the proposals and the config are read once per service for all queries
  within the response cache's TTL (see the proto's staleness note); then, when
  ``[integrations.anthropic]`` is enabled, Claude's suggestions
  (source ANTHROPIC) from the service's measured figures (``metrics_summary``), the query's
  ``prompt`` and ``context``; then a ``complete`` whose notes say what was left out and why.
  Feedback is acknowledged; ACCEPTED with ``deploy`` deploys
  the suggestion's optimization as DeployOptimization would. Feedback is not recorded: the
  collector's feedback path joins a quality score to an LLM call by its event id, a
  SessionFeedback names a suggestion and no call, and no operation of this API records it.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import msgspec
from google.protobuf import json_format, struct_pb2

from ipc import storage as s
from ipc.variants import OVERRIDABLE, SECTIONS, LLMConfig, merge
from protos.llm_optimizer.v1 import (
    common_pb2,
    config_pb2,
    optimization_pb2,
    optimization_pb2_grpc,
)
from workers.grpc_api import wire
from workers.grpc_api.convert import enum_text, enum_value, plain, struct, timestamp_ns
from workers.grpc_api.errors import code_of
from workers.grpc_api.interceptor import REQUEST_ID, GuardedServer, current_principal
from workers.grpc_api.layer import ServiceLayer
from workers.rest_api.auth import AuthError, AuthFailure, Role, authorize
from workers.rest_api.endpoints.common import (
    EVENTS_LOG,
    MAX_PAGE,
    active_rollouts,
    conflict,
)
from workers.rest_api.endpoints.optimizations import check_change
from workers.rest_api.problems import Problem
from workers.rest_api.processor_link import CommandFailed
from workers.rest_api.sse import DEDUP_MAX, READ_BATCH

log = logging.getLogger("workers.grpc_api")

pb = optimization_pb2
Strategy, Status = pb.OptimizationStrategy, pb.OptimizationStatus
DEFAULT_PAGE = 50
EVENTS_WAIT_MS = 10_000  # one long poll of the events log
MAX_BATCH = 1_000  # requests in one BatchCreateOptimizations stream
DEFAULT_SUGGESTIONS, MAX_SUGGESTIONS = 5, 50
SCAN_PAGES = 20  # pages of open proposals read per session query, at most
SESSION_MEMORY = 10_000  # suggestions a session remembers for feedback
ENGINE_STRATEGIES = ("model_selection", "caching", "batching", "prompt_optimization",
                     "rate_limiting")
MAX_CLAUDE_SUGGESTIONS = 5
# The reads whose results session queries share (each query checks its caller's role for them)
_INPUT_READS = ("list_optimizations", "get_config", "get_optimization")
# The processor's expected_impact and constraints keys with a field of their own; the rest
# travel in ``extras``.
_IMPACT_KEYS = frozenset({"cost_pct", "confidence", "savings_usd_per_day", "error_rate_delta",
                          "quality_delta", "latency_delta_ms", "latency_delta_pct"})
_CONSTRAINT_KEYS = frozenset({"quality_tolerance", "latency_budget_ms", "min_samples"})


def _invalid(path: str, detail: str) -> Problem:
    return Problem(422, "Unprocessable Content", detail, path=path, type_suffix="invalid-input")


def _unimplemented(path: str, detail: str) -> Problem:
    return Problem(501, "Not Implemented", detail, path=path, type_suffix="not-implemented")


# --- the change: ConfigurationChange list <-> override document ----------------------------

class ChangeError(ValueError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _ints(value: Any) -> Any:
    """Struct numbers are doubles: whole ones become ints again (max_tokens: 512, not 512.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _lookup(doc: dict[str, Any] | None, parts: list[str]) -> tuple[bool, Any]:
    node: Any = doc
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def change_document(change: struct_pb2.Struct | None,
                    changes: Iterable[pb.ConfigurationChange]
                    ) -> tuple[dict[str, Any], list[tuple[int, list[str]]]]:
    """The override document of ``change`` then ``changes`` in order, and the (index, path) of
    each ADD (which the caller checks against the current config); ChangeError names the field."""
    doc: dict[str, Any] = _ints(plain(change)) if change is not None else {}
    adds: list[tuple[int, list[str]]] = []
    for i, item in enumerate(changes):
        where = f"changes[{i}]"
        parts = item.parameter.split(".")
        if not item.parameter or not all(parts):
            raise ChangeError(f"{where}.parameter", "a dotted path such as 'model' or "
                              "'parameters.temperature'")
        if parts[0] not in OVERRIDABLE or (parts[0] == "model" and len(parts) > 1):
            raise ChangeError(f"{where}.parameter", f"{item.parameter!r}: 'model' or a key of "
                              f"{', '.join(SECTIONS)}")
        if item.change_type == pb.CHANGE_TYPE_REMOVE:
            raise ChangeError(f"{where}.change_type", "a rollout's change can only set values "
                              "(variant overrides are merged); REMOVE is not supported")
        if item.new_value.WhichOneof("kind") is None:
            raise ChangeError(f"{where}.new_value", "the value after the change is required")
        value = _ints(plain(item.new_value))
        if len(parts) == 1 and parts[0] in SECTIONS and not isinstance(value, dict):
            raise ChangeError(f"{where}.new_value", f"{parts[0]} is an object")
        if item.change_type == pb.CHANGE_TYPE_ADD:
            adds.append((i, parts))
        for part in reversed(parts):
            value = {part: value}
        doc = merge(doc, value)
    return doc, adds


def changes_of(change: dict[str, Any], current: dict[str, Any] | None
               ) -> list[pb.ConfigurationChange]:
    """``change`` per parameter (a section's keys one by one), with the current values."""
    out = []
    for key, value in change.items():
        leaves = ([([key, k], v) for k, v in value.items()]
                  if key in SECTIONS and isinstance(value, dict) and value else [([key], value)])
        for parts, leaf in leaves:
            known, old = _lookup(current, parts)
            item = pb.ConfigurationChange(
                parameter=".".join(parts), new_value=_value(leaf),
                change_type=pb.CHANGE_TYPE_ADD if current is not None and not known
                else pb.CHANGE_TYPE_UPDATE)
            if known:
                item.old_value.CopyFrom(_value(old))
            out.append(item)
    return out


# --- plain answers -> messages ---------------------------------------------------------------

def _value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(value, out)
    return out


def _extras(data: dict[str, Any], known: frozenset[str]) -> struct_pb2.Struct | None:
    extra = {k: v for k, v in data.items() if k not in known}
    return struct(extra) if extra else None


def impact_message(data: dict[str, Any]) -> pb.ExpectedImpact:
    """REST/processor expected_impact (cost_pct: negative saves) as ExpectedImpact."""
    cost_pct = float(data.get("cost_pct") or 0.0)
    msg = pb.ExpectedImpact(cost_reduction_pct=-cost_pct if cost_pct else 0.0,
                            confidence=float(data.get("confidence") or 0.0),
                            savings_usd_per_day=float(data.get("savings_usd_per_day") or 0.0),
                            error_rate_delta=float(data.get("error_rate_delta") or 0.0),
                            extras=_extras(data, _IMPACT_KEYS))
    if data.get("quality_delta") is not None:
        msg.quality_delta_pct = float(data["quality_delta"]) * 100
    for name in ("latency_delta_ms", "latency_delta_pct"):
        if data.get(name) is not None:
            setattr(msg, name, float(data[name]))
    return msg


def constraints_message(data: dict[str, Any]) -> pb.Constraints:
    msg = pb.Constraints(extras=_extras(data, _CONSTRAINT_KEYS))
    for name, kind in (("quality_tolerance", float), ("latency_budget_ms", float),
                       ("min_samples", int)):
        if data.get(name) is not None:
            setattr(msg, name, kind(data[name]))
    return msg


def transition_message(data: dict[str, Any]) -> pb.RolloutTransition:
    judge = data.get("judge")
    return pb.RolloutTransition(
        kind=enum_value(pb.TransitionKind, data["kind"]), service=data["service"],
        proposal_id=data["proposal_id"], time=timestamp_ns(data["time_ns"]),
        phase=enum_value(pb.RolloutPhase, data["phase"]), stage=data["stage"],
        weight_bp=data["weight_bp"], config_version=data["config_version"],
        canary_samples=data["canary_samples"], baseline_samples=data["baseline_samples"],
        reason=data["reason"], judge=struct(judge) if judge is not None else None)


def rollout_message(data: dict[str, Any]) -> pb.Rollout:
    return pb.Rollout(id=data["id"], phase=enum_value(pb.RolloutPhase, data["phase"]),
                      stage=data["stage"], start_time=timestamp_ns(data["started_ns"]),
                      change=struct(data["change"]),
                      transitions=[transition_message(t) for t in data["transitions"]])


def optimization_message(view: dict[str, Any], current: dict[str, Any] | None
                         ) -> pb.Optimization:
    """A REST Optimization (or OptimizationDetail: its detail fields too); ``current`` is the
    service's config for the changes' old values (None: unknown)."""
    change = view.get("change") or {}
    msg = pb.Optimization(
        id=view["id"], proposal_id=view["proposal_id"],
        strategy=enum_value(Strategy, view["strategy"]), service=view["service"],
        operation=view["operation"], model=view["model"], title=view["title"],
        status=enum_value(Status, view["status"]), status_detail=view["status_detail"],
        needs_experiment=view["needs_experiment"], change=struct(change),
        changes=changes_of(change, current),
        expected_impact=impact_message(view.get("expected_impact") or {}),
        create_time=timestamp_ns(view["first_ns"]), update_time=timestamp_ns(view["updated_ns"]))
    if "rollouts" in view:
        msg.rationale = view["rationale"]
        msg.constraints.CopyFrom(constraints_message(view["constraints"]))
        msg.evidence.update({k: float(v) for k, v in view["evidence"].items()})
        msg.rollouts.extend(rollout_message(r) for r in view["rollouts"])
    return msg


def config_message(data: dict[str, Any]) -> config_pb2.LLMConfig:
    content = config_pb2.ConfigContent(
        model=data["model"], **{name: struct(data.get(name)) for name in SECTIONS},
        variants=[config_pb2.Variant(name=v["name"], weight_bp=v["weight_bp"],
                                     overrides=struct(v.get("overrides")))
                  for v in data.get("variants", [])])
    return config_pb2.LLMConfig(service=data["service"], version=data["version"],
                                update_time=timestamp_ns(data["updated_ns"]),
                                reason=data.get("reason", ""), content=content)


def _builtins(answer: Any) -> Any:
    return msgspec.to_builtins(answer)


def _engine_rank(view: dict[str, Any]) -> tuple[bool, float, str]:
    """workers.processor.proposals.ProposalBook.next_to_deploy's order: direct evidence
    first, then the larger savings, then by id."""
    impact = view.get("expected_impact") or {}
    return (bool(view.get("needs_experiment")),
            -float(impact.get("savings_usd_per_day") or 0.0), view["proposal_id"])


# --- the service -----------------------------------------------------------------------------

class OptimizationService(optimization_pb2_grpc.OptimizationServiceServicer):
    def __init__(self, layer: ServiceLayer) -> None:
        self.layer = layer

    def _authorize(self, operation_id: str) -> None:
        """The role the REST route of ``operation_id`` needs, for what is not one call of it."""
        role = self.layer.operations.route(operation_id).role
        if role is not None:
            _require(role)

    async def _config(self, service: str) -> dict[str, Any] | None:
        """The service's current config as plain values; None if it has none (or has a name
        no config can have: proposals keep the service names calls came with)."""
        try:
            return _builtins(await self.layer.call("get_config", params={"service": service}))
        except Problem as exc:
            if exc.status in (404, 422):
                return None
            raise

    # --- reads ---------------------------------------------------------------------------

    async def GetOptimization(self, request: pb.GetOptimizationRequest,
                              context: grpc.aio.ServicerContext) -> pb.Optimization:
        view = _builtins(await self.layer.call("get_optimization", params={"id": request.id}))
        return optimization_message(view, await self._config(view["service"]))

    async def ListOptimizations(self, request: pb.ListOptimizationsRequest,
                                context: grpc.aio.ServicerContext
                                ) -> pb.ListOptimizationsResponse:
        if request.page_size < 0:
            raise _invalid("page_size", "must not be negative")
        query = {"service": request.service or None,
                 "strategy": enum_text(Strategy, request.strategy),
                 "status": enum_text(Status, request.status),
                 "limit": min(request.page_size or DEFAULT_PAGE, MAX_PAGE),
                 "cursor": request.page_token or None}
        page = _builtins(await self.layer.call(
            "list_optimizations", query={k: v for k, v in query.items() if v is not None}))
        configs = {service: await self._config(service)
                   for service in {item["service"] for item in page["items"]}}
        return pb.ListOptimizationsResponse(
            optimizations=[optimization_message(item, configs[item["service"]])
                           for item in page["items"]],
            next_page_token=page.get("next_cursor") or "")

    # --- actions -------------------------------------------------------------------------

    async def DeployOptimization(self, request: pb.DeployOptimizationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.RolloutTransition:
        return transition_message(_builtins(
            await self.layer.call("deploy_optimization", params={"id": request.id})))

    async def RollbackOptimization(self, request: pb.RollbackOptimizationRequest,
                                   context: grpc.aio.ServicerContext) -> config_pb2.LLMConfig:
        return config_message(_builtins(
            await self.layer.call("rollback_optimization", params={"id": request.id})))

    async def CancelOptimization(self, request: pb.CancelOptimizationRequest,
                                 context: grpc.aio.ServicerContext) -> pb.Optimization:
        view = _builtins(await self.layer.call("cancel_optimization", params={"id": request.id}))
        return optimization_message(view, await self._config(view["service"]))

    async def ValidateOptimization(self, request: pb.ValidateOptimizationRequest,
                                   context: grpc.aio.ServicerContext
                                   ) -> pb.ValidateOptimizationResponse:
        try:
            change, adds = change_document(
                request.change if request.HasField("change") else None, request.changes)
        except ChangeError as exc:
            self._authorize("validate_optimization")
            running = request.service in await active_rollouts(self.layer.deps)
            return pb.ValidateOptimizationResponse(valid=False, path=exc.path,
                                                   problem=exc.problem, rollout_running=running)
        check = _builtins(await self.layer.call(
            "validate_optimization", body={"service": request.service, "change": change}))
        answer = pb.ValidateOptimizationResponse(
            valid=check["valid"], path=check.get("path") or "",
            problem=check.get("problem") or "", rollout_running=check["rollout_running"])
        if check["valid"]:
            clash = self._added_twice(adds, await self._config(request.service))
            if clash is not None:
                return pb.ValidateOptimizationResponse(
                    valid=False, path=clash.path, problem=clash.problem,
                    rollout_running=check["rollout_running"])
            answer.config.CopyFrom(config_message(check["config"]))
        return answer

    @staticmethod
    def _added_twice(adds: list[tuple[int, list[str]]], current: dict[str, Any] | None
                     ) -> ChangeError | None:
        for index, parts in adds:
            if _lookup(current, parts)[0]:
                return ChangeError(f"changes[{index}].parameter", f"{'.'.join(parts)} is "
                                   "already set; ADD is for what is not (use UPDATE)")
        return None

    # --- create ----------------------------------------------------------------------------

    async def CreateOptimization(self, request: pb.CreateOptimizationRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> pb.CreateOptimizationResponse:
        return await self._create(request)

    async def _create(self, request: pb.CreateOptimizationRequest
                      ) -> pb.CreateOptimizationResponse:
        self._authorize("create_experiment")
        if not request.auto_deploy:
            raise _unimplemented("auto_deploy", "storing a change as an OPEN optimization is "
                                 "not supported (the processor has no such command); set "
                                 "auto_deploy to start its canary rollout now")
        targets = list(request.target_services)
        if not targets:
            raise _invalid("target_services", "name at least one service to change")
        for i, service in enumerate(targets):
            if service in targets[:i]:
                raise _invalid(f"target_services[{i}]", f"{service!r} is named twice")
        if request.HasField("constraints") and request.constraints.ListFields():
            raise _unimplemented("constraints", "per-rollout constraints are not supported: "
                                 "every rollout is judged by the daemon's [processor.canary] "
                                 "settings; leave constraints unset")
        try:
            change, adds = change_document(
                request.change if request.HasField("change") else None, request.changes)
        except ChangeError as exc:
            raise _invalid(exc.path, exc.problem) from None
        strategy = request.strategy or Strategy.Value("OPTIMIZATION_STRATEGY_EXPERIMENT")
        if not change:
            if request.strategy in (0, Strategy.Value("OPTIMIZATION_STRATEGY_EXPERIMENT")):
                raise _invalid("changes", "give the change: changes or change")
            raise _unimplemented("changes", "the decision engine does not make changes on "
                                 "request; deploy one of its OPEN optimizations instead")
        currents = [await self._checked(i, service, change, adds)
                    for i, service in enumerate(targets)]
        results, started = [], []
        for i, (service, current) in enumerate(zip(targets, currents, strict=True)):
            try:
                transition = _builtins(await self.layer.call(
                    "create_experiment", body={"service": service, "change": change}))
            except Problem as exc:
                if started:
                    exc.detail += (f" (target_services[{i}]; the rollouts of "
                                   f"{', '.join(started)} were started and run on)")
                raise
            started.append(service)
            results.append(pb.CreatedOptimization(
                service=service, transition=transition_message(transition),
                optimization=self._experiment(request, strategy, change, current, transition)))
        return pb.CreateOptimizationResponse(results=results)

    async def _checked(self, index: int, service: str, change: dict[str, Any],
                       adds: list[tuple[int, list[str]]]) -> dict[str, Any] | None:
        """The target's current config, once the change is known to apply to it."""
        try:
            check = _builtins(await self.layer.call(
                "validate_optimization", body={"service": service, "change": change}))
        except Problem as exc:
            if exc.path == "service":
                exc.path = f"target_services[{index}]"
            raise
        if not check["valid"]:
            raise _invalid(check["path"] or "change", f"{service}: {check['problem']}")
        if check["rollout_running"]:
            raise conflict(f"service {service!r} has a rollout running")
        current = await self._config(service)
        clash = self._added_twice(adds, current)
        if clash is not None:
            raise _invalid(clash.path, f"{service}: {clash.problem}")
        return current

    @staticmethod
    def _experiment(request: pb.CreateOptimizationRequest, strategy: int,
                    change: dict[str, Any], current: dict[str, Any] | None,
                    transition: dict[str, Any]) -> pb.Optimization:
        """The started experiment as an Optimization (it has no document of its own)."""
        changes = changes_of(change, current)
        title = request.title or "Experiment: " + ", ".join(
            f"{c.parameter}={json.dumps(plain(c.new_value))}" for c in changes)
        started = timestamp_ns(transition["time_ns"])
        msg = pb.Optimization(
            proposal_id=transition["proposal_id"], strategy=strategy,
            service=transition["service"], model=(current or {}).get("model", ""), title=title,
            status=Status.Value("OPTIMIZATION_STATUS_DEPLOYING"), change=struct(change),
            changes=changes, create_time=started, update_time=started,
            rationale=request.rationale,
            rollouts=[pb.Rollout(
                id=f"rollout:{transition['service']}:{transition['proposal_id']}",
                phase=enum_value(pb.RolloutPhase, transition["phase"]),
                stage=transition["stage"], start_time=started, change=struct(change),
                transitions=[transition_message(transition)])])
        if request.HasField("expected_impact"):
            msg.expected_impact.CopyFrom(request.expected_impact)
        return msg

    async def BatchCreateOptimizations(self, request_iterator: AsyncIterator[
                                           pb.CreateOptimizationRequest],
                                       context: grpc.aio.ServicerContext
                                       ) -> pb.BatchCreateOptimizationsResponse:
        self._authorize("create_experiment")
        answer = pb.BatchCreateOptimizationsResponse()
        index = 0
        async for request in request_iterator:
            if index == MAX_BATCH:
                raise Problem(413, "Content Too Large", f"at most {MAX_BATCH} requests per "
                              "stream", type_suffix="too-large")
            try:
                result = pb.BatchCreateResult(index=index, response=await self._create(request))
                answer.succeeded += 1
            except Problem as exc:
                result = pb.BatchCreateResult(index=index, error=common_pb2.ItemError(
                    index=index, path=exc.path or "", reason=exc.detail,
                    code=code_of(exc).value[0]))
                answer.failed += 1
            except Exception:  # one item failing does not end the stream
                log.exception("BatchCreateOptimizations item %d failed (request %s)", index,
                              REQUEST_ID.get())
                result = pb.BatchCreateResult(index=index, error=common_pb2.ItemError(
                    index=index, reason="internal error; the server log has it under request "
                    f"id {REQUEST_ID.get()}", code=grpc.StatusCode.INTERNAL.value[0]))
                answer.failed += 1
            answer.results.append(result)
            index += 1
        return answer

    # --- the events stream -----------------------------------------------------------------

    async def SubscribeOptimizationEvents(
            self, request: pb.SubscribeOptimizationEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """The optimizer-events log from ``since_offset`` (else its end) on, long-polled as
        workers/rest_api/sse.py does; gRPC flow control is the back-pressure (the next read
        waits for the client), and records appended twice after a crash are sent once. The
        wanted events of each read go out at once, in as few messages as the server's message
        size and the request's ``max_events_per_message`` allow: one message per event cost
        more than converting it. Each message is a SubscribeOptimizationEventsResponse already
        in wire bytes (``_events_message``)."""
        _require(Role.VIEWER)  # as GET /v1/events/stream (served apart from the route table)
        deps, types = self.layer.deps, set(request.types)
        room = deps.config.grpc_api.max_message_kb * 1024  # the server's largest message
        most = request.max_events_per_message  # 0: no cap
        as_json = request.body_format != pb.EVENT_BODY_FORMAT_STRUCT
        offset = request.since_offset if request.HasField("since_offset") else None
        reading: asyncio.Future[s.LogReadResult] | None = None
        try:
            if offset is None:
                offset = (await deps.storage.call(s.LogInfo(log=EVENTS_LOG))).next_offset
            seen: OrderedDict[tuple[str, str], None] = OrderedDict()
            reading = self._read_events(offset)
            while not deps.closing.is_set():
                page = await reading
                # storage reads the next page while this one is converted and sent
                reading = self._read_events(page.next_offset)
                batch: list[bytes] = []
                size = 0
                for record in page.records:
                    event = _event(record, types, request.service, seen, as_json)
                    if event is None:
                        continue
                    if batch and (len(batch) == most or size + len(event) > room):
                        yield _events_message(batch)
                        batch, size = [], 0
                    batch.append(event)
                    size += len(event)
                if batch:
                    yield _events_message(batch)
                offset = page.next_offset
        except s.StorageFailure as exc:
            resume = "" if offset is None else f"; resume with since_offset={offset}"
            raise Problem(503, "Service Unavailable", f"storage: {exc}{resume}", retry_after=1,
                          type_suffix="upstream-unavailable") from None
        finally:
            if reading is not None:  # the read ahead is not needed any more
                reading.cancel()
                if reading.done() and not reading.cancelled():
                    reading.exception()  # its failure, if any, concerns no one now

    def _read_events(self, offset: int) -> asyncio.Future[s.LogReadResult]:
        """A long-polling read of the events log from ``offset``, under way."""
        return asyncio.ensure_future(self.layer.deps.storage.call(
            s.LogRead(log=EVENTS_LOG, offset=offset, max_records=READ_BATCH,
                      wait_ms=EVENTS_WAIT_MS), timeout=EVENTS_WAIT_MS / 1000 + 10))

    # --- the interactive session -----------------------------------------------------------

    async def OptimizationSession(self, request_iterator: AsyncIterator[pb.SessionRequest],
                                  context: grpc.aio.ServicerContext
                                  ) -> AsyncIterator[pb.SessionResponse]:
        self._authorize("list_optimizations")
        session = _Session()
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "query":
                async for answer in self._answer(request.query, session):
                    yield answer
            elif kind == "feedback":
                yield await self._feedback(request.feedback, session.remembered)
            else:
                yield _session_error(grpc.StatusCode.INVALID_ARGUMENT,
                                     "send a query or a feedback")

    async def _answer(self, query: pb.SessionQuery, session: _Session
                      ) -> AsyncIterator[pb.SessionResponse]:
        try:
            found, notes = await self._suggestions(query)
        except Problem as exc:
            yield _session_error(code_of(exc), exc.detail, query_id=query.query_id)
            return
        except Exception:  # the session goes on
            log.exception("session query %r failed (request %s)", query.query_id,
                          REQUEST_ID.get())
            yield _session_error(grpc.StatusCode.INTERNAL, "internal error; the server log "
                                 f"has it under request id {REQUEST_ID.get()}",
                                 query_id=query.query_id)
            return
        for suggestion in found:
            suggestion.suggestion_id = session.remember(suggestion.optimization_id)
            yield pb.SessionResponse(suggestion=suggestion)
        yield pb.SessionResponse(complete=pb.QueryComplete(
            query_id=query.query_id, suggestion_count=len(found), notes=notes))

    async def _suggestions(self, query: pb.SessionQuery
                           ) -> tuple[list[pb.Suggestion], list[str]]:
        """The service's open proposals that fit the query, best first, with notes."""
        if not query.service:
            raise _invalid("query.service", "name the service asked about")
        if not 0 <= query.max_suggestions:
            raise _invalid("query.max_suggestions", "must not be negative")
        notes: list[str] = []
        wanted = {enum_text(Strategy, v) for v in query.strategies} - {None}
        scoring = "cost_performance_scoring" in wanted  # model selection first, then any
        if scoring:
            wanted = set()
        tolerance = (query.constraints.quality_tolerance
                     if query.constraints.HasField("quality_tolerance") else None)
        if query.constraints.HasField("latency_budget_ms") or \
                query.constraints.HasField("min_samples"):
            notes.append("latency_budget_ms and min_samples are not applied to suggestions; "
                         "the canary judge keeps the daemon's own guard rails")
        for operation_id in _INPUT_READS:  # what reading them would check
            self._authorize(operation_id)
        inputs = await self._inputs(query.service)
        views = [v for v in inputs.views
                 if (not query.operation or v["operation"] == query.operation)
                 and (not wanted or v["strategy"] in wanted)
                 and not _too_harmful(v, tolerance)]
        views.sort(key=lambda v: ((v["strategy"] != "model_selection") if scoring else False,
                                  *_engine_rank(v)))
        views = views[:min(query.max_suggestions or DEFAULT_SUGGESTIONS, MAX_SUGGESTIONS)]
        may_validate = inputs.config is not None
        if views and not may_validate:
            notes.append(f"{query.service!r} has no config: its suggestions are not validated")
        if views and may_validate:
            try:
                self._authorize("validate_optimization")
            except AuthError as exc:
                if exc.status != 403:
                    raise
                may_validate = False
                notes.append("suggestions are not validated: ValidateOptimization needs "
                             "the operator role")
        found = []
        for view in views:
            task = inputs.made.get(view["id"])
            if not _usable(task):
                task = inputs.made[view["id"]] = asyncio.ensure_future(
                    self._engine_suggestion(view, inputs))
            made, valid = await asyncio.shield(task)
            suggestion = pb.Suggestion(query_id=query.query_id, valid=may_validate and valid)
            suggestion.MergeFrom(made)
            found.append(suggestion)
        claude, note = await self._claude(query)
        if note:
            notes.append(note)
        return found + claude, notes

    async def _inputs(self, service: str) -> _Inputs:
        """The service's open proposals and config, read once for every query about it (from
        any session) in the operations' response cache: for its TTL from the read's start,
        until a write through this process clears it (a read under way then is not reused)."""
        cache = self.layer.operations.cache
        if cache is None:
            return await self._read_inputs(service)
        key = f"grpc:OptimizationSession {service}"
        hit = cache.get(key)
        task = hit.body if hit is not None else None
        if not _usable(task):  # the read runs on if its first asker goes away
            task = asyncio.ensure_future(self._read_inputs(service))
            cache.put(key, 200, task)
        return await asyncio.shield(task)

    async def _read_inputs(self, service: str) -> _Inputs:
        current = await self._config(service)
        return _Inputs(views=await self._open_proposals(service), current=current,
                       config=None if current is None else msgspec.convert(current, LLMConfig))

    async def _engine_suggestion(self, view: dict[str, Any], inputs: _Inputs
                                 ) -> tuple[pb.Suggestion, bool]:
        """An open proposal as a Suggestion (without query_id and valid), and whether its
        change validates against the config read with it (ValidateOptimization's check)."""
        detail = _builtins(await self.layer.call("get_optimization",
                                                 params={"id": view["id"]}))
        valid = inputs.config is not None and \
            check_change(inputs.config, detail["change"]).valid
        return pb.Suggestion(
            source=pb.SUGGESTION_SOURCE_DECISION_ENGINE,
            optimization_id=detail["id"], strategy=enum_value(Strategy, detail["strategy"]),
            service=detail["service"], operation=detail["operation"], title=detail["title"],
            rationale=detail["rationale"], changes=changes_of(detail["change"], inputs.current),
            change=struct(detail["change"]),
            expected_impact=impact_message(detail["expected_impact"]),
            evidence={k: float(v) for k, v in detail["evidence"].items()}), valid

    async def _claude(self, query: pb.SessionQuery) -> tuple[list[pb.Suggestion], str]:
        """Claude's suggestions for the query, through the integrations worker; none, with
        the reason as a note, when Anthropic is not enabled or does not answer."""
        if not self.layer.deps.config.integrations.anthropic.enabled:  # nothing to ask
            return [], "no suggestions from Claude: the anthropic integration is not enabled"
        summary = _builtins(await self.layer.call("metrics_summary",
                                                  query={"service": query.service}))
        totals, by_model = summary["totals"], summary["by_model"]
        calls = max(int(totals["calls"]), 1)
        model = max(by_model, key=lambda m: by_model[m]["calls"]) if by_model else ""
        context = plain(query.context)
        question = query.prompt + (f"\nContext: {json.dumps(context)}" if context else "")
        request = {"service": query.service, "model": model, "operation": query.operation,
                   "avg_input_tokens": totals["tokens_in"] / calls,
                   "avg_output_tokens": totals["tokens_out"] / calls,
                   "cost_per_call_usd": totals["cost_usd"] / calls,
                   "quality_mean": totals["quality_mean"], "question": question}
        try:
            answer = await self.layer.deps.link.call("integrations", "suggest",
                                                     {"request": request})
        except (CommandFailed, Problem) as exc:
            reason = exc.message if isinstance(exc, CommandFailed) else exc.detail
            return [], f"no suggestions from Claude: {reason}"
        found = [pb.Suggestion(
            query_id=query.query_id, source=pb.SUGGESTION_SOURCE_ANTHROPIC,
            service=query.service, operation=query.operation, title=item["title"],
            rationale=item["rationale"],
            change=struct({"suggested": item["change"]} if item["change"] else {}),
            expected_impact=pb.ExpectedImpact(
                cost_reduction_pct=item["expected_savings_pct"] or 0.0))
            for item in answer["items"][:MAX_CLAUDE_SUGGESTIONS]]
        return found, (f"Claude ({answer['model']}) answered with {answer['input_tokens']} "
                       f"input and {answer['output_tokens']} output tokens, "
                       f"${answer['cost_usd']:.4f}")

    async def _open_proposals(self, service: str) -> list[dict[str, Any]]:
        views: list[dict[str, Any]] = []
        cursor = None
        for _ in range(SCAN_PAGES):
            query = {"service": service, "status": "open", "limit": MAX_PAGE,
                     **({"cursor": cursor} if cursor else {})}
            page = _builtins(await self.layer.call("list_optimizations", query=query))
            views += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return views

    async def _feedback(self, feedback: pb.SessionFeedback, remembered: OrderedDict[str, str]
                        ) -> pb.SessionResponse:
        """Acknowledged (not recorded: see the module's docstring); ACCEPTED with ``deploy``
        deploys the suggestion's optimization, as DeployOptimization would."""
        sid = feedback.suggestion_id
        if sid not in remembered:
            return _session_error(grpc.StatusCode.NOT_FOUND, f"no suggestion {sid!r} in this "
                                  "session", suggestion_id=sid)
        if feedback.HasField("rating") and not 0.0 <= feedback.rating <= 1.0:
            return _session_error(grpc.StatusCode.INVALID_ARGUMENT, "rating must be 0..1",
                                  suggestion_id=sid)
        accepted = feedback.verdict == pb.FEEDBACK_VERDICT_ACCEPTED
        if feedback.deploy and not accepted:
            return _session_error(grpc.StatusCode.INVALID_ARGUMENT, "deploy needs the verdict "
                                  "ACCEPTED", suggestion_id=sid)
        log.info("session feedback on %s (%s): %s, rating %s (request %s)", sid,
                 remembered[sid], pb.FeedbackVerdict.Name(feedback.verdict),
                 feedback.rating if feedback.HasField("rating") else "none", REQUEST_ID.get())
        ack = pb.FeedbackAck(suggestion_id=sid)
        if accepted and feedback.deploy:
            try:
                transition = _builtins(await self.layer.call(
                    "deploy_optimization", params={"id": remembered[sid]}))
            except Problem as exc:
                return _session_error(code_of(exc), exc.detail, suggestion_id=sid)
            ack.optimization_id = remembered[sid]
            ack.transition.CopyFrom(transition_message(transition))
        return pb.SessionResponse(feedback_ack=ack)


@dataclass
class _Inputs:
    """A service's suggestion inputs as read at one time, shared by the queries about it."""

    views: list[dict[str, Any]]  # its open proposals (list items)
    current: dict[str, Any] | None  # its config (None: it has none)
    config: LLMConfig | None
    made: dict[str, asyncio.Future[tuple[pb.Suggestion, bool]]] = field(
        default_factory=dict)  # optimization id -> suggestion, valid


def _usable(task: asyncio.Future[Any] | None) -> bool:
    """A shared read that is under way or succeeded (a failed one is read again)."""
    return task is not None and not (task.done() and (task.cancelled()
                                                      or task.exception() is not None))


@dataclass
class _Session:
    """What a session remembers: its suggestions (for feedback), the newest SESSION_MEMORY."""

    remembered: OrderedDict[str, str] = field(default_factory=OrderedDict)  # id -> opt. id
    made: int = 0

    def remember(self, optimization_id: str) -> str:
        self.made += 1
        suggestion_id = f"s{self.made}"
        self.remembered[suggestion_id] = optimization_id
        if len(self.remembered) > SESSION_MEMORY:
            self.remembered.popitem(last=False)
        return suggestion_id


def _require(role: Role) -> None:
    principal = current_principal()
    if principal is None:
        raise AuthError(401, AuthFailure.MISSING, "this call needs a credential")
    authorize(principal, role)


def _too_harmful(view: dict[str, Any], tolerance: float | None) -> bool:
    """A suggestion whose expected quality drop exceeds the query's quality_tolerance."""
    delta = (view.get("expected_impact") or {}).get("quality_delta")
    return tolerance is not None and delta is not None and -float(delta) > tolerance


def _session_error(code: grpc.StatusCode, message: str, *, query_id: str = "",
                   suggestion_id: str = "") -> pb.SessionResponse:
    return pb.SessionResponse(error=pb.SessionError(
        query_id=query_id, suggestion_id=suggestion_id, code=code.value[0], message=message))


class _Record(msgspec.Struct):
    """What the stream reads of an events-log record; the body stays JSON text until a Struct
    is wanted."""

    type: Any = None
    id: Any = None
    time_ns: Any = None
    body: msgspec.Raw = msgspec.Raw(b"null")


class _About(msgspec.Struct):
    service: Any = None


_RECORD = msgspec.json.Decoder(_Record)
_ABOUT = msgspec.json.Decoder(_About)


def _event(record: s.LogRecord, types: set[str], service: str,
           seen: OrderedDict[tuple[str, str], None], as_json: bool) -> bytes | None:
    """The record as an OptimizerEvent, in wire bytes as one element of a response's
    ``events``, if it is wanted and new to this stream; None otherwise (also for a record
    that is not a JSON object, or holds what a Struct cannot: a number beyond a double). A
    ``time_ns`` that is not a positive int64 leaves ``time`` unset; a body that is not an
    object leaves the payload unset. ``as_json``: the body as its JSON text (``body_json``)."""
    try:
        event = _RECORD.decode(record.payload)
    except ValueError:  # not JSON, or not an object
        return None
    ident = (str(event.type), str(event.id))
    if ident in seen or (types and ident[0] not in types):
        return None
    text = bytes(event.body)
    is_object = text[:1] == b"{"
    try:
        if as_json:
            if service and not (is_object and _ABOUT.decode(text).service == service):
                return None
            if not text.isascii():
                text.decode()  # a string field must be UTF-8 (the decoder let it through)
            payload = wire.field(b"\x32", text) if is_object else b""
        else:
            body = msgspec.json.decode(text) if is_object else None
            if service and not (body is not None and body.get("service") == service):
                return None
            payload = b"" if body is None else wire.field(b"\x22", wire.struct_bytes(body))
        ns = event.time_ns
        stamp = wire.timestamp_bytes(ns) if type(ns) is int and 0 < ns < 1 << 63 else None
        # OptimizerEvent: type = 1, id = 2, time = 3, body = 4 | body_json = 6, offset = 5
        message = b"".join((
            wire.field(b"\x0a", ident[0].encode()), wire.field(b"\x12", ident[1].encode()),
            b"" if stamp is None else wire.field(b"\x1a", stamp), payload,
            b"\x28" + wire.varint(record.offset) if record.offset else b""))
    except ValueError:  # not UTF-8 (a lone surrogate too), or what a Struct cannot hold
        return None
    seen[ident] = None
    if len(seen) > DEDUP_MAX:
        seen.popitem(last=False)
    return wire.field(b"\x0a", message)


def _events_message(events: list[bytes]) -> bytes:
    """The SubscribeOptimizationEventsResponse of ``_event`` elements, in wire bytes: the
    call guard sends them as they are (the events never exist as Python messages)."""
    return b"".join(events)


def register(server: GuardedServer, layer: ServiceLayer) -> str:
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(OptimizationService(layer),
                                                                    server)
    return optimization_pb2.DESCRIPTOR.services_by_name["OptimizationService"].full_name
