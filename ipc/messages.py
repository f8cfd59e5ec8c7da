"""Every message between optimizerd's processes, and the one codec for them.

Messages are msgspec Structs in tagged unions, encoded with msgpack. The envelope (protocol
version ``v``, request ``id``, ``type`` tag) is kept apart from the payload (``body``/``result``),
so a payload field can never overwrite the envelope. ``decode_*`` raises ``ProtocolError`` for
anything unknown, malformed, truncated, oversized or of another protocol version; callers log it
and drop the frame, never die of it.
"""
from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec
from msgspec import Struct, field

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
# A worker that hears nothing from the supervisor for max(3 * heartbeat_timeout, this) exits;
# the supervisor acknowledges heartbeats often enough for the shortest of those.
MIN_SILENCE_TIMEOUT = 10.0
Health = Literal["ok", "degraded", "unhealthy"]


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


class ErrorCode(enum.IntEnum):
    """Stable error codes of control replies; scripts may rely on the numbers."""

    BAD_REQUEST = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_COMMAND = 3
    NO_SUCH_SERVICE = 4
    CONFIG_INVALID = 5
    BUSY = 6
    WORKER_UNAVAILABLE = 7
    TIMEOUT = 8
    INTERNAL = 9


class Message(Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    v: int = PROTOCOL_VERSION


# --- worker -> supervisor (workers.sock) ---------------------------------------------------

class Hello(Message, tag="hello"):
    """First message of a worker process; ``token`` names this very start of it."""

    service: str
    instance: int
    pid: int
    token: str


class Ready(Message, tag="ready"):
    token: str


class Heartbeat(Message, tag="heartbeat"):
    token: str
    seq: int
    health: Health = "ok"
    reason: str = ""
    status: dict[str, Any] = field(default_factory=dict)


class ReloadResult(Message, tag="reload_result"):
    """Answer to Reload: applied live, or a restart is needed to apply it."""

    token: str
    applied: bool
    reason: str = ""


class RestartRequest(Message, tag="restart_request"):
    """A worker asking to be restarted (e.g. after an unrecoverable internal error)."""

    token: str
    reason: str


class AdminReply(Message, tag="admin_reply"):
    token: str
    request_id: int
    ok: bool
    result: Any = None
    error: str = ""


# --- supervisor -> worker ------------------------------------------------------------------

class HeartbeatAck(Message, tag="heartbeat_ack"):
    seq: int


class Reload(Message, tag="reload"):
    config: dict[str, Any]


class Stop(Message, tag="stop"):
    deadline_s: float


class AdminCall(Message, tag="admin_call"):
    """``trace``: the caller's W3C traceparent when tracing is on, so the command's span joins
    the caller's trace (``body["trace"]`` of the control request, passed through)."""

    request_id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    trace: str | None = None


# --- optimizerctl <-> supervisor (control.sock) --------------------------------------------

class Request(Message, tag="request"):
    id: int
    command: str
    body: dict[str, Any] = field(default_factory=dict)


class ErrorInfo(Struct, forbid_unknown_fields=True):
    code: ErrorCode
    message: str


class Reply(Message, tag="reply"):
    id: int
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None


class WorkerSpec(Struct, kw_only=True):
    """Everything a worker process is told at its start (handed over by the fork server)."""

    service: str
    instance: int
    token: str
    entrypoint: str
    runtime_dir: str
    data_dir: str
    config: dict[str, Any]
    supervisor_pid: int


def encode_spec(spec: WorkerSpec) -> bytes:
    return _encoder.encode(spec)


def decode_spec(data: bytes) -> WorkerSpec:
    return msgspec.msgpack.decode(data, type=WorkerSpec)


WorkerMessage = Hello | Ready | Heartbeat | ReloadResult | RestartRequest | AdminReply
SupervisorMessage = HeartbeatAck | Reload | Stop | AdminCall

_encoder = msgspec.msgpack.Encoder()
_decoders = {
    "worker": msgspec.msgpack.Decoder(WorkerMessage),
    "supervisor": msgspec.msgpack.Decoder(SupervisorMessage),
    "request": msgspec.msgpack.Decoder(Request),
    "reply": msgspec.msgpack.Decoder(Reply),
}
_version_probe = msgspec.msgpack.Decoder(dict[str, Any])


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def _decode(kind: str, frame: bytes) -> Any:
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return _decoders[kind].decode(frame)
    except msgspec.DecodeError as exc:
        version = protocol_version_of(frame)
        if version is not None and version != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {version} "
                                f"(this side speaks {PROTOCOL_VERSION})") from None
        raise ProtocolError(f"malformed {kind} message: {exc}") from None


def protocol_version_of(frame: bytes) -> int | None:
    """The ``v`` of a frame that is a map with one, else None."""
    try:
        version = _version_probe.decode(frame).get("v")
    except msgspec.DecodeError:
        return None
    return version if isinstance(version, int) else None


def decode_worker_message(frame: bytes) -> WorkerMessage:
    return _checked(_decode("worker", frame))


def decode_supervisor_message(frame: bytes) -> SupervisorMessage:
    return _checked(_decode("supervisor", frame))


def decode_request(frame: bytes) -> Request:
    return _checked(_decode("request", frame))


def decode_reply(frame: bytes) -> Reply:
    return _checked(_decode("reply", frame))


def _checked(message: Any) -> Any:
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {message.v} "
                            f"(this side speaks {PROTOCOL_VERSION})")
    return message


def error_reply(request_id: int, code: ErrorCode, message: str) -> Reply:
    return Reply(id=request_id, ok=False, error=ErrorInfo(code=code, message=message))
