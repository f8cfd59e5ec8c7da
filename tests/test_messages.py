"""The message codec: every message round-trips; anything else is a ProtocolError."""
from __future__ import annotations

import os
import random

import msgspec
import pytest

from ipc import messages as m

WORKER_MESSAGES = [
    m.Hello(service="storage", instance=1, pid=1234, token="t" * 32),
    m.Ready(token="tok"),
    m.Heartbeat(token="tok", seq=7, health="degraded", reason="slow disk",
                status={"queue": 3, "nested": {"a": [1, 2.5, "x", None, True]}}),
    m.Heartbeat(token="tok", seq=1),
    m.ReloadResult(token="tok", applied=False, reason="needs a restart"),
    m.RestartRequest(token="tok", reason="wedged"),
    m.AdminReply(token="tok", request_id=5, ok=True, result={"keys": 3}),
    m.AdminReply(token="tok", request_id=6, ok=False, error="no such command"),
]
SUPERVISOR_MESSAGES = [
    m.HeartbeatAck(seq=7),
    m.Reload(config={"supervisor": {"heartbeat_interval": 0.2}}),
    m.Stop(deadline_s=2.5),
    m.AdminCall(request_id=9, command="info", args={"verbose": "1"}),
]
REQUESTS = [m.Request(id=1, command="status"),
            m.Request(id=2, command="restart", body={"service": "storage"})]
REPLIES = [m.Reply(id=1, ok=True, result={"supervisor": {"pid": 1}, "services": []}),
           m.error_reply(2, m.ErrorCode.NO_SUCH_SERVICE, "no service 'x'")]
DECODERS = [m.decode_worker_message, m.decode_supervisor_message, m.decode_request,
            m.decode_reply]


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=lambda x: type(x).__name__)
def test_worker_messages_round_trip(message):
    assert m.decode_worker_message(m.encode(message)) == message


@pytest.mark.parametrize("message", SUPERVISOR_MESSAGES, ids=lambda x: type(x).__name__)
def test_supervisor_messages_round_trip(message):
    assert m.decode_supervisor_message(m.encode(message)) == message


def test_control_messages_round_trip():
    for request in REQUESTS:
        assert m.decode_request(m.encode(request)) == request
    for reply in REPLIES:
        decoded = m.decode_reply(m.encode(reply))
        assert decoded == reply
    assert m.decode_reply(m.encode(REPLIES[1])).error.code is m.ErrorCode.NO_SUCH_SERVICE


def test_spec_round_trips():
    spec = m.WorkerSpec(service="a", instance=0, token="t", entrypoint="x:Y", runtime_dir="/r",
                        data_dir="/d", config={"k": [1]}, supervisor_pid=1)
    assert m.decode_spec(m.encode_spec(spec)) == spec


def test_envelope_is_apart_from_payload():
    """A payload key named like an envelope field cannot overwrite the envelope."""
    request = m.Request(id=3, command="call", body={"id": 99, "type": "reply", "v": 7,
                                                    "command": "stop"})
    decoded = m.decode_request(m.encode(request))
    assert (decoded.id, decoded.command, decoded.v) == (3, "call", m.PROTOCOL_VERSION)
    assert decoded.body == {"id": 99, "type": "reply", "v": 7, "command": "stop"}


def test_error_codes_are_stable_numbers():
    assert {c.name: c.value for c in m.ErrorCode} == {
        "BAD_REQUEST": 1, "UNSUPPORTED_VERSION": 2, "UNKNOWN_COMMAND": 3, "NO_SUCH_SERVICE": 4,
        "CONFIG_INVALID": 5, "BUSY": 6, "WORKER_UNAVAILABLE": 7, "TIMEOUT": 8, "INTERNAL": 9}


