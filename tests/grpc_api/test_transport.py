"""The gRPC API's transport over real connections to a running optimizerd: the standard health
service in step with the supervisor, reflection, credentials (API keys, JWTs: expired, forged,
wrong audience), roles, the shared rate limit with RetryInfo, request ids, message size limits,
deadlines, metrics; and TLS, mutual TLS with roles from the certificate, and certificates
read again on reload."""
from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import grpc
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos.llm_optimizer.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    optimization_pb2,
    optimization_pb2_grpc,
)
from tests.conftest import wait_until

from .conftest import GrpcDaemon, ISSUER, SECRET, details_of, failure, start_daemon

pytestmark = pytest.mark.timeout(180)
SERVICES = ("OptimizationService", "ConfigService", "MetricsService", "IntegrationService",
            "HealthService", "AdminService")


def token(claims: dict, secret: str = SECRET) -> str:
    now = int(time.time())
    return pyjwt.encode({"iss": ISSUER, "aud": "llm-optimizer", "sub": "carol",
                         "role": "admin", "iat": now, "exp": now + 600, **claims},
                        secret, algorithm="HS256")






def test_standard_health_follows_the_supervisor_and_needs_no_credential(grpc_daemon):
    health = health_pb2_grpc.HealthStub(grpc_daemon.channel())

    def status(name: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=name)).status

    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: status("llm_optimizer.v1.OptimizationService") == serving, timeout=20,
               message="the API services SERVING")
    assert status("") == serving and status("processor") == serving
    err = failure(health.Check, health_pb2.HealthCheckRequest(service="no-such"))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    os.kill(grpc_daemon.pid_of("processor"), signal.SIGKILL)  # restarted after 3 s backoff
    wait_until(lambda: status("processor") != serving, timeout=20,
               message="processor NOT_SERVING once killed")
    assert status("llm_optimizer.v1.OptimizationService") != serving
    wait_until(lambda: status("llm_optimizer.v1.OptimizationService") == serving, timeout=30,
               message="SERVING again after the restart")


def test_reflection_lists_every_service_without_credentials(grpc_daemon):
    database = ProtoReflectionDescriptorDatabase(grpc_daemon.channel())
    names = set(database.get_services())
    assert {f"llm_optimizer.v1.{name}" for name in SERVICES} <= names
    assert "grpc.health.v1.Health" in names
    described = database.FindFileContainingSymbol("llm_optimizer.v1.OptimizationService")
    assert described.name == "llm_optimizer/v1/optimization.proto"


def test_credentials_roles_and_request_ids(grpc_daemon):
    admin = admin_pb2_grpc.AdminServiceStub(grpc_daemon.channel())
    request = admin_pb2.ListFeatureFlagsRequest()
    err = failure(admin.ListFeatureFlags, request)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    for bad in ("llmo_notarealkey", token({"exp": int(time.time()) - 600}),
                token({}, secret="t" * 48), token({"aud": "someone-else"})):
        err = failure(admin.ListFeatureFlags, request,
                      metadata=(("authorization", f"Bearer {bad}"),))
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED, bad
    err = failure(admin.ListFeatureFlags, request, metadata=grpc_daemon.auth("operator"))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    made = [value for key, value in err.trailing_metadata() if key == "x-request-id"]
    assert len(made) == 1 and len(made[0]) == 24, made  # a new id, for the server log
    [info] = details_of(err, error_details_pb2.ErrorInfo)
    assert info.domain == "llm-optimizer"
    answer, call = admin.ListFeatureFlags.with_call(
        request, metadata=(("authorization", f"Bearer {token({})}"),
                           ("x-request-id", "trace-42")))
    assert {f.name for f in answer.flags} >= {"rollouts", "proposals"}
    assert ("x-request-id", "trace-42") in tuple(call.trailing_metadata())
    answer = admin.ListFeatureFlags(request,
                                    metadata=(("x-api-key", grpc_daemon.keys["admin"]),))
    assert answer.flags


