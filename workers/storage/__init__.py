"""The storage service: the one owner of durable state and of the embedded event log.

Other workers reach it through ``workers.storage_client`` over its own socket, ``storage.sock``
in the runtime directory. A backend that cannot be reached at start (PostgreSQL down) leaves the
worker READY but degraded, with the reason, while it retries with backoff; requests meanwhile
get UNAVAILABLE. Admin commands (``optimizerctl call storage ...``): ``stats``, ``backup``
(a consistent copy while running) and ``restore``; and background jobs (``workers.storage.jobs``,
run one at a time, their records kept in the store): ``job-start`` {kind: backup | compact |
retention, args, by}, ``jobs`` {limit}, ``job`` {id} and ``job-cancel`` {id}.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any

import tenacity
import zmq.asyncio

from ipc import storage as s
from ipc.config import StorageSection
from workers.runtime import Worker
from workers.storage import archive
from workers.storage.backend import Backend, StorageFailure, Unavailable
from workers.storage.jobs import JobRunner
from workers.storage.redis_companion import RedisCompanion
from workers.storage.server import StorageServer

RETENTION_INTERVAL = 60.0
HEALTH_INTERVAL = 5.0  # between real round trips to the backend (and Redis)


def make_backend(section: StorageSection, data_dir: str) -> Backend:
    if section.backend == "postgres":
        from workers.storage.postgres_backend import PostgresBackend

        return PostgresBackend(section.postgres_dsn, section.postgres_pool_size)
    from workers.storage.leveldb_backend import LevelDBBackend

    return LevelDBBackend(section.path or os.path.join(data_dir, "leveldb"), section.sync)


class StorageWorker(Worker):
    backend: Backend
    server: StorageServer
    problem: str = ""  # why the backend cannot be used now (degraded)
    fatal: str = ""    # why it never will be without a restart (unhealthy)

    @property
    def section(self) -> StorageSection:
        section = self.context.section
        assert isinstance(section, StorageSection)
        return section

    async def start(self) -> None:
        self.backend = make_backend(self.section, self.context.data_dir)
        self.ctx = zmq.asyncio.Context()
        self.redis = RedisCompanion(self.section.redis_url) if self.section.redis_url else None
        self.server = StorageServer(self.backend, self.ctx, self.context.runtime_dir,
                                    on_document=self.redis.document_changed if self.redis
                                    else None)
        self.jobs = JobRunner(self.backend, os.path.join(self.context.data_dir, "backups"),
                              self.apply_retention, lambda: self.server.available)
        self.tasks: list[asyncio.Task] = []
        if self.redis:
            await self.redis.check()
        try:
            await self.backend.open()
            await self.jobs.open()
        except Unavailable as exc:
            self.unavailable(str(exc))
            self.tasks.append(asyncio.create_task(self.reconnect()))
        self.tasks.append(asyncio.create_task(self.server.serve()))
        self.tasks.append(asyncio.create_task(self.keep_retention()))
        self.tasks.append(asyncio.create_task(self.watch_health()))
        self.log.info("storage on %s (%s)", self.server.path, self.backend.name)

    def unavailable(self, reason: str) -> None:
        self.problem = reason
        self.server.available = False
        self.log.warning("backend unavailable: %s; retrying", reason)

    async def reconnect(self) -> None:
        """Open the backend again with exponential backoff and jitter until it works.

        A failure that retrying cannot mend (a newer schema, a bad DSN) makes the worker
        unhealthy instead, so that the supervisor restarts it and its start fails loudly.
        """
        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_exponential_jitter(initial=0.2, max=10),
            retry=tenacity.retry_if_exception_type(Unavailable), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        await self.backend.open()
                        await self.jobs.open()
                    except Unavailable as exc:
                        self.problem = str(exc)
                        raise
        except Exception as exc:
            self.fatal = f"cannot open the backend: {exc}"
            self.log.error("%s", self.fatal)
            return
        self.problem = ""
        self.server.available = True
        self.log.info("backend available again")

    async def watch_health(self) -> None:
        """Keep health true after start too: a backend or Redis that goes away later makes
        the service degraded (requests get UNAVAILABLE meanwhile), and ok again after."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL)
            if self.redis:
                await self.redis.check()
            if not self.server.available:
                continue  # reconnect() owns the problem until the backend is open
            try:
                await self.backend.check()
            except Unavailable as exc:
                if self.problem != str(exc):
                    self.log.warning("backend unavailable: %s", exc)
                self.problem = str(exc)
            else:
                if self.problem:
                    self.log.info("backend available again")
                self.problem = ""

    async def apply_retention(self) -> int:
        """The event-log retention of [storage]; returns how many records it dropped."""
        section = self.section
        return await self.backend.apply_retention(int(section.log_retention_hours * 3600_000),
                                                  section.log_retention_records)

    async def keep_retention(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_INTERVAL)
            if not self.server.available:
                continue
            try:
                dropped = await self.apply_retention()
            except StorageFailure as exc:
                self.log.warning("retention failed: %s", exc)
                continue
            if dropped:
                self.log.info("retention dropped %d event-log records", dropped)

    async def stop(self) -> None:
        await self.jobs.stop()  # first: a running job still needs the store
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server.close()
        await self.backend.close()
        if self.redis:
            await self.redis.close()
        self.ctx.term()

    def health(self) -> tuple[str, str]:
        if self.fatal:
            return "unhealthy", self.fatal
        problem = self.problem or (self.redis.problem if self.redis else "")
        return ("degraded", problem) if problem else ("ok", "")

    def status(self) -> dict[str, Any]:
        return {"backend": self.backend.name, **self.server.status(),
                "jobs": self.jobs.status()}

    async def admin(self, command: str, args: dict[str, Any]) -> Any:
        if command == "stats":
            return await self.backend.read(s.Stats())
        if command == "backup":
            return await self.backup(str(args.get("path", "")), args.get("config_file"))
        if command == "restore":
            return await self.restore(str(args.get("path", "")))
        if command == "job-start":
            return await self.jobs.start_job(args)
        if command == "jobs":
            return self.jobs.list_jobs(args)
        if command == "job":
            return self.jobs.job(args)
        if command == "job-cancel":
            return await self.jobs.cancel_job(args)
        return await super().admin(command, args)

    async def backup(self, path: str, config_file: str | None = None) -> dict[str, Any]:
        """A copy of the store in the new directory ``path``, or, for a ``.tar.gz`` path, an
        archive of that copy with ``config_file`` (``workers.storage.archive``)."""
        if not path or not os.path.isabs(path):
            raise ValueError("backup needs an absolute target path that does not exist yet")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        # In a thread: the copy reads a snapshot (LevelDB) or waits for pg_dump (PostgreSQL)
        # while the loop goes on serving and beating.
        if archive.is_archive(path):
            return await asyncio.to_thread(archive.make, path, self.backend.backup,
                                           self.backend.name, config_file)
        return await asyncio.to_thread(self.backend.backup, path)

    async def restore(self, path: str) -> dict[str, Any]:
        """Swap the embedded store for a backup (a directory, or the store of an archive),
        live."""
        from workers.storage.leveldb_backend import LevelDBBackend, restore

        backend = self.backend
        if archive.is_archive(path) and os.path.isfile(path):
            unpacked = path + ".restore"
            shutil.rmtree(unpacked, ignore_errors=True)
            manifest = await asyncio.to_thread(archive.extract, path, unpacked)
            if manifest.get("backend") != backend.name or manifest["backend"] == "postgres":
                store = os.path.join(unpacked, "store")
                raise ValueError(
                    f"the archive holds a {manifest.get('backend')} store, unpacked in {store}"
                    + ("; restore it with pg_restore --clean --no-owner --dbname=... "
                       f"{store}/postgres.dump" if manifest.get("backend") == "postgres"
                       else f"; this daemon runs {backend.name}"))
            try:
                done = await self.restore(os.path.join(unpacked, "store"))
            finally:
                shutil.rmtree(unpacked, ignore_errors=True)
            return {**done, "restored_from": path, "archive": manifest}
        if not isinstance(backend, LevelDBBackend):
            raise ValueError(f"{backend.name}: restore with the database's own tools")
        if not path or not os.path.isdir(path):
            raise ValueError(f"{path!r} is not a backup directory or archive")
        running = self.jobs.running
        if running is not None:  # it reads or compacts the store that restore swaps out
            raise ValueError(f"job {running.id} ({running.kind}) is running; wait for it or "
                             "cancel it (job-cancel), then restore")
        self.server.available = False  # requests meanwhile get UNAVAILABLE, then retry
        await backend.close()
        try:
            keys = await asyncio.to_thread(restore, path, backend.path)
        finally:
            backend.heads.clear()
            backend.versions.clear()
            self.server.heads.clear()
            self.server.committed.clear()
            await backend.open()
            self.server.available = True
        await self.jobs.restored()
        self.log.warning("store restored from %s (%d keys)", path, keys)
        return {"restored_from": path, "keys": keys}
