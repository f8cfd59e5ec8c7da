"""Server TLS from ``[grpc_api.tls]``: certificate and key files, and with ``client_ca_file``
mutual TLS (every client must show a certificate that chains to it).

The credentials are dynamic: gRPC asks ``Certificates.fetch`` at each new handshake, which
looks at the files' size and modification time. Renewed certificates written over the old
files are served to the next connection, without a restart or a reload; open connections go
on with the old ones. A config reload that names other files applies them the same way. Files
that cannot be used (half written, not PEM) keep the served certificates, with an error logged.
gRPC negotiates TLS 1.3 with clients that offer it (grpcio exposes no setting for the minimum
version).
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from ipc.config import GrpcTlsSection

log = logging.getLogger("workers.grpc_api")


class TlsConfigError(ValueError):
    pass


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"[grpc_api.tls] {key} = {path!r}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"[grpc_api.tls] {key} = {path!r} is not PEM")
    return data


def _stamp(section: GrpcTlsSection) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in (section.cert_file, section.key_file, section.client_ca_file):
        try:
            info = os.stat(path) if path else None
        except OSError:
            info = None
        stamps.append((info.st_mtime_ns, info.st_size) if info else (0, 0))
    return tuple(stamps)


class Certificates:
    def __init__(self, section: GrpcTlsSection) -> None:
        if bool(section.cert_file) != bool(section.key_file):
            raise TlsConfigError("[grpc_api.tls] needs both cert_file and key_file, or neither")
        self.mutual = bool(section.client_ca_file)
        self.lock = threading.Lock()  # fetch runs on gRPC's own threads
        self.section = section
        self.stamp = _stamp(section)
        self.current = self._configuration(section)

    def _configuration(self, section: GrpcTlsSection) -> grpc.ServerCertificateConfiguration:
        pair = (_read("key_file", section.key_file), _read("cert_file", section.cert_file))
        try:  # a renewal caught half way has a key that does not match the certificate
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                section.cert_file, section.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"[grpc_api.tls] cert_file and key_file do not make a "
                                 f"usable pair: {exc}") from None
        roots = _read("client_ca_file", section.client_ca_file) if self.mutual else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current, self.fetch, require_client_authentication=self.mutual)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: new certificates since the last answer?"""
        with self.lock:
            stamp = _stamp(self.section)
            if stamp == self.stamp:
                return None
            self.stamp = stamp
            try:
                self.current = self._configuration(self.section)
            except TlsConfigError as exc:
                log.error("TLS files changed but cannot be used; serving the previous "
                          "certificates: %s", exc)
                return None
        log.info("TLS certificates read again from %s", self.section.cert_file)
        return self.current

    def reload(self, section: GrpcTlsSection) -> None:
        """Take other files (a config reload); they are read at the next handshake."""
        if bool(section.client_ca_file) != self.mutual:
            raise TlsConfigError("switching mutual TLS on or off needs a restart")
        self._configuration(section)  # fails here, not at a handshake, if unusable
        with self.lock:
            self.section = section
            self.stamp = ()