def test_invalid_argument_names_the_field(grpc_daemon):
    optimizations = optimization_pb2_grpc.OptimizationServiceStub(grpc_daemon.channel())
    err = failure(optimizations.GetOptimization,
                  optimization_pb2.GetOptimizationRequest(id="../etc/passwd"),
                  metadata=grpc_daemon.auth("viewer"))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    [bad] = details_of(err, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "id"


def test_message_size_limit_and_deadlines(grpc_daemon):
    channel = grpc_daemon.channel()
    optimizations = optimization_pb2_grpc.OptimizationServiceStub(channel)
    huge = optimization_pb2.GetOptimizationRequest(id="p." + "0" * (5 << 20))
    err = failure(optimizations.GetOptimization, huge, metadata=grpc_daemon.auth("viewer"))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    stream = optimizations.SubscribeOptimizationEvents(
        optimization_pb2.SubscribeOptimizationEventsRequest(), timeout=1.0,
        metadata=grpc_daemon.auth("viewer"))
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_metrics_count_rpcs_by_method_and_code(grpc_daemon):
    admin = admin_pb2_grpc.AdminServiceStub(grpc_daemon.channel())
    admin.ListFeatureFlags(admin_pb2.ListFeatureFlagsRequest(), metadata=grpc_daemon.auth())
    failure(admin.ListFeatureFlags, admin_pb2.ListFeatureFlagsRequest())
    method = "/llm_optimizer.v1.AdminService/ListFeatureFlags"
    text = wait_until(lambda: (lambda t: t if f'method="{method}"' in t else None)(
        scraped(grpc_daemon)), timeout=20, message="the gRPC series in the aggregate metrics")
    assert f'grpc_api_rpcs_total{{code="OK",method="{method}"}}' in text
    assert f'grpc_api_rpcs_total{{code="UNAUTHENTICATED",method="{method}"}}' in text
    assert "grpc_api_rpc_seconds_bucket" in text and "grpc_api_active_streams" in text


def scraped(grpc_daemon) -> str:
    """The supervisor's aggregate /metrics."""
    with urllib.request.urlopen(grpc_daemon.daemon.admin_url("/metrics"), timeout=10) as r:
        return r.read().decode()


def active_streams(grpc_daemon) -> float:
    [value] = [float(line.split()[-1]) for line in scraped(grpc_daemon).splitlines()
               if line.startswith("grpc_api_active_streams ")]
    return value


def test_active_streams_count_open_streams_until_they_end(grpc_daemon):
    optimizations = optimization_pb2_grpc.OptimizationServiceStub(grpc_daemon.channel())
    wait_until(lambda: active_streams(grpc_daemon) == 0, timeout=20,
               message="the streams of earlier tests ended")
    streams = [optimizations.SubscribeOptimizationEvents(
        optimization_pb2.SubscribeOptimizationEventsRequest(), timeout=60,
        metadata=grpc_daemon.auth("viewer")) for _ in range(2)]
    wait_until(lambda: active_streams(grpc_daemon) == 2, timeout=20,
               message="two open streams counted")
    streams[0].cancel()  # the client goes away
    wait_until(lambda: active_streams(grpc_daemon) == 1, timeout=20,
               message="a cancelled stream no longer counted")
    refused = optimizations.SubscribeOptimizationEvents(  # no credential: ends at once
        optimization_pb2.SubscribeOptimizationEventsRequest(), timeout=60)
    with pytest.raises(grpc.RpcError) as caught:
        next(refused)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    streams[1].cancel()
    wait_until(lambda: active_streams(grpc_daemon) == 0, timeout=20,
               message="no stream counted once all ended")


def test_rate_limit_is_resource_exhausted_with_retry_info():
    d = start_daemon(rate_limit_per_s=1.0, rate_limit_burst=3)
    try:
        api = GrpcDaemon(d)
        admin = admin_pb2_grpc.AdminServiceStub(api.channel())
        codes = []
        for _ in range(10):
            try:
                admin.ListFeatureFlags(admin_pb2.ListFeatureFlagsRequest(),
                                       metadata=api.auth())
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
                if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    [retry] = details_of(err, error_details_pb2.RetryInfo)
                    assert retry.retry_delay.seconds >= 1
        assert codes[:3] == ["OK"] * 3 and "RESOURCE_EXHAUSTED" in codes
    finally:
        d.cleanup()


# --- TLS ---------------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer_key, issuer_name, key=None, ca: bool = False,
           localhost: bool = False):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if localhost:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address(
                "127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _pem(key=None, cert=None) -> bytes:
    if cert is not None:
        return cert.public_bytes(serialization.Encoding.PEM)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Pki:
    """A CA, a server certificate for 127.0.0.1 and client certificates, as PEM files."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key, self.ca = _issue("test CA", None, _name("test CA"), ca=True)
        self.write("ca.pem", _pem(cert=self.ca))
        self.server("server")

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def server(self, tag: str) -> x509.Certificate:
        key, cert = _issue(f"optimizerd {tag}", self.ca_key, self.ca.subject, localhost=True)
        self.write("server.key", _pem(key))
        self.write("server.pem", _pem(cert=cert))
        return cert

    def client(self, cn: str) -> tuple[bytes, bytes]:
        key, cert = _issue(cn, self.ca_key, self.ca.subject)
        return _pem(key), _pem(cert=cert)


def _served_certificate(target: str, client: tuple[bytes, bytes] | None, pki: Pki
                        ) -> tuple[str, x509.Certificate]:
    """(TLS version, server certificate) of a fresh handshake, as a plain TLS client sees."""
    host, port = target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        key = pki.write("client.key", client[0])
        cert = pki.write("client.pem", client[1])
        context.load_cert_chain(cert, key)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
        return tls.version() or "", x509.load_der_x509_certificate(der)


def test_mutual_tls_roles_from_the_certificate_and_renewal(tmp_path):
    pki = Pki(tmp_path)
    d = start_daemon(grpc_api={"tls": {
        "cert_file": str(tmp_path / "server.pem"), "key_file": str(tmp_path / "server.key"),
        "client_ca_file": str(tmp_path / "ca.pem"), "client_roles": {"ci-bot": "admin"}}})
    try:
        target = d.doc["grpc_api"]["listen"]
        bot = pki.client("ci-bot")

        def channel(client: tuple[bytes, bytes] | None) -> grpc.Channel:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=(tmp_path / "ca.pem").read_bytes(),
                private_key=client[0] if client else None,
                certificate_chain=client[1] if client else None)
            return grpc.secure_channel(target, credentials)

        request = admin_pb2.ListFeatureFlagsRequest()
        flags = admin_pb2_grpc.AdminServiceStub(channel(bot)).ListFeatureFlags(request,
                                                                               timeout=10)
        assert flags.flags  # ci-bot is admin by its certificate alone
        err = failure(admin_pb2_grpc.AdminServiceStub(channel(pki.client("intern")))
                      .ListFeatureFlags, request, timeout=10)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED  # unlisted names are viewers
        err = failure(admin_pb2_grpc.AdminServiceStub(channel(None)).ListFeatureFlags,
                      request, timeout=10)
        assert err.code() is grpc.StatusCode.UNAVAILABLE  # no client certificate, no handshake
        version, before = _served_certificate(target, bot, pki)
        assert version == "TLSv1.3"
        renewed = pki.server("renewed")  # written over the served files, as renewals do
        wait_until(lambda: _served_certificate(target, bot, pki)[1].serial_number
                   == renewed.serial_number, timeout=20,
                   message="the renewed certificate served to a new connection")
        assert before.serial_number != renewed.serial_number
        flags = admin_pb2_grpc.AdminServiceStub(channel(bot)).ListFeatureFlags(request,
                                                                               timeout=10)
        assert flags.flags
    finally:
        d.cleanup()
