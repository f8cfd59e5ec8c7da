"""The PostgreSQL backend: the same operations and semantics as the LevelDB one, in tables.

Schema (``workers/storage/migrations/NNNN_name.sql``, applied by ``open()``):

    kv (ns, key bytea, value)                             key/value records, PK (ns, key)
    ts_points (ns, series, ts bigint, value)              time series, PK (ns, series, ts)
    doc_versions (ns, id, version, body, created_ms)      every document version
    doc_current (ns, id, version)                         the current version of each
    log_records (log, offset, appended_ms, payload)       event log, PK (log, offset)
    log_heads (log, next_offset, first_offset)            per log: next offset, oldest kept
    consumer_offsets (group, log, offset)                 committed offsets
    schema_migrations (version, name, applied_at)         applied migrations

Migrations run in one transaction under a transaction-level advisory lock, so two workers
starting at once do not collide; a database whose schema is newer than the newest migration
this code knows is refused (``SchemaTooNew``, not retried: the worker's start fails with it).

A write group is one transaction. Every refusal (document version conflict, commit beyond the
end of a log) is decided before anything is written, against rows locked ``FOR UPDATE`` (the
log heads, the current document versions), so a refused op never aborts its neighbours; then
the group's net effect goes out as one statement per table (``unnest`` of arrays, or ``COPY``
for big log appends), pipelined. Log offsets come from the locked head row: monotonic and
gap-free even with several writers.

Errors: a lost connection, a server that is down or restarting, or no pooled connection in
time raise ``Unavailable`` with the reason (never the DSN or its password). The pool replaces
broken connections; an operation that fails on a stale connection before anything could have
been committed is retried once on a fresh one, so a PostgreSQL restart costs at most the
requests in flight during it. A write whose COMMIT got no answer is reported as Unavailable
("may or may not have been applied").

Backups: not through the worker; ``pg_dump -Fc`` / ``pg_restore`` (see docs/storage.md).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ipc import storage as s
from workers.storage.backend import (Backend, BadRequest, Conflict, NotFound, StorageFailure,
                                     Unavailable, now_ms, stage_each)
from workers.storage import pg_dump
from workers.storage.postgres_migrations import load_migrations, migrate
from workers.storage.postgres_sql import (INSERT_HEADS, LOCK_HEADS, LOCK_DOCS, KV_UPSERT,
                                          KV_DELETE, TS_UPSERT, DOC_INSERT, DOC_CURRENT,
                                          LOG_INSERT, LOG_COPY, HEADS_UPDATE, COMMITS_UPSERT, GET,
                                          SCAN, SCAN_OPEN, TS_RANGE, DOC_GET_CURRENT,
                                          DOC_GET_VERSION, DOC_HISTORY, DOC_LIST, DOC_LIST_AFTER,
                                          LOG_READ, HEAD, COMMITTED)

log = logging.getLogger("workers.storage.postgres")

T = TypeVar("T")
INT64_MAX = (1 << 63) - 1
PREPARE_THRESHOLD = 1     # a statement is prepared on its second execution (a fixed set of SQL)
POOL_TIMEOUT = 2.0        # seconds to wait for a pooled connection while the server is up
DOWN_POOL_TIMEOUT = 0.25  # ... once a connection failed and none worked since (fail fast)
OPEN_TIMEOUT = 5.0        # seconds open() waits for the pool to fill
CONNECT_TIMEOUT = 5       # libpq connect_timeout unless the DSN sets one
COPY_MIN_RECORDS = 500    # log records in a group from which COPY beats unnest
RETENTION_CHUNK = 10_000  # log records deleted per statement by retention
WRITE_RETRIES = 3         # deadlocks and races between writers of different processes


class BadDsn(RuntimeError):
    """postgres_dsn cannot be parsed (retrying cannot help)."""


def successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with prefix (None: none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def columns(rows: Sequence[tuple]) -> list[list[Any]]:
    """Rows as one list per column: the arrays an unnest() insert takes."""
    return [list(column) for column in zip(*rows, strict=True)]


ID_CHARS = re.compile(r"^[A-Za-z0-9_.:\-]*$")  # what a document id may contain (NAME_PATTERN)


class _Group:
    """The net effect of one write group, built before anything is written."""

    def __init__(self, heads: dict[str, list[int]], versions: dict[tuple[str, str], int]):
        self.heads = heads        # log -> [next_offset, first_offset], locked
        self.versions = versions  # (ns, id) -> current version, locked (absent: 0)
        self.kv: dict[tuple[str, bytes], bytes | None] = {}  # None: delete
        self.ts: dict[tuple[str, str, int], bytes] = {}
        self.docs: list[tuple[str, str, int, bytes, int]] = []
        self.current: dict[tuple[str, str], int] = {}
        self.records: list[tuple[str, int, int, bytes]] = []
        self.appended: set[str] = set()
        self.commits: dict[tuple[str, str], int] = {}


class _Retry(Exception):
    """Nothing of the attempt was committed: trying again is safe."""

    def __init__(self, failure: StorageFailure, recheck: bool):
        super().__init__(str(failure))
        self.failure, self.recheck = failure, recheck


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, dsn: str, pool_size: int = 4):
        self.dsn, self.pool_size = dsn, pool_size
        self.pool: AsyncConnectionPool | None = None
        self.schema_version = 0
        self.down = False             # a connection failed and none has worked since
        self.last_connect_error = ""
        self.secrets = self._secrets(dsn)

    # --- errors without secrets -----------------------------------------------------------

    @staticmethod
    def _secrets(dsn: str) -> list[str]:
        secrets = []
        try:
            password = conninfo_to_dict(dsn).get("password")
        except psycopg.Error:
            password = None
        if password:
            secrets.append(str(password))
        match = re.search(r"://[^:/@]*:([^@/]*)@", dsn)  # as written in a URL, maybe %-encoded
        if match and match[1]:
            secrets.append(match[1])
        return secrets

    def clean(self, exc: BaseException | str) -> str:
        """An error message on one line, without the password (or the DSN)."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self.dsn:
            text = text.replace(self.dsn, "<dsn>")
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text[:600]

    def failure(self, exc: BaseException, doing: str) -> StorageFailure:
        """The StorageFailure a psycopg or pool exception stands for."""
        if isinstance(exc, StorageFailure):
            return exc
        if isinstance(exc, PoolTimeout):
            self.down = True
            reason = f": {self.last_connect_error}" if self.last_connect_error else ""
            return Unavailable(f"PostgreSQL: no connection available while {doing}{reason}")
        if isinstance(exc, pg_errors.QueryCanceled):
            return s.StorageTimeout(f"PostgreSQL cancelled the query while {doing}: "
                                    f"{self.clean(exc)}")
        if isinstance(exc, psycopg.OperationalError):
            self.down = True
            return Unavailable(f"PostgreSQL unavailable while {doing}: {self.clean(exc)}")
        if isinstance(exc, psycopg.Error):
            return StorageFailure(f"PostgreSQL error while {doing}: {self.clean(exc)}")
        return StorageFailure(f"internal error while {doing}: {type(exc).__name__}: "
                              f"{self.clean(exc)}")

    def backup(self, target: str) -> dict[str, Any]:
        """A pg_dump of the running database into the new directory ``target``."""
        return pg_dump.dump(self.dsn, target, self.clean)

    # --- lifecycle ------------------------------------------------------------------------

    def connect_kwargs(self) -> dict[str, Any]:
        try:
            given = conninfo_to_dict(self.dsn)
        except psycopg.Error:
            raise BadDsn("[storage] postgres_dsn is not a valid PostgreSQL connection string "
                         "(key=value pairs or a postgresql:// URL)") from None
        kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": PREPARE_THRESHOLD}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in given:
            kwargs["application_name"] = "llm-optimizer-storage"
        return kwargs

    def connection_class(self) -> type[psycopg.AsyncConnection]:
        backend = self

        class Connection(psycopg.AsyncConnection):
            """Remembers why the last connection attempt failed (for Unavailable reasons)."""

            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
                try:
                    conn = await super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    backend.last_connect_error = backend.clean(exc)
                    raise
                backend.last_connect_error = ""
                return conn

        return Connection

    async def open(self) -> None:
        await self.close()  # open() is retried by the worker: leave nothing of a failed try
        kwargs = self.connect_kwargs()
        migrations = load_migrations()
        conn_class = self.connection_class()
        try:
            conn = await conn_class.connect(self.dsn, **{**kwargs, "prepare_threshold": None})
        except psycopg.Error as exc:
            raise Unavailable(f"cannot connect to PostgreSQL: {self.clean(exc)}") from None
        try:
            async with conn:
                self.schema_version = await migrate(conn, migrations)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"PostgreSQL failed during migration: {self.clean(exc)}") from None
        except psycopg.Error as exc:
            raise RuntimeError(f"PostgreSQL schema migration failed: {self.clean(exc)}") \
                from None
        pool = AsyncConnectionPool(
            self.dsn, min_size=self.pool_size, max_size=self.pool_size, open=False,
            name="storage", kwargs=kwargs, connection_class=conn_class, timeout=POOL_TIMEOUT,
            reconnect_timeout=60.0, max_idle=600.0)
        try:
            await pool.open(wait=True, timeout=OPEN_TIMEOUT)
        except PoolTimeout:
            await pool.close()
            raise Unavailable("PostgreSQL: the connection pool did not fill within "
                              f"{OPEN_TIMEOUT:g} s: {self.last_connect_error or 'timeout'}") \
                from None
        self.pool, self.down = pool, False
        log.info("PostgreSQL storage open (schema version %d, pool of %d)",
                 self.schema_version, self.pool_size)

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close(timeout=5.0)

    async def check(self) -> None:
        async def ping(conn: psycopg.AsyncConnection) -> None:
            await (await conn.execute("SELECT 1")).fetchone()
        await self.run("checking", ping)

    # --- running statements ---------------------------------------------------------------

    def get_pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            raise Unavailable("PostgreSQL backend is not open")
        return self.pool

    async def recheck(self) -> None:
        """After a lost connection: test every idle pooled one, so a server restart does not
        fail one request per pooled connection."""
        pool = self.pool
        if pool is not None:
            try:
                await pool.check()
            except Exception as exc:  # noqa: BLE001 - best effort
                log.debug("pool check failed: %s", self.clean(exc))

    async def run(self, doing: str, work: Callable[[psycopg.AsyncConnection], Awaitable[T]]
                  ) -> T:
        """Run idempotent work (reads) on a pooled connection; retried once on a fresh
        connection when the one it got was broken."""
        for attempt in (1, 2):
            pool = self.get_pool()
            try:
                async with pool.connection(DOWN_POOL_TIMEOUT if self.down else None) as conn:
                    result = await work(conn)
                self.down = False
                return result
            except StorageFailure:
                raise
            except PoolTimeout as exc:
                raise self.failure(exc, doing) from None
            except psycopg.OperationalError as exc:
                if attempt == 2 or isinstance(exc, pg_errors.QueryCanceled):
                    raise self.failure(exc, doing) from None
                await self.recheck()
            except Exception as exc:
                raise self.failure(exc, doing) from None
        raise AssertionError("unreachable")

    # --- writes ---------------------------------------------------------------------------

    async def write(self, ops: Sequence[s.Op]) -> list[Any]:
        if not ops:
            return []
        failure: StorageFailure | None = None
        lost = 0
        for _ in range(WRITE_RETRIES + 1):
            try:
                return await self.write_once(ops)
            except _Retry as retry:
                failure = retry.failure
                if retry.recheck:
                    lost += 1
                    if lost > 1:  # a second lost connection: the server is down
                        break
                    await self.recheck()
        assert failure is not None
        raise failure

    async def write_once(self, ops: Sequence[s.Op]) -> list[Any]:
        pool = self.get_pool()
        committing = False
        try:
            async with pool.connection(DOWN_POOL_TIMEOUT if self.down else None) as conn:
                async with conn.transaction():
                    results = await self.apply(conn, ops)
                    committing = True
            self.down = False
            return results
        except StorageFailure:
            raise
        except PoolTimeout as exc:
            raise self.failure(exc, "writing") from None
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure,
                pg_errors.UniqueViolation) as exc:
            # Another writer got there first (rolled back): decide again on fresh rows.
            log.info("write group retried: %s", self.clean(exc))
            raise _Retry(self.failure(exc, "writing"), recheck=False) from None
        except psycopg.OperationalError as exc:
            if committing:
                self.down = True
                raise Unavailable("PostgreSQL connection lost while committing; the writes may "
                                  f"or may not have been applied: {self.clean(exc)}") from None
            raise _Retry(self.failure(exc, "writing"), recheck=True) from None
        except Exception as exc:
            raise self.failure(exc, "writing") from None

    async def apply(self, conn: psycopg.AsyncConnection, ops: Sequence[s.Op]) -> list[Any]:
        """Lock what decides refusals, stage every op, then write the net effect."""
        append_logs = sorted({op.log for op in ops if isinstance(op, s.LogAppend)})
        logs = sorted(set(append_logs) | {op.log for op in ops if isinstance(op, s.LogCommit)})
        docs = sorted({(op.ns, op.id) for op in ops if isinstance(op, s.DocPut)})
        heads: dict[str, list[int]] = {}
        versions: dict[tuple[str, str], int] = {}
        if logs or docs:
            async with conn.pipeline():
                if append_logs:
                    await conn.execute(INSERT_HEADS, [append_logs])
                head_cur = await conn.execute(LOCK_HEADS, [logs]) if logs else None
                doc_cur = await conn.execute(LOCK_DOCS, [[d[0] for d in docs],
                                                         [d[1] for d in docs]]) if docs else None
            if head_cur is not None:
                heads = {row[0]: [row[1], row[2]] for row in await head_cur.fetchall()}
            if doc_cur is not None:
                versions = {(row[0], row[1]): row[2] for row in await doc_cur.fetchall()}
        group = _Group(heads, versions)
        results = stage_each(ops, lambda op: self.stage(group, op))
        await self.flush(conn, group)
        return results

    def stage(self, group: _Group, op: s.Op) -> Any:
        if isinstance(op, s.Put):
            group.kv[(op.ns, op.key)] = op.value
        elif isinstance(op, s.Delete):
            group.kv[(op.ns, op.key)] = None
        elif isinstance(op, s.Batch):
            for inner in op.ops:
                self.stage(group, inner)
        elif isinstance(op, s.TsAppend):
            for point in op.points:
                group.ts[(op.ns, op.series, point.ts)] = point.value
        elif isinstance(op, s.DocPut):
            current = group.versions.get((op.ns, op.id), 0)
            if op.expected_version is not None and op.expected_version != current:
                raise Conflict(f"{op.ns}/{op.id} is at version {current}, "
                               f"not {op.expected_version}")
            version = current + 1
            group.docs.append((op.ns, op.id, version, op.body, now_ms()))
            group.versions[(op.ns, op.id)] = group.current[(op.ns, op.id)] = version
            return version
        elif isinstance(op, s.LogAppend):
            head = group.heads[op.log]
            first_offset, stamp = head[0], now_ms()
            group.records.extend((op.log, first_offset + i, stamp, record)
                                 for i, record in enumerate(op.records))
            head[0] = first_offset + len(op.records)
            group.appended.add(op.log)
            return s.AppendResult(first_offset=first_offset, next_offset=head[0])
        elif isinstance(op, s.LogCommit):
            next_offset = group.heads.get(op.log, [0, 0])[0]
            if op.offset > next_offset:
                raise BadRequest(f"offset {op.offset} is beyond the end of {op.log} "
                                 f"({next_offset})")
            group.commits[(op.group, op.log)] = op.offset
        else:
            raise BadRequest(f"{type(op).__name__} is not a write")
        return None

    async def flush(self, conn: psycopg.AsyncConnection, group: _Group) -> None:
        copy = len(group.records) >= COPY_MIN_RECORDS
        if copy:  # COPY cannot run inside a pipeline: first, on its own
            cur = conn.cursor()
            async with cur.copy(LOG_COPY) as out:
                out.set_types(["text", "int8", "int8", "bytea"])
                for record in group.records:
                    await out.write_row(record)
        async with conn.pipeline():
            puts = [(k, v) for k, v in group.kv.items() if v is not None]
            deletes = [k for k, v in group.kv.items() if v is None]
            if puts:
                await conn.execute(KV_UPSERT, [[k[0] for k, _ in puts], [k[1] for k, _ in puts],
                                               [v for _, v in puts]])
            if deletes:
                await conn.execute(KV_DELETE, [[k[0] for k in deletes], [k[1] for k in deletes]])
            if group.ts:
                keys = list(group.ts)
                await conn.execute(TS_UPSERT, [[k[0] for k in keys], [k[1] for k in keys],
                                               [k[2] for k in keys], list(group.ts.values())])
            if group.docs:
                await conn.execute(DOC_INSERT, columns(group.docs))
                keys = list(group.current)
                await conn.execute(DOC_CURRENT, [[k[0] for k in keys], [k[1] for k in keys],
                                                 list(group.current.values())])
            if group.records and not copy:
                await conn.execute(LOG_INSERT, columns(group.records))
            if group.appended:
                logs = sorted(group.appended)
                await conn.execute(HEADS_UPDATE, [logs, [group.heads[x][0] for x in logs]])
            if group.commits:
                keys = list(group.commits)
                await conn.execute(COMMITS_UPSERT, [[k[0] for k in keys], [k[1] for k in keys],
                                                    list(group.commits.values())])

    # --- reads ----------------------------------------------------------------------------

    async def read(self, op: s.Op) -> Any:
        if isinstance(op, s.Stats):
            return await self.read_stats()
        return await self.run(f"reading ({type(op).__name__})", lambda conn: self.answer(conn, op))

    async def rows(self, conn: psycopg.AsyncConnection, sql: str, params: Sequence[Any]
                   ) -> list[tuple]:
        cur = await conn.execute(sql, params, binary=True)
        return await cur.fetchall()

    async def answer(self, conn: psycopg.AsyncConnection, op: s.Op) -> Any:
        if isinstance(op, s.Get):
            rows = await self.rows(conn, GET, [op.ns, op.key])
            return rows[0][0] if rows else None
        if isinstance(op, s.Scan):
            return await self.scan(conn, op)
        if isinstance(op, s.TsRange):
            start, end = max(op.start, -INT64_MAX - 1), min(op.end, INT64_MAX)
            if start >= end:
                return []
            rows = await self.rows(conn, TS_RANGE, [op.ns, op.series, start, end, op.limit])
            return [s.Point(ts, value) for ts, value in rows]
        if isinstance(op, s.DocGet):
            if op.version:
                rows = [] if op.version > INT64_MAX or op.version < 0 else \
                    await self.rows(conn, DOC_GET_VERSION, [op.ns, op.id, op.version])
            else:
                rows = await self.rows(conn, DOC_GET_CURRENT, [op.ns, op.id])
            if not rows:
                raise NotFound(f"{op.ns}/{op.id}" + (f" version {op.version}" if op.version
                                                     else "") + " does not exist")
            version, body, created_ms = rows[0]
            return s.Document(op.id, version, body, created_ms)
        if isinstance(op, s.DocHistory):
            rows = await self.rows(conn, DOC_HISTORY, [op.ns, op.id, op.limit])
            return [s.Document(op.id, v, body, created) for v, body, created in rows]
        if isinstance(op, s.DocList):
            return await self.doc_list(conn, op)
        if isinstance(op, s.LogRead):
            offset = min(op.offset, INT64_MAX)
            rows = await self.rows(conn, LOG_READ, [op.log, offset, op.log, op.max_records])
            if rows:
                return s.LogReadResult([s.LogRecord(*row) for row in rows], rows[-1][0] + 1)
            head = await self.rows(conn, HEAD, [op.log])
            return s.LogReadResult([], max(op.offset, head[0][1] if head else 0))
        if isinstance(op, s.LogCommitted):
            rows = await self.rows(conn, COMMITTED, [op.group, op.log])
            return rows[0][0] if rows else 0
        if isinstance(op, s.LogInfo):
            rows = await self.rows(conn, HEAD, [op.log])
            next_offset, first = rows[0] if rows else (0, 0)
            return s.LogState(op.log, first, next_offset)
        raise BadRequest(f"{type(op).__name__} is not a read")

    async def scan(self, conn: psycopg.AsyncConnection, op: s.Scan) -> s.ScanResult:
        start = op.prefix if op.cursor is None else max(op.prefix, op.cursor + b"\0")
        end = successor(op.prefix)
        if end is None:
            rows = await self.rows(conn, SCAN_OPEN, [op.ns, start, op.limit + 1])
        else:
            rows = await self.rows(conn, SCAN, [op.ns, start, end, op.limit + 1])
        records = [s.Record(key, value) for key, value in rows[:op.limit]]
        return s.ScanResult(records, records[-1].key if len(rows) > op.limit else None)

    async def doc_list(self, conn: psycopg.AsyncConnection, op: s.DocList) -> s.DocListResult:
        if not ID_CHARS.match(op.prefix):  # no stored id can start with it
            return s.DocListResult([], None)
        # Ids are ASCII, so the prefix is: its successor bounds the range ("~" + 1 = DEL).
        end = op.prefix[:-1] + chr(ord(op.prefix[-1]) + 1) if op.prefix else "\x7f"
        if op.cursor is None:
            rows = await self.rows(conn, DOC_LIST, [op.ns, op.prefix, end, op.limit + 1])
        else:
            # Text cannot hold NUL; no id has one, so "after a\0b" is "after a".
            cursor = op.cursor.split("\0", 1)[0]
            rows = await self.rows(conn, DOC_LIST_AFTER,
                                   [op.ns, op.prefix, end, cursor, op.limit + 1])
        docs = [s.Document(id_, version, body, created) for id_, version, body, created
                in rows[:op.limit]]
        return s.DocListResult(docs, docs[-1].id if len(rows) > op.limit else None)

    # --- maintenance ----------------------------------------------------------------------

    async def apply_retention(self, max_age_ms: int, max_records: int) -> int:
        if not max_age_ms and not max_records:
            return 0
        cutoff = now_ms() - max_age_ms if max_age_ms else None

        async def logs(conn: psycopg.AsyncConnection) -> list[str]:
            return [row[0] for row in await self.rows(
                conn, "SELECT log FROM log_heads WHERE next_offset > first_offset ORDER BY log",
                [])]

        dropped = 0
        for name in await self.run("listing logs for retention", logs):
            dropped += await self.run(f"applying retention to {name}",
                                      lambda conn, n=name: self.retain(conn, n, cutoff,
                                                                       max_records))
        return dropped

    async def retain(self, conn: psycopg.AsyncConnection, name: str, cutoff: int | None,
                     max_records: int) -> int:
        """Advance one log's first_offset (a short transaction holding its head), then delete
        the records before it in chunks, without blocking appends."""
        async with conn.transaction():
            rows = await self.rows(conn, "SELECT next_offset, first_offset FROM log_heads "
                                   "WHERE log = %s FOR UPDATE", [name])
            if not rows:
                return 0
            next_offset, first = rows[0]
            new_first = first
            if max_records and next_offset - first > max_records:
                new_first = next_offset - max_records
            if cutoff is not None and new_first < next_offset:
                young = await self.rows(
                    conn, "SELECT \"offset\" FROM log_records WHERE log = %s AND \"offset\" >= %s "
                    "AND appended_ms >= %s ORDER BY \"offset\" LIMIT 1", [name, new_first, cutoff])
                new_first = young[0][0] if young else next_offset
            if new_first == first:
                return 0
            await conn.execute("UPDATE log_heads SET first_offset = %s WHERE log = %s",
                               [new_first, name])
        # Readers no longer see what lies before first_offset; delete it (and anything an
        # interrupted earlier run left) a chunk at a time.
        lowest = await self.rows(conn, "SELECT min(\"offset\") FROM log_records WHERE log = %s",
                                 [name])
        low = lowest[0][0] if lowest and lowest[0][0] is not None else new_first
        while low < new_first:
            high = min(low + RETENTION_CHUNK, new_first)
            await conn.execute("DELETE FROM log_records WHERE log = %s AND \"offset\" >= %s "
                               "AND \"offset\" < %s", [name, low, high])
            low = high
        return new_first - first

    async def read_stats(self) -> dict[str, Any]:
        async def query(conn: psycopg.AsyncConnection) -> dict[str, Any]:
            tables = await self.rows(
                conn, "SELECT c.relname, greatest(c.reltuples, 0)::bigint, "
                "pg_total_relation_size(c.oid) FROM pg_class c WHERE c.relkind = 'r' AND "
                "c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(%s)",
                [["kv", "ts_points", "doc_versions", "doc_current", "log_records", "log_heads",
                  "consumer_offsets"]])
            heads = await self.rows(conn, "SELECT log, first_offset, next_offset FROM log_heads "
                                    "ORDER BY log LIMIT 1000", [])
            info = conn.info
            return {"server_version": info.server_version, "database": info.dbname,
                    "host": info.host, "port": info.port,
                    "tables": {name: {"rows_estimate": rows, "bytes": size}
                               for name, rows, size in tables},
                    "logs": {name: {"first_offset": first, "next_offset": nxt}
                             for name, first, nxt in heads}}
        return {**self.stats(), **await self.run("reading stats", query)}

    def stats(self) -> dict[str, Any]:
        pool = self.pool
        return {"backend": self.name, "schema_version": self.schema_version,
                "pool_size": self.pool_size, "available": pool is not None and not self.down,
                "pool": pool.get_stats() if pool is not None else {}}
