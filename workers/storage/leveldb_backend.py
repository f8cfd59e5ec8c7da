"""The embedded backend: one LevelDB (plyvel) under the data directory.

Key layout (every part that can vary is followed by a NUL, numbers are 8-byte big-endian so
that LevelDB's byte order is numeric order):

    K ns NUL key                      -> value                         key/value records
    T ns NUL series NUL ts            -> value                         time series
    D ns NUL id NUL version           -> created_ms(8) body            document versions
    d ns NUL id                       -> version(8)                    current version
    L log NUL offset                  -> appended_ms(8) payload        event log
    H log                             -> next_offset(8) first_offset(8)
    O group NUL log                   -> offset(8)                     committed offsets

A write group is one WriteBatch written with ``sync`` (fsync) by default, so an acknowledged
write survives a crash of the process or the machine. The storage worker is the only writer,
which lets it keep log heads and current document versions in memory.
"""
from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import plyvel

from ipc import storage as s
from workers.storage.backend import (Backend, BadRequest, Conflict, NotFound, Unavailable,
                                     now_ms, stage_each)

U64 = struct.Struct(">Q")
TS_BIAS = 1 << 63  # signed milliseconds as unsigned, order kept


def u64(n: int) -> bytes:
    return U64.pack(n)


def from_u64(b: bytes, at: int = 0) -> int:
    return U64.unpack_from(b, at)[0]


def _text(value: str) -> bytes:
    return value.encode()


def kv_key(ns: str, key: bytes) -> bytes:
    return b"K" + _text(ns) + b"\0" + key


def ts_key(ns: str, series: str, ts: int) -> bytes:
    return b"T" + _text(ns) + b"\0" + _text(series) + b"\0" + u64(ts + TS_BIAS)


def doc_prefix(ns: str, id_: str) -> bytes:
    return b"D" + _text(ns) + b"\0" + _text(id_) + b"\0"


def current_key(ns: str, id_: str) -> bytes:
    return b"d" + _text(ns) + b"\0" + _text(id_)


def log_key(log: str, offset: int) -> bytes:
    return b"L" + _text(log) + b"\0" + u64(offset)


def head_key(log: str) -> bytes:
    return b"H" + _text(log)


def offset_key(group: str, log: str) -> bytes:
    return b"O" + _text(group) + b"\0" + _text(log)


class WriteGroup:
    """The pending WriteBatch of one group, with reads that see its own earlier writes."""

    def __init__(self, backend: LevelDBBackend):
        self.backend = backend
        self.batch = backend.db.write_batch(sync=backend.sync)
        self.doc_versions: dict[tuple[str, str], int] = {}
        self.heads: dict[str, tuple[int, int]] = {}

    def doc_version(self, ns: str, id_: str) -> int:
        if (ns, id_) not in self.doc_versions:
            return self.backend.doc_version(ns, id_)
        return self.doc_versions[(ns, id_)]

    def head(self, log: str) -> tuple[int, int]:
        return self.heads.get(log) or self.backend.head(log)


