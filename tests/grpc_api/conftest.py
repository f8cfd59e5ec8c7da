"""A running optimizerd with the gRPC API (and the REST API beside it, to compare), shared by the
module that asks for ``grpc_daemon``; API keys per role; channels and call metadata."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import Daemon

SECRET = "s" * 48
ISSUER = "https://issuer.test"
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60,
             "decisions": {"min_samples": 50},
             "canary": {"min_samples": 10, "promote_min_samples": 20, "stages": [50.0, 100.0]}}


class GrpcDaemon:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.target = daemon.doc["grpc_api"]["listen"]
        self.rest_base = f"http://{daemon.doc['rest_api']['listen']}"
        self.collector = f"http://{daemon.doc['collector']['listen']}/v1/events"
        self.keys = {role: create_key(daemon, role) for role in ("viewer", "operator", "admin")}

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def aio_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target)

    def auth(self, role: str = "admin") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[role]}"),)

    def ctl(self, *args: str) -> Any:
        return self.daemon.ctl(*args)

    def rest(self, method: str, path: str, role: str = "viewer", body: Any = None,
             key: str | None = None) -> tuple[int, Any]:
        """(status, JSON) of a REST call with ``role``'s key (or ``key``), to compare."""
        request = urllib.request.Request(
            self.rest_base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key or self.keys[role]}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def pid_of(self, service: str) -> int:
        status = json.loads(self.ctl("status", "--json").stdout)
        [entry] = [s for s in status["services"] if s["name"] == service]
        return int(entry["pid"])


def failure(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The error a call must end with."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def details_of(err: grpc.RpcError, kind: type) -> list[Any]:
    """The google.rpc details of type ``kind`` an error carries."""
    status = rpc_status.from_call(err)
    found = []
    for detail in status.details if status else []:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


def violations(err: grpc.RpcError) -> list[str]:
    """The fields an INVALID_ARGUMENT names in its BadRequest detail."""
    return [v.field for bad in details_of(err, error_details_pb2.BadRequest)
            for v in bad.field_violations]


def create_key(daemon: Daemon, role: str) -> str:
    result = daemon.ctl("api-key", "create", "--role", role, "--name", f"grpc-{role}")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def start_daemon(grpc_api: dict[str, Any] | None = None, **rest: Any) -> Daemon:
    # backoff_base: a crashed processor stays down long enough to be seen down
    d = Daemon(builtins=["storage", "collector", "processor", "rest_api", "grpc_api"],
               extra={"processor": {**PROCESSOR, "backoff_base": 3.0}})
    secret = Path(d.dir) / "jwt.secret"
    secret.write_text(SECRET)
    d.doc["rest_api"].update({"rate_limit_per_s": 200.0, "rate_limit_burst": 400,
                              "jwt": {"issuer": ISSUER, "audience": "llm-optimizer",
                                      "secret_file": str(secret), "max_ttl_s": 3600},
                              **rest})
    d.doc["grpc_api"].update(grpc_api or {})
    d.write_config()
    try:
        d.start(timeout=60)
    except BaseException:
        d.cleanup()
        raise
    return d


@pytest.fixture(scope="module")
def grpc_daemon() -> Iterator[GrpcDaemon]:
    d = start_daemon()
    try:
        yield GrpcDaemon(d)
    finally:
        d.cleanup()
