"""Optimizations: the processor's proposals with their rollouts, and the operator's actions on
them (deploy, cancel, roll back, experiments, dry-run validation).

Proposals and rollouts are read from storage (documents ``optimizations`` and ``rollouts``);
every action goes to the processor, which owns them, through the control socket. Cancel or
rollback of a ``deploying`` optimization aborts its running rollout (the processor's ``abort``:
the canary variant is removed at once). Rolling back a promoted optimization writes the
pre-rollout config back as a new version.
"""
from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct, field

from ipc import storage as s
from ipc.variants import LLMConfig, with_overrides
from workers.processor.canary import Transition
from workers.processor.configs import ConfigNotFound, InvalidConfig, validate
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import (MAX_PAGE, Deps, active_rollouts,
                                               command_problem, conflict, decode_cursor,
                                               encode_cursor, not_found, scan_documents)
from workers.rest_api.endpoints.configs import SERVICE_NAME, current, write
from workers.rest_api.problems import Problem
from workers.rest_api.processor_link import CommandFailed
from workers.rest_api.routes import Call, Reply, RouteTable

TAGS = ("optimizations",)
ID = "{id:p\\.[0-9a-f]+}"



class Optimization(Struct, kw_only=True):
    id: str  # the document id; proposal ids hold any character
    proposal_id: str
    strategy: str
    service: str
    operation: str
    model: str
    title: str
    status: str  # open, deploying, promoted, rolled_back, dismissed, failed
    status_detail: str = ""
    needs_experiment: bool = False
    change: dict[str, Any] = field(default_factory=dict)
    expected_impact: dict[str, Any] = field(default_factory=dict)
    first_ns: int = 0
    updated_ns: int = 0


class RolloutView(Struct, kw_only=True):
    id: str
    service: str
    proposal_id: str  # the rollout's: a proposal's document id, or experiment.N.<seconds>
    phase: str
    stage: int
    started_ns: int
    change: dict[str, Any]
    transitions: list[Transition]  # each with the judge's evidence


class OptimizationDetail(Optimization, kw_only=True):
    rationale: str = ""
    constraints: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, float] = field(default_factory=dict)
    rollouts: list[RolloutView] = field(default_factory=list)


class OptimizationPage(Struct, kw_only=True):
    items: list[Optimization]
    next_cursor: str | None = None


class ListQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    service: str | None = None
    strategy: str | None = None
    status: str | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 50
    cursor: str | None = None


class Experiment(Struct, kw_only=True, forbid_unknown_fields=True):
    service: Annotated[str, Meta(pattern=SERVICE_NAME)]  # what a config's name may be
    change: Annotated[dict[str, Any], Meta(min_length=1, description=(
        "Overrides of the service's config: model, parameters, cache, rate_limit, batching, "
        "prompt."))]


class Validation(Struct, kw_only=True):
    valid: bool
    path: str | None = None  # the offending field, e.g. change.parameters.temperature
    problem: str | None = None
    rollout_running: bool = False  # a deploy would be refused now
    config: LLMConfig | None = None  # the config as it would be after the change


_optimization_fields = frozenset(Optimization.__struct_fields__)
_detail_fields = frozenset(OptimizationDetail.__struct_fields__)


def _view(doc_id: str, body: dict[str, Any], kind: type[Struct],
          names: frozenset[str]) -> Any:
    data = {k: v for k, v in body.items() if k in names and k != "id"}
    return msgspec.convert({**data, "id": doc_id, "proposal_id": body["id"]}, kind)


def check_change(config: LLMConfig, change: dict[str, Any], running: bool = False
                 ) -> Validation:
    """The dry run of ``change`` on ``config``: the validate operation's answer, which the gRPC
    session also gives its suggestions (against the config it read) without one call each."""
    try:
        changed = with_overrides(config, change)
    except ValueError as exc:
        return Validation(valid=False, path="change", problem=str(exc), rollout_running=running)
    try:
        validate(changed)
    except InvalidConfig as exc:
        return Validation(valid=False, path=f"change.{exc.path}", problem=exc.problem,
                          rollout_running=running)
    return Validation(valid=True, rollout_running=running, config=changed)


async def _load(deps: Deps, doc_id: str) -> dict[str, Any]:
    try:
        doc = await deps.storage.call(s.DocGet(ns="optimizations", id=doc_id))
    except s.NotFound:
        raise not_found(f"no optimization {doc_id!r}") from None
    return msgspec.json.decode(doc.body)


async def _rollouts(deps: Deps, service: str, doc_id: str) -> list[RolloutView]:
    page = await deps.storage.call(s.DocList(ns="rollouts", prefix=f"rollout:{service}:{doc_id}",
                                             limit=100))
    return [msgspec.convert({**msgspec.json.decode(d.body), "id": d.id}, RolloutView,
                            strict=False) for d in page.documents]


async def _abort(deps: Deps, body: dict[str, Any], call: Call, what: str) -> dict[str, Any]:
    """Roll back the optimization's running rollout (the processor's ``abort``)."""
    who = call.principal.subject if call.principal else "an operator"
    return await _processor(deps, "abort", {"service": body["service"],
                                            "reason": f"{what} of {body['id']} by {who}"})


async def _processor(deps: Deps, command: str, args: dict[str, Any]) -> Any:
    try:
        return await deps.link.call("processor", command, args)
    except CommandFailed as exc:
        if exc.message.startswith("change:"):
            raise Problem(422, "Unprocessable Content", exc.message, path="change",
                          type_suffix="invalid-input") from None
        raise command_problem(exc) from None