class LevelDBBackend(Backend):
    name = "leveldb"

    def __init__(self, path: str, sync: bool = True):
        self.path, self.sync = path, sync
        self.db: plyvel.DB | None = None
        self.heads: dict[str, tuple[int, int]] = {}  # log -> (next_offset, first_offset)
        self.versions: dict[tuple[str, str], int] = {}

    async def open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        try:
            self.db = plyvel.DB(self.path, create_if_missing=True)
        except (plyvel.Error, OSError) as exc:
            raise Unavailable(f"cannot open LevelDB at {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    async def check(self) -> None:
        if self.db is None or self.db.closed:
            raise Unavailable("LevelDB is not open")
        self.db.get(b"H")

    # --- cached state ----------------------------------------------------------------------

    def head(self, log: str) -> tuple[int, int]:
        if log not in self.heads:
            raw = self.db.get(head_key(log))
            self.heads[log] = (from_u64(raw), from_u64(raw, 8)) if raw else (0, 0)
        return self.heads[log]

    def doc_version(self, ns: str, id_: str) -> int:
        if (ns, id_) not in self.versions:
            raw = self.db.get(current_key(ns, id_))
            self.versions[(ns, id_)] = from_u64(raw) if raw else 0
        return self.versions[(ns, id_)]

    # --- writes ----------------------------------------------------------------------------

    async def write(self, ops: Sequence[s.Op]) -> list[Any]:
        group = WriteGroup(self)
        results = stage_each(ops, lambda op: self.stage(group, op))
        try:
            group.batch.write()
        except plyvel.Error as exc:
            raise Unavailable(f"LevelDB write failed: {exc}") from exc
        self.heads.update(group.heads)
        self.versions.update(group.doc_versions)
        return results

    def stage(self, group: WriteGroup, op: s.Op) -> Any:
        batch = group.batch
        if isinstance(op, s.Put):
            batch.put(kv_key(op.ns, op.key), op.value)
        elif isinstance(op, s.Delete):
            batch.delete(kv_key(op.ns, op.key))
        elif isinstance(op, s.Batch):
            for inner in op.ops:
                self.stage(group, inner)
        elif isinstance(op, s.TsAppend):
            for point in op.points:
                batch.put(ts_key(op.ns, op.series, point.ts), point.value)
        elif isinstance(op, s.DocPut):
            current = group.doc_version(op.ns, op.id)
            if op.expected_version is not None and op.expected_version != current:
                raise Conflict(f"{op.ns}/{op.id} is at version {current}, "
                               f"not {op.expected_version}")
            version = current + 1
            batch.put(doc_prefix(op.ns, op.id) + u64(version), u64(now_ms()) + op.body)
            batch.put(current_key(op.ns, op.id), u64(version))
            group.doc_versions[(op.ns, op.id)] = version
            return version
        elif isinstance(op, s.LogAppend):
            next_offset, first = group.head(op.log)
            stamp = u64(now_ms())
            for i, record in enumerate(op.records):
                batch.put(log_key(op.log, next_offset + i), stamp + record)
            head = (next_offset + len(op.records), first)
            batch.put(head_key(op.log), u64(head[0]) + u64(head[1]))
            group.heads[op.log] = head
            return s.AppendResult(first_offset=next_offset, next_offset=head[0])
        elif isinstance(op, s.LogCommit):
            next_offset, _ = group.head(op.log)
            if op.offset > next_offset:
                raise BadRequest(f"offset {op.offset} is beyond the end of {op.log} "
                                 f"({next_offset})")
            batch.put(offset_key(op.group, op.log), u64(op.offset))
        else:
            raise BadRequest(f"{type(op).__name__} is not a write")
        return None

    # --- reads -----------------------------------------------------------------------------

    async def read(self, op: s.Op) -> Any:
        db = self.db
        if isinstance(op, s.Get):
            return db.get(kv_key(op.ns, op.key))
        if isinstance(op, s.Scan):
            return self.scan(op)
        if isinstance(op, s.TsRange):
            base = b"T" + _text(op.ns) + b"\0" + _text(op.series) + b"\0"
            it = db.iterator(start=base + u64(op.start + TS_BIAS),
                             stop=base + u64(op.end + TS_BIAS))
            return [s.Point(from_u64(k, len(base)) - TS_BIAS, v)
                    for k, v in islice(it, op.limit)]
        if isinstance(op, s.DocGet):
            version = op.version or self.doc_version(op.ns, op.id)
            raw = db.get(doc_prefix(op.ns, op.id) + u64(version)) if version else None
            if raw is None:
                raise NotFound(f"{op.ns}/{op.id}" + (f" version {op.version}" if op.version
                                                     else "") + " does not exist")
            return s.Document(op.id, version, raw[8:], from_u64(raw))
        if isinstance(op, s.DocHistory):
            prefix = doc_prefix(op.ns, op.id)
            it = db.iterator(prefix=prefix, reverse=True)
            return [s.Document(op.id, from_u64(k, len(prefix)), v[8:], from_u64(v))
                    for k, v in islice(it, op.limit)]
        if isinstance(op, s.DocList):
            return self.doc_list(op)
        if isinstance(op, s.LogRead):
            next_offset, first = self.head(op.log)
            start = max(op.offset, first)
            it = db.iterator(start=log_key(op.log, start), stop=log_key(op.log, next_offset))
            records = [s.LogRecord(from_u64(k, len(k) - 8), from_u64(v), v[8:])
                       for k, v in islice(it, op.max_records)]
            return s.LogReadResult(records, records[-1].offset + 1 if records else start)
        if isinstance(op, s.LogCommitted):
            raw = db.get(offset_key(op.group, op.log))
            return from_u64(raw) if raw else 0
        if isinstance(op, s.LogInfo):
            next_offset, first = self.head(op.log)
            return s.LogState(op.log, first, next_offset)
        if isinstance(op, s.Stats):
            return self.stats()
        raise BadRequest(f"{type(op).__name__} is not a read")

    def scan(self, op: s.Scan) -> s.ScanResult:
        base = kv_key(op.ns, b"")
        prefix = base + op.prefix
        start = prefix if op.cursor is None else max(prefix, base + op.cursor + b"\0")
        it = self.db.iterator(prefix=prefix) if op.cursor is None else \
            _prefixed(self.db.iterator(start=start), prefix)
        records = [s.Record(k[len(base):], v) for k, v in islice(it, op.limit + 1)]
        more = len(records) > op.limit
        records = records[:op.limit]
        return s.ScanResult(records, records[-1].key if more else None)

    def doc_list(self, op: s.DocList) -> s.DocListResult:
        base = b"d" + _text(op.ns) + b"\0"
        prefix = base + _text(op.prefix)
        start = prefix if op.cursor is None else max(prefix, base + _text(op.cursor) + b"\0")
        it = _prefixed(self.db.iterator(start=start), prefix)
        docs = []
        for k, v in islice(it, op.limit + 1):
            id_ = k[len(base):].decode()
            raw = self.db.get(doc_prefix(op.ns, id_) + v)
            docs.append(s.Document(id_, from_u64(v), raw[8:], from_u64(raw)))
        more = len(docs) > op.limit
        docs = docs[:op.limit]
        return s.DocListResult(docs, docs[-1].id if more else None)

    # --- maintenance -----------------------------------------------------------------------

    async def apply_retention(self, max_age_ms: int, max_records: int) -> int:
        dropped = 0
        cutoff = now_ms() - max_age_ms if max_age_ms else None
        for raw_key, _ in list(self.db.iterator(prefix=b"H")):
            log = raw_key[1:].decode()
            next_offset, first = self.head(log)
            new_first = first
            if max_records and next_offset - first > max_records:
                new_first = next_offset - max_records
            if cutoff is not None:
                for k, v in self.db.iterator(start=log_key(log, new_first),
                                             stop=log_key(log, next_offset)):
                    if from_u64(v) >= cutoff:
                        break
                    new_first = from_u64(k, len(k) - 8) + 1
            if new_first == first:
                continue
            with self.db.write_batch(sync=self.sync) as batch:
                for k in self.db.iterator(start=log_key(log, first),
                                          stop=log_key(log, new_first), include_value=False):
                    batch.delete(k)
                batch.put(head_key(log), u64(next_offset) + u64(new_first))
            self.heads[log] = (next_offset, new_first)
            dropped += new_first - first
        return dropped

    def backup(self, target: str) -> dict[str, Any]:
        """Copy a consistent snapshot into a new LevelDB at ``target`` (must not exist)."""
        if os.path.exists(target):
            raise BadRequest(f"{target} already exists")
        tmp = target + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        copied = 0
        out = plyvel.DB(tmp, create_if_missing=True, error_if_exists=True)
        try:
            with self.db.snapshot() as snap:
                batch = out.write_batch()
                for k, v in snap.iterator():
                    batch.put(k, v)
                    copied += 1
                    if copied % 10_000 == 0:
                        batch.write()
                        batch = out.write_batch()
                batch.write()
        finally:
            out.close()
        os.rename(tmp, target)
        return {"path": target, "keys": copied}

    def stats(self) -> dict[str, Any]:
        return {"backend": self.name, "path": self.path, "sync": self.sync,
                "logs": {log: {"first_offset": f, "next_offset": n}
                         for log, (n, f) in self.heads.items()}}


def _prefixed(it: Iterator, prefix: bytes) -> Iterator:
    for k, v in it:
        if not k.startswith(prefix):
            break
        yield k, v


def restore(source: str, target: str) -> int:
    """Replace the LevelDB at ``target`` with a backup (the daemon must be stopped)."""
    src = plyvel.DB(source)
    tmp = target + ".restoring"
    shutil.rmtree(tmp, ignore_errors=True)
    out = plyvel.DB(tmp, create_if_missing=True, error_if_exists=True)
    copied = 0
    try:
        batch = out.write_batch()
        for k, v in src.iterator():
            batch.put(k, v)
            copied += 1
        batch.write()
    finally:
        out.close()
        src.close()
    if os.path.exists(target):
        shutil.rmtree(target)
    os.rename(tmp, target)
    return copied
