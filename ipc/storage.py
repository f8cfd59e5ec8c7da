"""The storage API: every operation other workers may ask of the storage worker.

Requests travel over the storage worker's own ROUTER socket (``storage.sock`` in the runtime
directory), msgpack-encoded, each in an envelope ``StorageRequest{v, id, op}`` answered by
``StorageReply{v, id, ok, result, error}``. Clients pipeline: many requests may be in flight on
one socket, matched by id. Values are opaque bytes; callers encode their own Structs.
"""
from __future__ import annotations

import enum
from typing import Any

import msgspec
from msgspec import Struct

from ipc.messages import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError

STORAGE_SOCKET = "storage.sock"
MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 512 * 1024
MAX_SCAN_LIMIT = 10_000
MAX_LOG_READ = 10_000
MAX_WAIT_MS = 30_000

# Namespaces of key/value records, document collections and time series that the product uses.
# A request naming anything else is refused (UNKNOWN_NAMESPACE), so that a typo cannot silently
# create a new space.
NAMESPACES = frozenset({
    "state", "optimizations", "configs", "findings", "rollouts", "api_keys", "integrations",
    "outbox", "jobs", "flags", "windows", "dedup", "test",
})


class StorageErrorCode(enum.IntEnum):
    BAD_REQUEST = 1
    UNKNOWN_NAMESPACE = 2
    NOT_FOUND = 3
    CONFLICT = 4
    TOO_LARGE = 5
    UNAVAILABLE = 6
    TIMEOUT = 7
    INTERNAL = 8


class StorageFailure(Exception):
    """An operation the storage worker refused or could not do; raised by clients too."""

    code = StorageErrorCode.INTERNAL


class BadRequest(StorageFailure):
    code = StorageErrorCode.BAD_REQUEST


class UnknownNamespace(StorageFailure):
    code = StorageErrorCode.UNKNOWN_NAMESPACE


class NotFound(StorageFailure):
    code = StorageErrorCode.NOT_FOUND


class Conflict(StorageFailure):
    code = StorageErrorCode.CONFLICT


class TooLarge(StorageFailure):
    code = StorageErrorCode.TOO_LARGE


class Unavailable(StorageFailure):
    code = StorageErrorCode.UNAVAILABLE


class StorageTimeout(StorageFailure):
    code = StorageErrorCode.TIMEOUT


FAILURES = {cls.code: cls for cls in (StorageFailure, BadRequest, UnknownNamespace, NotFound,
                                      Conflict, TooLarge, Unavailable, StorageTimeout)}


class Op(Struct, tag_field="op", kw_only=True, forbid_unknown_fields=True):
    """Base of every operation."""


# --- key/value records -----------------------------------------------------------------------

class Get(Op, tag="get"):
    ns: str
    key: bytes


class Put(Op, tag="put"):
    ns: str
    key: bytes
    value: bytes


class Delete(Op, tag="delete"):
    ns: str
    key: bytes


class Scan(Op, tag="scan"):
    """Records whose key starts with ``prefix``, in key order, after ``cursor`` if given."""

    ns: str
    prefix: bytes = b""
    limit: int = 100
    cursor: bytes | None = None


class Batch(Op, tag="batch"):
    """Puts and deletes applied atomically: all or none."""

    ops: list[Put | Delete]


# --- time series -----------------------------------------------------------------------------

class Point(Struct, array_like=True):
    ts: int  # milliseconds since the epoch; one value per (series, ts)
    value: bytes


class TsAppend(Op, tag="ts_append"):
    ns: str
    series: str
    points: list[Point]


class TsRange(Op, tag="ts_range"):
    """Points with start <= ts < end, oldest first."""

    ns: str
    series: str
    start: int
    end: int
    limit: int = 10_000


# --- versioned documents ---------------------------------------------------------------------

class DocPut(Op, tag="doc_put"):
    """Store a new version; with ``expected_version`` only if that is the current one (0: the
    document must not exist yet). Returns the new version number."""

    ns: str
    id: str
    body: bytes
    expected_version: int | None = None