def install(table: RouteTable, deps: Deps) -> None:
    viewer, operator = Role.VIEWER, Role.OPERATOR

    @table.route("GET", "/v1/optimizations", role=viewer, query=ListQuery,
                 responses={200: OptimizationPage}, tags=TAGS, cached=True)
    async def list_optimizations(call: Call) -> OptimizationPage:
        """Proposals with their status, filtered by service, strategy and status."""
        q: ListQuery = call.query

        def match(body: dict[str, Any]) -> bool:
            return all(want is None or body.get(name) == want for name, want in
                       (("service", q.service), ("strategy", q.strategy),
                        ("status", q.status)))

        cursor = decode_cursor(q.cursor)
        found, after = await scan_documents(deps, "optimizations", "p.",
                                            cursor if isinstance(cursor, str) else None,
                                            q.limit, match)
        return OptimizationPage(
            items=[_view(i, b, Optimization, _optimization_fields) for i, b in found],
            next_cursor=encode_cursor(after) if after else None)

    @table.route("GET", f"/v1/optimizations/{ID}", role=viewer,
                 responses={200: OptimizationDetail}, problems=(404,), tags=TAGS, cached=True)
    async def get_optimization(call: Call) -> OptimizationDetail:
        """One optimization with its rationale, evidence and rollout history."""
        doc_id = call.params["id"]
        body = await _load(deps, doc_id)
        detail = _view(doc_id, body, OptimizationDetail, _detail_fields)
        detail.rollouts = await _rollouts(deps, body["service"], doc_id)
        return detail

    @table.route("POST", f"/v1/optimizations/{ID}/deploy", role=operator,
                 responses={202: Transition}, problems=(404, 409), tags=TAGS)
    async def deploy_optimization(call: Call) -> Reply:
        """Start the optimization's canary rollout (409 unless it is open and its service
        has no rollout running)."""
        body = await _load(deps, call.params["id"])
        result = await _processor(deps, "deploy", {"proposal": body["id"]})
        return Reply(202, msgspec.convert(result, Transition))

    @table.route("POST", f"/v1/optimizations/{ID}/cancel", role=operator,
                 responses={200: Optimization}, problems=(404, 409), tags=TAGS)
    async def cancel_optimization(call: Call) -> Optimization:
        """Dismiss an optimization that is not deployed; one that is deploying has its
        rollout rolled back."""
        doc_id = call.params["id"]
        body = await _load(deps, doc_id)
        if body["status"] == "deploying":
            await _abort(deps, body, call, "cancel")
            return _view(doc_id, await _load(deps, doc_id), Optimization, _optimization_fields)
        if body["status"] in ("promoted", "rolled_back", "dismissed"):
            raise conflict(f"optimization {body['id']!r} is already {body['status']}")
        result = await _processor(deps, "dismiss", {"proposal": body["id"]})
        return _view(doc_id, result, Optimization, _optimization_fields)

    @table.route("POST", f"/v1/optimizations/{ID}/rollback", role=operator,
                 responses={200: LLMConfig}, problems=(404, 409), tags=TAGS)
    async def rollback_optimization(call: Call) -> LLMConfig:
        """Undo an optimization: a running rollout is rolled back at once; a promoted one
        gets the config from before its rollout, as a new version (409 if the config changed
        since the promotion)."""
        doc_id = call.params["id"]
        body = await _load(deps, doc_id)
        service = body["service"]
        if body["status"] == "deploying":
            await _abort(deps, body, call, "rollback")
            return await current(deps, service)
        promoted = [r for r in await _rollouts(deps, service, doc_id) if r.phase == "promoted"]
        if body["status"] != "promoted" or not promoted:
            raise conflict(f"optimization {body['id']!r} is {body['status']}: nothing of it "
                           "is deployed")
        rollout = promoted[-1]
        before = rollout.transitions[0].config_version - 1
        now = await current(deps, service)
        if now.version != rollout.transitions[-1].config_version or before < 1:
            raise conflict(f"the config of {service!r} changed since the promotion (now "
                           f"version {now.version}); roll back with /v1/config/{service}/"
                           "rollback instead")
        target = await current(deps, service, before)
        restored = msgspec.structs.replace(target, updated_ns=time.time_ns())
        return await write(deps, restored, f"rollback of {body['id']}", now.version, call)

    @table.route("POST", "/v1/optimizations", role=operator, body=Experiment,
                 responses={202: Transition}, problems=(404, 409), tags=TAGS)
    async def create_experiment(call: Call) -> Reply:
        """Canary any change to a service's config (an experiment: no proposal behind it),
        judged like the processor's own proposals."""
        body: Experiment = call.body
        result = await _processor(deps, "experiment", {"service": body.service,
                                                       "change": body.change})
        return Reply(202, msgspec.convert(result, Transition))

    @table.route("POST", "/v1/optimizations/validate", role=operator, body=Experiment,
                 responses={200: Validation}, problems=(404,), tags=TAGS)
    async def validate_optimization(call: Call) -> Validation:
        """Check a change against the service's current config without applying it."""
        body: Experiment = call.body
        try:
            config = await deps.configs.get(body.service)
        except ConfigNotFound as exc:
            raise not_found(str(exc)) from None
        running = body.service in await active_rollouts(deps)
        return check_change(config, body.change, running)
