"""The processor service: reads the event log as consumer group ``processor``, keeps the
windows, runs the analyzers, decisions and canary rollouts at each analysis interval of event
time, writes what comes out (``outputs``) and checkpoints its state with the log positions.

The loop: poll a batch of events (and any new feedback), feed the core, persist the windows
that closed, run each analysis boundary the watermark passed, and every
``checkpoint_interval_s`` save the checkpoint, then commit the consumer group's offsets. A
failure to read or write is logged and retried; the state is only ever saved whole, so a crash
at any point resumes from the last checkpoint with nothing lost or counted twice.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from ipc import storage as s
from ipc.config import ProcessorSection
from ipc.events import EventDecodeError, LLMEvent, decode_event, decode_feedback
from ipc.prices import price_table_from_config
from ipc.variants import LLMConfig
from workers import tracing
from workers.eventlog import ConsumedRecord, EventLogError, open_consumer
from workers.processor.canary import CanaryDeployer, CanarySettings, RolloutError
from workers.processor.checkpoint import Checkpoint, CheckpointStore
from workers.processor.configs import (
    ConfigError,
    ConfigManager,
    ConfigNotFound,
    InvalidConfig,
    StorageDocStore,
)
from workers.processor.core import Analysis, ProcessorCore
from workers.processor.flags import FeatureFlags, Flag
from workers.processor.metrics import ProcessorMetrics
from workers.processor.judge import JudgeConfig
from workers.processor.outputs import Outputs, doc_id
from workers.processor.proposals import Entry, UnknownProposal
from workers.runtime import Worker
from workers.storage_client import StorageClient

log = logging.getLogger("workers.processor")

GROUP = "processor"
FEEDBACK_LOG = "llm-feedback"
BATCH = 2_000
POLL_TIMEOUT = 0.5
RETRY_DELAY = 1.0
COMMANDS = frozenset({"proposals", "deploy", "dismiss", "configure", "experiment", "abort",
                      "rollouts", "config", "flags", "set-flag"})
NOT_RUNNING = "the processor is not running yet"


class ProcessorWorker(Worker):
    task: asyncio.Task[None] | None = None
    core: ProcessorCore | None = None  # None until prepare() has loaded the checkpoint
    problem = ""

    async def start(self) -> None:
        """Ready at once; the checkpoint is loaded by the run task, which waits for storage as
        long as it takes (degraded meanwhile) instead of failing the start while the store is
        away."""
        section = self.context.section
        assert isinstance(section, ProcessorSection)
        self.section = section
        self.storage = StorageClient(self.context.runtime_dir)
        self.outputs = Outputs(self.storage)
        self.checkpoints = CheckpointStore(self.storage)
        self.prices = price_table_from_config(self.context.config.collector)
        self.configs = ConfigManager(StorageDocStore(self.storage, "configs"))
        self.flags = FeatureFlags(self.storage)
        self.transitions: list[dict[str, Any]] = []  # emitted, not yet published
        self.consumer: Any = None
        self.uncommitted: dict[int, ConsumedRecord] = {}
        self.checkpoints_saved = 0
        self.undecodable = 0
        self.experiments = 0
        self.problem = ""
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self.run(), name="processor")

    async def prepare(self) -> None:
        """The state from the last checkpoint (or a fresh one), the consumer at its
        positions, the feature flags."""
        section = self.section
        rollouts = StorageDocStore(self.storage, "rollouts")
        checkpoint = await self.checkpoints.load()
        await self.flags.load()
        self.consumer = open_consumer(self.context.config, self.context.runtime_dir, GROUP)
        if checkpoint is None:
            core = ProcessorCore(section, self.prices)
            self.deployer = CanaryDeployer(self.configs, rollouts, self.transitions.append,
                                           canary_settings(section))
            self.positions: dict[int, int] = {}
            self.feedback_position = 0
        else:
            core_state, deployer_state = msgspec.msgpack.decode(checkpoint.state,
                                                                type=tuple[bytes, bytes])
            core = ProcessorCore.from_state_bytes(section, self.prices, core_state)
            self.deployer = CanaryDeployer.from_state_bytes(
                deployer_state, self.configs, rollouts, self.transitions.append)
            self.positions = dict(checkpoint.positions)
            self.feedback_position = checkpoint.feedback_position
            self.consumer.resume_from(self.positions)
            log.info("resumed from checkpoint: positions %s, watermark %d", self.positions,
                     core.watermark_ns)
        self.metrics = ProcessorMetrics(core.counters)
        self.last_checkpoint = time.monotonic()
        self.core = core  # from here on the processor is running: status, admin, steps
        self.apply_flags()

    async def wait_for_storage(self) -> bool:
        """``prepare`` until it succeeds; False if the worker is stopped first."""
        while not self.stopping.is_set():
            try:
                await self.prepare()
                self.problem = ""
                return True
            except (EventLogError, s.StorageFailure) as exc:
                self.problem = f"waiting for storage: {exc}"
                log.warning("processor %s; again in %g s", self.problem, RETRY_DELAY)
                await self._sleep(RETRY_DELAY)
        return False

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            await self.task
        if self.consumer is not None:
            await self.consumer.close()
        await self.storage.close()

    def health(self) -> tuple[str, str]:
        return ("degraded", self.problem) if self.problem else ("ok", "")

    def status(self) -> dict[str, Any]:
        if self.core is None:
            return {"starting": True}
        return {**self.core.summary(), "positions": self.positions,
                "feedback_position": self.feedback_position, "undecodable": self.undecodable,
                "checkpoints": self.checkpoints_saved,
                "checkpoint_bytes": self.checkpoints.saved_bytes,
                "rollouts": sorted(self.deployer.active),
                "flags_off": sorted(f.name for f in self.flags.all() if not f.enabled)}

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        if not await self.wait_for_storage():
            return
        while not self.stopping.is_set():
            try:
                await self.step()
                self.problem = ""
            except (EventLogError, s.StorageFailure) as exc:
                self.problem = str(exc)
                log.warning("processor: %s; retrying in %g s", exc, RETRY_DELAY)
                await self._sleep(RETRY_DELAY)
            except Exception as exc:
                self.problem = f"unexpected: {exc!r}"
                log.exception("processor step failed; retrying in %g s", RETRY_DELAY)
                await self._sleep(RETRY_DELAY)
        try:
            await self.checkpoint()
        except (EventLogError, s.StorageFailure) as exc:
            log.warning("last checkpoint failed (events since the previous one will be read "
                        "again): %s", exc)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def step(self) -> None:
        records = await self.consumer.poll(BATCH, POLL_TIMEOUT)
        # A span per batch of events; an idle poll is not worth a trace.
        with (tracing.span("processor.step", {"processor.records": len(records)}) if records
              else contextlib.nullcontext()):
            await self.process(records)

    async def process(self, records: list[ConsumedRecord]) -> None:
        """Feed a batch to the core, run the analyses it makes due, checkpoint when it is time."""
        events = list(self.decode(records))
        done = 0
        while True:
            done += self.core.ingest(events[done:], self.deployer.observe)
            closed = self.core.drain_windows()
            self.metrics.windows(closed)
            await self.outputs.windows(closed)
            boundary = self.core.due_analysis()
            if boundary is None:
                break
            await self.analyze(boundary)
        for record in records:
            self.positions[record.partition] = record.offset + 1
            self.uncommitted[record.partition] = record
        self.metrics.counters(self.core.counters, self.core.watermark_ns)
        await self.read_feedback()
        if self.uncommitted and (self.stopping.is_set() or time.monotonic()
                                 - self.last_checkpoint >= self.section.checkpoint_interval_s):
            await self.checkpoint()

    def decode(self, records: list[ConsumedRecord]) -> Iterator[LLMEvent]:
        for record in records:
            try:
                yield decode_event(record.payload)
            except EventDecodeError as exc:
                self.undecodable += 1
                log.error("event log record %d/%d is not an event, skipped: %s",
                          record.partition, record.offset, exc)

    async def read_feedback(self) -> None:
        page = await self.storage.read_log(FEEDBACK_LOG, self.feedback_position, BATCH)
        items = []
        for record in page.records:
            try:
                items.append(decode_feedback(record.payload))
            except EventDecodeError as exc:
                self.undecodable += 1
                log.error("feedback record %d is not feedback, skipped: %s", record.offset, exc)
        self.core.add_feedback(items)
        self.feedback_position = page.next_offset

    async def analyze(self, boundary: int) -> None:
        """One analysis interval: findings, proposals, canary judgements, auto-deploys."""
        with tracing.span("processor.analysis", {"processor.boundary_ns": boundary}) as span:
            analysis = self.core.analyze(boundary)
            span.set_attribute("processor.findings", len(analysis.findings))
            span.set_attribute("processor.new_proposals", len(analysis.new_proposals))
            self.metrics.analysis(analysis)
            await self.publish(analysis)
            await self.deployer.advance(boundary)
            await self.settle_transitions(boundary)
            if (self.section.decisions.auto_deploy and self.flags.enabled("auto_deploy")
                    and self.flags.enabled("rollouts")):
                for entry in self.core.proposals.next_to_deploy(set(self.deployer.active)):
                    await self.auto_deploy(entry, boundary)

    async def auto_deploy(self, entry: Entry, now_ns: int) -> None:
        """Deploy a new proposal; one that cannot be rolled out stays open, with the reason."""
        try:
            await self.deploy(entry, now_ns)
        except (RolloutError, ConfigError) as exc:
            log.warning("auto-deploy of %s failed: %s", entry.proposal.id, exc)
            self.core.proposals.set_status(entry.proposal.id, "failed",
                                           f"auto-deploy failed: {exc}", now_ns)
            await self.outputs.proposal(entry.proposal.id, entry.to_dict())

    async def publish(self, analysis: Analysis) -> None:
        await self.outputs.findings(analysis.findings)
        for entry in analysis.new_proposals + analysis.refreshed_proposals:
            await self.outputs.proposal(entry.proposal.id, entry.to_dict())
        await self.outputs.events([("proposal", e.proposal.id, analysis.boundary_ns,
                                    e.to_dict()) for e in analysis.new_proposals])

    async def deploy(self, entry: Entry, now_ns: int) -> dict[str, Any]:
        """Start the canary rollout of a proposal."""
        proposal = entry.proposal
        with tracing.span("processor.deploy", {"processor.proposal": proposal.id,
                                               "processor.service": proposal.service}):
            self.flags.require("rollouts", f"deploy of {proposal.id}")
            try:
                baseline = await self.configs.get(proposal.service)
            except ConfigNotFound:
                baseline = await self.configs.put(
                    LLMConfig(service=proposal.service, model=proposal.model,
                              updated_ns=now_ns), "as observed before the first rollout", 0)
            transition = await self.deployer.start(proposal.service, rollout_id(proposal.id),
                                                   baseline, proposal.change, now_ns)
            await self.settle_transitions(now_ns)
        return transition.to_dict()

    def open_proposal(self, args: dict[str, Any]) -> Entry:
        """The proposal ``args["proposal"]`` names, which must still be open (deploying,
        promoted, rolled back or dismissed ones are past deciding)."""
        try:
            entry = self.core.proposals.get(str(args.get("proposal", "")))
        except UnknownProposal as exc:
            raise ValueError(str(exc)) from None
        if entry.status != "open":
            raise ValueError(f"proposal {entry.proposal.id!r} is {entry.status}, not open")
        return entry

    async def configure(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """An operator sets a service's config (a new version; the first one registers it)."""
        service, model = str(args.get("service", "")), str(args.get("model", ""))
        if not service or not model:
            raise ValueError('configure needs {"service": NAME, "model": MODEL}')
        if service in self.deployer.active:
            raise ValueError(f"service {service!r} has a rollout running; wait for it or let "
                             "it roll back")
        try:
            current = await self.configs.get(service)
            version = current.version
        except ConfigNotFound:
            version = 0
        config = LLMConfig(service=service, model=model, updated_ns=now_ns,
                           parameters=dict(args.get("parameters") or {}))
        try:
            stored = await self.configs.put(config, "set by an operator", version)
        except InvalidConfig as exc:
            raise ValueError(str(exc)) from None
        return msgspec.to_builtins(stored)

    async def experiment(self, service: str, change: Any, now_ns: int) -> dict[str, Any]:
        """An operator's canary of any change (no proposal behind it), judged like the rest."""
        if not service or not isinstance(change, dict) or not change:
            raise ValueError('experiment needs {"service": NAME, "change": {...}}, e.g. '
                             '{"service": "writer", "change": {"model": "claude-haiku-4-5"}}')
        self.flags.require("rollouts", f"experiment on {service!r}")
        try:
            baseline = await self.configs.get(service)
        except ConfigNotFound:
            raise ValueError(f"service {service!r} has no config yet; a rollout needs the "
                             "baseline's model") from None
        self.experiments += 1
        try:
            transition = await self.deployer.start(
                service, f"experiment.{self.experiments}.{now_ns // 1_000_000_000}", baseline,
                change, now_ns)
        except RolloutError as exc:
            raise ValueError(str(exc)) from None
        await self.settle_transitions(now_ns)
        return transition.to_dict()

    async def settle_transitions(self, now_ns: int) -> None:
        """Proposal statuses and events for the rollout transitions emitted so far."""
        items = []
        for transition in self.transitions:
            entry = self.proposal_of_rollout(transition["proposal_id"])
            status = {"started": "deploying", "promoted": "promoted",
                      "rolled_back": "rolled_back"}.get(transition["kind"])
            if entry is not None and status is not None:
                self.core.proposals.set_status(entry.proposal.id, status,
                                               transition["reason"], now_ns)
                await self.outputs.proposal(entry.proposal.id, entry.to_dict())
            items.append(("rollout", f"{transition['proposal_id']}.{transition['kind']}."
                          f"{transition['stage']}", transition["time_ns"], transition))
        self.metrics.transitions(self.transitions)
        self.transitions.clear()
        await self.outputs.events(items)

    def proposal_of_rollout(self, rollout_proposal_id: str) -> Entry | None:
        for entry in self.core.proposals.entries.values():
            if rollout_id(entry.proposal.id) == rollout_proposal_id:
                return entry
        return None

    async def checkpoint(self) -> None:
        """Save the state with the positions it reflects, then commit the group's offsets."""
        state = msgspec.msgpack.encode((self.core.state_to_bytes(),
                                        self.deployer.state_to_bytes()))
        with tracing.span("processor.checkpoint", {"processor.checkpoint_bytes": len(state)}):
            await self.checkpoints.save(Checkpoint(dict(self.positions),
                                                   self.feedback_position, state))
            self.checkpoints_saved += 1
            self.last_checkpoint = time.monotonic()
            if self.uncommitted:
                await self.consumer.commit(list(self.uncommitted.values()))
                self.uncommitted = {}

    # --- operator commands (optimizerctl call processor ...) ------------------------------

    async def admin(self, command: str, args: dict[str, Any]) -> Any:
        if self.core is None:
            if command in COMMANDS:
                raise ValueError(f"{NOT_RUNNING}: {self.problem or 'loading its checkpoint'}")
            return await super().admin(command, args)
        now = max(self.core.watermark_ns, 0)  # event time: none before the first event
        if command == "proposals":
            return [e.to_dict() for e in self.core.proposals.entries.values()]
        if command == "deploy":
            entry = self.open_proposal(args)
            try:
                return await self.deploy(entry, now)
            except RolloutError as exc:
                raise ValueError(str(exc)) from None
        if command == "dismiss":
            entry = self.open_proposal(args)
            self.core.proposals.set_status(entry.proposal.id, "dismissed", "by an operator", now)
            await self.outputs.proposal(entry.proposal.id, entry.to_dict())
            return entry.to_dict()
        if command == "configure":
            return await self.configure(args, now)
        if command == "experiment":
            return await self.experiment(str(args.get("service", "")), args.get("change"),
                                         now)
        if command == "abort":
            service = str(args.get("service", ""))
            try:
                transition = await self.deployer.abort(
                    service, str(args.get("reason") or "by an operator"), now)
            except RolloutError as exc:
                raise ValueError(str(exc)) from None
            await self.settle_transitions(now)
            return transition.to_dict()
        if command == "rollouts":
            return {service: msgspec.to_builtins(rollout)
                    for service, rollout in self.deployer.active.items()}
        if command == "config":
            try:
                return msgspec.to_builtins(await self.configs.get(str(args.get("service", ""))))
            except ConfigNotFound as exc:
                raise ValueError(str(exc)) from None
        if command == "flags":
            return msgspec.to_builtins(self.flags.all())
        if command == "set-flag":
            return msgspec.to_builtins(await self.set_flag(args))
        return await super().admin(command, args)

    async def set_flag(self, args: dict[str, Any]) -> Flag:
        name, enabled = str(args.get("name", "")), args.get("enabled")
        if not isinstance(enabled, bool):
            raise ValueError('set-flag needs {"name": FLAG, "enabled": true|false}')
        by = str(args.get("by") or "an operator")
        flag = await self.flags.set(name, enabled, by)
        self.apply_flags()
        log.warning("feature flag %s switched %s by %s", name, "on" if enabled else "off", by)
        return flag

    def apply_flags(self) -> None:
        """Hand the flags that steer the pure core to it."""
        assert self.core is not None
        self.core.proposing = self.flags.enabled("proposals")
        self.core.paused_strategies = self.flags.disabled_strategies()


def rollout_id(proposal_id: str) -> str:
    """Proposal ids hold any character (model names do); rollout documents need plain ones."""
    return doc_id("p", proposal_id)


def canary_settings(section: ProcessorSection) -> CanarySettings:
    canary = section.canary
    return CanarySettings(stages=tuple(round(pct * 100) for pct in canary.stages),
                          interval_ns=section.analysis_interval_s * 1_000_000_000,
                          min_samples=canary.min_samples,
                          pass_min_samples=canary.promote_min_samples,
                          idle_timeout_intervals=canary.stage_timeout_intervals,
                          judge=JudgeConfig(confidence=canary.confidence, max_pairs=100_000))
