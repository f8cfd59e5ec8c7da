"""Background jobs of the storage worker: maintenance that outlasts an admin call.

Operators queue a job (``job-start``, through the REST API or ``optimizerctl call``) and follow
its record (``job``, ``jobs``) instead of holding a call open for as long as a backup takes. One
runner works the queue off in order, one job at a time, so that two maintenance tasks never
compete for the store. Kinds:

- ``backup``: a consistent copy of the embedded LevelDB, or a pg_dump of PostgreSQL;
- ``compact``: LevelDB compaction, or ``VACUUM (ANALYZE)`` of the PostgreSQL tables;
- ``retention``: the event-log retention, now rather than at the next minute.

A record is written at every state change as a key/value record of the ``jobs`` namespace in
the worker's own backend (not a document: a document keeps every version and cannot be
deleted, and only the newest ``MAX_RECORDS`` records are kept). A job that a crash or a stop
cut short is ``interrupted`` at the next start. Blocking work runs in a thread, which a cancel
cannot interrupt: the job then ends ``cancelled`` once its thread has returned, so that one job
at a time still holds, and its record says what the thread did.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import msgspec

from ipc import storage as s
from workers.storage.backend import Backend, StorageFailure, Unavailable, now_ms, validate

log = logging.getLogger("workers.storage.jobs")

T = TypeVar("T")
Kind = Literal["backup", "compact", "retention"]
State = Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
KINDS = ("backup", "compact", "retention")
ACTIVE = ("queued", "running")
NAMESPACE = "jobs"
MAX_QUEUED = 100
MAX_RECORDS = 1000
DEFAULT_LIST = 50
MAX_LIST = 500
MAX_BY = 200          # characters of "who asked"
MAX_MESSAGE = 1000    # characters of a status line
CANCEL_WAIT = 1.0     # seconds job-cancel waits for a running job to end before it answers
# The tables of workers/storage/migrations that VACUUM (ANALYZE) visits, in this order.
PG_TABLES = ("kv", "ts_points", "doc_versions", "doc_current", "log_records", "log_heads",
             "consumer_offsets")


class JobError(ValueError):
    """A job request refused: a bad field, a full queue, a job in the wrong state."""


class NoSuchJob(JobError):
    """The id names no job (the message starts with "no job": the REST API's 404)."""


class JobsUnavailable(RuntimeError):
    """Job records cannot be read or written now (the backend is not open or is down)."""


class Unsupported(Exception):
    """A job this backend cannot do; the job fails with the reason."""


class CancelledThread(Exception):
    """A cancelled job whose thread could not be interrupted has returned (the message says
    what the thread did)."""


class Job(msgspec.Struct, kw_only=True):
    """One job's record, as the admin commands return it and as it is stored."""

    id: str
    kind: Kind
    args: dict[str, Any]
    by: str
    state: State
    message: str
    result: dict[str, Any] | None = None
    created_ms: int
    started_ms: int = 0
    finished_ms: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Job)


def describe(exc: BaseException) -> str:
    """An error as a status line: the message of expected failures, the type of others too."""
    if isinstance(exc, (StorageFailure, Unsupported, OSError, ValueError)):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def only_fields(what: str, given: dict[str, Any], allowed: Sequence[str]) -> None:
    """Refuse unknown fields, so that a typo is not silently ignored."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no fields"
        raise JobError(f"{what}: unknown field {unknown[0]!r} (it takes {takes})")


def job_args(kind: str, args: Any) -> dict[str, Any]:
    """The checked ``args`` of a new job of ``kind``."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise JobError(f"args must be an object, not {type(args).__name__}")
    if kind != "backup":
        only_fields(f"args of a {kind} job", args, ())
        return {}
    only_fields("args of a backup job", args, ("path",))
    if "path" not in args:
        return {}
    path = args["path"]
    if not isinstance(path, str) or not os.path.isabs(path):
        raise JobError(f"args.path must be an absolute path, not {path!r}")
    path = os.path.normpath(path)
    if os.path.lexists(path):
        raise JobError(f"args.path {path!r} already exists; a backup never overwrites")
    return {"path": path}


def job_id(args: dict[str, Any]) -> str:
    only_fields("job", args, ("id",))
    value = args.get("id")
    if not isinstance(value, str) or not value:
        given = repr(value) if value in (None, "") else type(value).__name__
        raise JobError(f"id must be a job id such as 'j.0123456789abcdef', not {given}")
    return value


def directory_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        # LevelDB deletes obsolete files while it compacts: one may go between list and stat.
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_size
    return total