def _garbage() -> list[bytes]:
    rng = random.Random(1234)
    frames = [b"", b"\x00", b"\xc1", b"\xff" * 7, b"\x92\x01", b"not msgpack at all",
              msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode("hello"),
              msgspec.msgpack.encode({"type": "nonsense", "v": 1}),
              msgspec.msgpack.encode({"v": 1}),
              msgspec.msgpack.encode({"type": "ready", "v": 1}),  # no token
              msgspec.msgpack.encode({"type": "ready", "v": 1, "token": 5}),  # wrong type
              msgspec.msgpack.encode({"type": "ready", "v": 1, "token": "t", "extra": 1})]
    frames += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(200)]
    return frames


@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
def test_garbage_raises_protocol_error_only(decode):
    for frame in _garbage():
        try:
            decode(frame)
        except m.ProtocolError:
            continue
        # A random frame may happen to be a valid message; it must then be a real one.
        assert frame and isinstance(decode(frame), m.Message)


def test_messages_of_the_wrong_direction_are_refused():
    with pytest.raises(m.ProtocolError):
        m.decode_worker_message(m.encode(m.Stop(deadline_s=1.0)))
    with pytest.raises(m.ProtocolError):
        m.decode_supervisor_message(m.encode(m.Ready(token="t")))
    with pytest.raises(m.ProtocolError):
        m.decode_request(m.encode(REPLIES[0]))
    with pytest.raises(m.ProtocolError):
        m.decode_reply(m.encode(REQUESTS[0]))


@pytest.mark.parametrize("message", WORKER_MESSAGES + SUPERVISOR_MESSAGES + REQUESTS + REPLIES,
                         ids=lambda x: type(x).__name__)
def test_every_truncation_is_refused(message):
    frame = m.encode(message)
    decode = next(d for d in DECODERS if _decodes(d, frame))
    for cut in range(len(frame)):
        with pytest.raises(m.ProtocolError):
            decode(frame[:cut])


def _decodes(decode, frame: bytes) -> bool:
    try:
        decode(frame)
        return True
    except m.ProtocolError:
        return False


def test_oversized_frames_are_refused_before_decoding():
    big = m.encode(m.Heartbeat(token="t", seq=1, status={"blob": "x" * m.MAX_MESSAGE_BYTES}))
    assert len(big) > m.MAX_MESSAGE_BYTES
    for decode in DECODERS:
        with pytest.raises(m.ProtocolError, match="exceeds"):
            decode(big)
    with pytest.raises(m.ProtocolError, match="exceeds"):
        m.decode_request(os.urandom(2_000_000))
    just_fits = m.encode(m.Heartbeat(token="t", seq=1,
                                     status={"blob": "x" * (m.MAX_MESSAGE_BYTES - 100)}))
    assert len(just_fits) <= m.MAX_MESSAGE_BYTES
    assert m.decode_worker_message(just_fits).seq == 1


@pytest.mark.parametrize("message,decode", [
    (m.Ready(token="t"), m.decode_worker_message),
    (m.Heartbeat(token="t", seq=1), m.decode_worker_message),
    (m.Stop(deadline_s=1.0), m.decode_supervisor_message),
    (REQUESTS[1], m.decode_request),
    (REPLIES[0], m.decode_reply),
], ids=lambda x: getattr(x, "__name__", type(x).__name__))
def test_other_protocol_versions_are_refused_by_name(message, decode):
    for version in (0, 2, 99):
        frame = m.encode(msgspec.structs.replace(message, v=version))
        with pytest.raises(m.ProtocolError, match=f"unsupported protocol version {version}"):
            decode(frame)
    # A future version with fields this side does not know is still named as a version error.
    doc = msgspec.msgpack.decode(m.encode(message))
    doc.update(v=2, new_field=[1, 2])
    with pytest.raises(m.ProtocolError, match="unsupported protocol version 2"):
        decode(msgspec.msgpack.encode(doc))
    assert m.protocol_version_of(m.encode(message)) == m.PROTOCOL_VERSION
    assert m.protocol_version_of(b"\xc1") is None