class DocGet(Op, tag="doc_get"):
    """The current version, or the given one."""

    ns: str
    id: str
    version: int | None = None


class DocHistory(Op, tag="doc_history"):
    """Versions of a document, newest first."""

    ns: str
    id: str
    limit: int = 100


class DocList(Op, tag="doc_list"):
    """Current versions of documents whose id starts with ``prefix``, in id order."""

    ns: str
    prefix: str = ""
    limit: int = 100
    cursor: str | None = None


# --- event log and consumer offsets ----------------------------------------------------------

class LogAppend(Op, tag="log_append"):
    """Append records durably; returns the offsets they got (monotonic, gap-free)."""

    log: str
    records: list[bytes]


class LogRead(Op, tag="log_read"):
    """Records from ``offset`` on. With ``wait_ms``, a read that finds nothing waits up to that
    long for an append instead of answering empty at once (long poll)."""

    log: str
    offset: int
    max_records: int = 500
    wait_ms: int = 0


class LogCommit(Op, tag="log_commit"):
    """Record that consumer ``group`` has processed everything before ``offset``."""

    group: str
    log: str
    offset: int


class LogCommitted(Op, tag="log_committed"):
    group: str
    log: str


class LogInfo(Op, tag="log_info"):
    log: str


class Stats(Op, tag="stats"):
    pass


AnyOp = (Get | Put | Delete | Scan | Batch | TsAppend | TsRange | DocPut | DocGet | DocHistory
         | DocList | LogAppend | LogRead | LogCommit | LogCommitted | LogInfo | Stats)
WRITE_OPS = (Put, Delete, Batch, TsAppend, DocPut, LogAppend, LogCommit)


# --- results ---------------------------------------------------------------------------------

class Record(Struct, array_like=True):
    key: bytes
    value: bytes


class ScanResult(Struct):
    records: list[Record]
    next_cursor: bytes | None


class Document(Struct):
    id: str
    version: int
    body: bytes
    created_ms: int


class DocListResult(Struct):
    documents: list[Document]
    next_cursor: str | None


class LogRecord(Struct, array_like=True):
    offset: int
    appended_ms: int
    payload: bytes


class AppendResult(Struct):
    first_offset: int
    next_offset: int


class LogReadResult(Struct):
    records: list[LogRecord]
    next_offset: int


class LogState(Struct):
    log: str
    first_offset: int  # oldest offset still kept (retention)
    next_offset: int   # offset the next append gets


# --- envelope --------------------------------------------------------------------------------

class StorageRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """``trace``: the caller's W3C traceparent, set only when tracing is on and the caller is
    in a sampled span; the storage worker then records the request as a child span."""

    id: int
    op: AnyOp
    v: int = PROTOCOL_VERSION
    trace: str | None = None


class StorageError(Struct):
    code: StorageErrorCode
    message: str


class StorageReply(Struct, kw_only=True):
    id: int
    ok: bool
    result: Any = None
    error: StorageError | None = None
    v: int = PROTOCOL_VERSION


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(StorageRequest)
_reply_decoder = msgspec.msgpack.Decoder(StorageReply)


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def decode_request(frame: bytes) -> StorageRequest:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"request of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        request = _request_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed storage request: {exc}") from None
    if request.v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {request.v}")
    return request


def decode_reply(frame: bytes) -> StorageReply:
    try:
        return _reply_decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed storage reply: {exc}") from None


def result_as(reply: StorageReply, kind: Any) -> Any:
    """A reply's result converted to the type the operation returns."""
    return msgspec.convert(reply.result, kind) if kind is not None else reply.result


RESULT_TYPES: dict[type, Any] = {
    Get: bytes | None, Put: None, Delete: None, Scan: ScanResult, Batch: None,
    TsAppend: None, TsRange: list[Point], DocPut: int, DocGet: Document,
    DocHistory: list[Document], DocList: DocListResult, LogAppend: AppendResult,
    LogRead: LogReadResult, LogCommit: None, LogCommitted: int, LogInfo: LogState,
    Stats: dict[str, Any],
}