class JobRunner:
    """The queue, the records and the one task that runs jobs, for one storage worker."""

    def __init__(self, backend: Backend, backups_dir: str,
                 apply_retention: Callable[[], Awaitable[int]], available: Callable[[], bool]):
        self.backend = backend
        self.backups_dir = backups_dir
        self.apply_retention = apply_retention
        self.available = available      # False while the backend is down or being restored
        self.records: dict[str, Job] = {}  # oldest first
        self.queue: deque[Job] = deque()
        self.wakeup = asyncio.Event()
        self.lock = asyncio.Lock()      # one job-start at a time: the queue limit holds
        self.running: Job | None = None
        self.unsaved: set[str] = set()  # finished in memory, not yet stored
        self.work: asyncio.Task | None = None  # the running job's task
        self.runner: asyncio.Task | None = None
        self.stopping = False
        self.last_created = 0

    # --- records ---------------------------------------------------------------------------

    async def load(self) -> list[Job]:
        """Every readable stored record, oldest first."""
        jobs: list[Job] = []
        cursor: bytes | None = None
        while True:
            page = await self.backend.read(s.Scan(ns=NAMESPACE, limit=s.MAX_SCAN_LIMIT,
                                                  cursor=cursor))
            for record in page.records:
                try:
                    jobs.append(_decoder.decode(record.value))
                except msgspec.DecodeError as exc:  # kept: it may be a newer version's record
                    log.warning("ignoring the unreadable job record %r: %s", record.key, exc)
            cursor = page.next_cursor
            if cursor is None:
                break
        jobs.sort(key=lambda job: (job.created_ms, job.id))
        return jobs

    async def write(self, jobs: Sequence[Job], drop: Sequence[str] = ()) -> None:
        """Store records and delete dropped ones in one durable write (a StorageFailure if
        not)."""
        ops: list[s.Op] = [s.Put(ns=NAMESPACE, key=job.id.encode(), value=_encoder.encode(job))
                           for job in jobs]
        ops += [s.Delete(ns=NAMESPACE, key=id_.encode()) for id_ in drop]
        if not ops:
            return
        for op in ops:
            validate(op)
        for result in await self.backend.write(ops):
            if isinstance(result, StorageFailure):
                raise result

    async def save(self, *jobs: Job, drop: Sequence[str] = ()) -> None:
        if not self.available():
            raise JobsUnavailable("cannot record jobs: the storage backend is unavailable")
        try:
            await self.write(jobs, drop)
        except Exception as exc:
            raise JobsUnavailable(f"cannot record jobs: {describe(exc)}") from exc

    async def keep(self, job: Job) -> None:
        """Store a job's new state; a failure is logged, the job goes on (its record in
        memory stays right, and the next state change writes it again)."""
        try:
            await self.save(job)
            self.unsaved.discard(job.id)
        except JobsUnavailable as exc:
            log.warning("job %s (%s) is %s but its record is not stored: %s", job.id, job.kind,
                        job.state, exc)

    def overflow(self, adding: int) -> list[str]:
        """Ids of the oldest finished records beyond MAX_RECORDS once ``adding`` more come."""
        excess = len(self.records) + adding - MAX_RECORDS
        if excess <= 0:
            return []
        finished = (job.id for job in self.records.values() if job.state not in ACTIVE)
        return list(itertools.islice(finished, excess))

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the records, mark the jobs a crash cut short, and start the runner. Raises
        a StorageFailure (Unavailable: retry) when the backend cannot be read or written."""
        jobs = await self.load()
        now = now_ms()
        cut_short = [job for job in jobs if job.state in ACTIVE]
        for job in cut_short:
            job.message = f"the storage worker stopped while this job was {job.state}"
            job.state, job.finished_ms = "interrupted", now
        self.records = {job.id: job for job in jobs}
        drop = self.overflow(0)
        await self.write(cut_short, drop)
        for id_ in drop:
            del self.records[id_]
        for job in cut_short:
            log.warning("job %s (%s) interrupted: %s", job.id, job.kind, job.message)
        self.last_created = max((job.created_ms for job in jobs), default=0)
        self.runner = asyncio.create_task(self.work_off())
        self.runner.add_done_callback(self.runner_ended)

    @property
    def opened(self) -> bool:
        return self.runner is not None

    def runner_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the job runner failed; queued jobs will not run until a restart",
                      exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel the runner (a running job's thread is waited for: the store must not close
        under it), then record every unfinished job as interrupted."""
        self.stopping = True
        if self.runner is None:
            return
        self.runner.cancel()
        await asyncio.gather(self.runner, return_exceptions=True)  # failures: runner_ended
        cut_short = [job for job in self.records.values() if job.state in ACTIVE]
        self.queue.clear()
        for job in cut_short:
            self.finish(job, "interrupted",
                        f"the storage worker stopped while this job was {job.state}")
        # with the jobs that finished while the stop cancelled their last record
        cut_short += [self.records[i] for i in self.unsaved
                      if i in self.records and self.records[i] not in cut_short]
        try:
            await self.save(*cut_short)
        except JobsUnavailable as exc:
            log.warning("%d interrupted job(s) are not recorded as such (the next start does "
                        "it): %s", len(cut_short), exc)

    async def restored(self) -> None:
        """After a restore the store holds the backup's job records: put ours back."""
        try:
            stale = [job.id for job in await self.load() if job.id not in self.records]
            await self.save(*self.records.values(), drop=stale)
        except (StorageFailure, JobsUnavailable) as exc:
            log.warning("job records after the restore may be the backup's: %s", exc)

    # --- admin commands --------------------------------------------------------------------

    def require_open(self) -> None:
        if not self.opened:
            raise JobsUnavailable("background jobs are unavailable until the storage backend "
                                  "has opened")

    async def start_job(self, args: dict[str, Any]) -> Job:
        self.require_open()
        only_fields("job-start", args, ("kind", "args", "by"))
        kind = args.get("kind")
        if kind not in KINDS:
            raise JobError(f"job kind must be one of {', '.join(KINDS)}, not {kind!r}")
        by = args.get("by", "")
        if not isinstance(by, str):
            raise JobError(f"by must be a string (who asked), not {type(by).__name__}")
        if len(by) > MAX_BY:
            raise JobError(f"by must be at most {MAX_BY} characters, not {len(by)}")
        checked = job_args(kind, args.get("args"))
        async with self.lock:
            if len(self.queue) >= MAX_QUEUED:
                raise JobError(f"job queue is full ({MAX_QUEUED} queued); retry later")
            # Strictly increasing, so that created_ms orders the jobs, after a restart too.
            created = max(now_ms(), self.last_created + 1)
            job = Job(id="j." + secrets.token_hex(8), kind=kind, args=checked, by=by,
                      state="queued", message="queued", created_ms=created)
            drop = self.overflow(1)
            await self.save(job, drop=drop)
            self.last_created = created
            for id_ in drop:
                del self.records[id_]
            self.records[job.id] = job
            self.queue.append(job)
            self.wakeup.set()
        log.info("job %s (%s) queued by %s", job.id, kind, by or "-")
        return job

    def list_jobs(self, args: dict[str, Any]) -> list[Job]:
        self.require_open()
        only_fields("jobs", args, ("limit",))
        limit = args.get("limit", DEFAULT_LIST)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise JobError(f"limit must be an integer from 1 to {MAX_LIST}, not {limit!r}")
        return list(itertools.islice(reversed(self.records.values()), limit))

    def job(self, args: dict[str, Any]) -> Job:
        self.require_open()
        id_ = job_id(args)
        found = self.records.get(id_)
        if found is None:
            raise NoSuchJob(f"no job {id_!r}")
        return found

    async def cancel_job(self, args: dict[str, Any]) -> Job:
        job = self.job(args)
        if job.state == "queued":
            self.queue.remove(job)
            self.finish(job, "cancelled", "cancelled before it started")
            await self.keep(job)
        elif job.state == "running" and self.work is not None:
            self.work.cancel()
            # Let an interruptible job end before answering; a thread's says "cancelling".
            await asyncio.wait({self.work}, timeout=CANCEL_WAIT)
        else:
            raise JobError(f"job {job.id!r} is {job.state}, not queued or running")
        return job

    def status(self) -> dict[str, Any]:
        return {"running": self.running.id if self.running else None, "queued": len(self.queue)}

    # --- running ---------------------------------------------------------------------------

    async def work_off(self) -> None:
        while True:
            while not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            job = self.queue.popleft()
            job.state, job.started_ms, job.message = "running", now_ms(), "starting"
            self.running = job
            self.work = work = asyncio.create_task(self.execute(job))
            try:
                await asyncio.wait({work})  # unlike `await work`, not raising its cancel
            except asyncio.CancelledError:  # the worker stops: the job goes first
                work.cancel()
                await asyncio.wait({work})
                raise
            finally:
                self.running = self.work = None
            if work.cancelled() and job.state == "running":  # cancelled before its first step
                self.finish(job, "cancelled", "cancelled before it started")
                await self.keep(job)

    async def execute(self, job: Job) -> None:
        """Run one job and record how it ended."""
        try:
            await self.keep(job)
            job.result, message = await self.perform(job)
        except asyncio.CancelledError:
            if self.stopping:
                raise  # stop() records it as interrupted
            self.finish(job, "cancelled", "cancelled while running")
        except CancelledThread as exc:
            self.finish(job, "cancelled", str(exc))
        except Exception as exc:
            self.finish(job, "failed", describe(exc), exc)
        else:
            self.finish(job, "succeeded", message)
        await self.keep(job)

    def finish(self, job: Job, state: State, message: str,
               error: BaseException | None = None) -> None:
        job.state, job.message, job.finished_ms = state, message[:MAX_MESSAGE], now_ms()
        self.unsaved.add(job.id)  # until keep() has stored it: stop() saves what is left
        took = (job.finished_ms - job.started_ms) / 1000 if job.started_ms else 0.0
        if error is not None:
            expected = isinstance(error, (StorageFailure, Unsupported, OSError))
            log.warning("job %s (%s) failed after %.1f s: %s", job.id, job.kind, took,
                        job.message, exc_info=None if expected else error)
        else:
            log.info("job %s (%s) %s after %.1f s: %s", job.id, job.kind, state, took,
                     job.message)

    async def perform(self, job: Job) -> tuple[dict[str, Any], str]:
        """The job's work: its result and a one-line summary."""
        if not self.available():
            raise Unavailable("the storage backend is unavailable (down, or being restored)")
        if job.kind == "backup":
            return await self.backup(job)
        if job.kind == "compact":
            return await self.compact(job)
        job.message = "applying the event-log retention"
        dropped = await self.apply_retention()
        return {"dropped": dropped}, f"dropped {dropped} event-log records"

    async def in_thread(self, job: Job, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work in a thread and wait for it, even when cancelled: the job and
        the store stay busy until the thread has returned."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.message = (f"cancelling: waiting for the {job.kind} thread to return "
                           "(a thread cannot be interrupted)")
            try:
                job.result = await future
                outcome = "ran to its end (see result)"
            except Exception as exc:
                log.warning("job %s (%s): its thread failed after the cancel: %s", job.id,
                            job.kind, describe(exc))
                outcome = f"then failed: {describe(exc)}"
            if self.stopping:
                raise
            raise CancelledThread(f"cancelled while running; its thread could not be "
                                  f"interrupted and {outcome}") from None

    # --- kinds -----------------------------------------------------------------------------

    async def backup(self, job: Job) -> tuple[dict[str, Any], str]:
        backend = self.backend
        copy = backend.backup
        target = job.args.get("path") or self.backup_path()
        job.message = f"copying a snapshot of the store to {target}"

        def run() -> dict[str, Any]:
            if os.path.lexists(target):
                raise Unsupported(f"{target} already exists; a backup never overwrites")
            try:
                return copy(target)
            except BaseException:
                shutil.rmtree(target + ".partial", ignore_errors=True)  # the copy's own
                raise

        result = await self.in_thread(job, run)
        what = f"{result['keys']} keys" if "keys" in result else f"a pg_dump of " \
            f"{result['bytes']} bytes"
        return result, f"backed up {what} to {result['path']}"

    def backup_path(self) -> str:
        """<backups_dir>/backup-<UTC time>, with -2, -3... when one second sees several."""
        os.makedirs(self.backups_dir, mode=0o700, exist_ok=True)
        base = os.path.join(self.backups_dir,
                            "backup-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
        path = base
        for n in itertools.count(2):
            if not os.path.lexists(path) and not os.path.lexists(path + ".partial"):
                return path
            path = f"{base}-{n}"
        raise AssertionError("unreachable")

    async def compact(self, job: Job) -> tuple[dict[str, Any], str]:
        if self.backend.name == "postgres":
            return await self.vacuum(job)
        path = self.backend.path
        db = self.backend.db
        job.message = f"compacting LevelDB at {path}"

        def run() -> dict[str, Any]:
            before = directory_bytes(path)
            db.compact_range()
            return {"path": path, "bytes_before": before, "bytes_after": directory_bytes(path)}

        result = await self.in_thread(job, run)
        return result, (f"compacted LevelDB: {result['bytes_before']} -> "
                        f"{result['bytes_after']} bytes")

    async def vacuum(self, job: Job) -> tuple[dict[str, Any], str]:
        """VACUUM (ANALYZE) table by table on a connection of its own, in autocommit (VACUUM
        cannot run in a transaction block) and outside the pool (it may take long)."""
        import psycopg
        from psycopg import sql

        backend = self.backend
        kwargs = {**backend.connect_kwargs(), "autocommit": True, "prepare_threshold": None}
        try:
            conn = await psycopg.AsyncConnection.connect(backend.dsn, **kwargs)
        except psycopg.Error as exc:
            raise Unavailable(f"cannot connect to PostgreSQL for VACUUM: "
                              f"{backend.clean(exc)}") from None
        async with conn:  # a cancel also cancels the statement in the server (psycopg)
            for n, table in enumerate(PG_TABLES, 1):
                job.message = f"VACUUM (ANALYZE) {table} ({n}/{len(PG_TABLES)})"
                try:
                    await conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(
                        sql.Identifier(table)))
                except psycopg.Error as exc:
                    raise StorageFailure(f"VACUUM (ANALYZE) {table} failed: "
                                         f"{backend.clean(exc)}") from None
        return {"tables": list(PG_TABLES)}, f"vacuumed and analyzed {len(PG_TABLES)} tables"
