"""Spans of optimizerd's own work, exported over OTLP/HTTP when ``[observability] otlp_endpoint``
is set (docs/operations.md, "Tracing").

Off, the default, nothing of OpenTelemetry is imported and every helper returns at once:
``span`` and ``server_span`` a shared null context, ``traceparent`` None. On, ``setup`` gives the
worker process a TracerProvider (service.name ``optimizerd.<service>``) with a batch exporter and
a parent-based ratio sampler. Context crosses processes as a W3C ``traceparent`` string: an HTTP
header or gRPC metadata from clients, the ``trace`` field of storage requests and admin calls
between the services.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from ipc.config import Config

KEYS = ("otlp_endpoint", "otlp_headers_file", "trace_sample_ratio")
# Set by setup() when tracing is on; None means off.
_tracer: Any = None
_provider: Any = None
_propagator: Any = None
_otel: Any = None  # the opentelemetry.trace module


class _NoSpan:
    """What ``with span(...) as s`` gives when off: attributes set on it go nowhere."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass


_OFF = contextlib.nullcontext(_NoSpan())


def enabled() -> bool:
    return _tracer is not None


def settings(config: Config) -> tuple[Any, ...]:
    """The keys a worker applies at its start only: a reload that changes them restarts it."""
    return tuple(getattr(config.observability, key) for key in KEYS)


def read_headers(path: str) -> dict[str, str]:
    """``Header: value`` lines; blank lines and ``#`` comments are skipped."""
    headers = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise ValueError(f"observability.otlp_headers_file {path}, line {number}: "
                                 "expected 'Header: value'")
            headers[name.strip()] = value.strip()
    return headers


def setup(config: Config, service: str, instance: int) -> None:
    """Start exporting this process's spans, when ``otlp_endpoint`` is set."""
    global _tracer, _provider, _propagator, _otel
    obs = config.observability
    if not obs.otlp_endpoint:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    headers = read_headers(obs.otlp_headers_file) if obs.otlp_headers_file else None
    resource = Resource.create({
        "service.name": f"optimizerd.{service}",
        "service.instance.id": f"{socket.gethostname()}/{service}#{instance}",
        "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource,
                              sampler=ParentBased(TraceIdRatioBased(obs.trace_sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=obs.otlp_endpoint, headers=headers)))
    _otel, _provider, _propagator = trace, provider, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("optimizerd")


def shutdown() -> None:
    """Export the spans still buffered; called once the worker has stopped."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A span of internal work, child of the current one (a new trace when there is none)."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, attributes=attributes)


def server_span(name: str, carrier: Mapping[str, str] | None,
                attributes: Mapping[str, Any] | None = None,
                exception_fails: bool = True) -> AbstractContextManager[Any]:
    """A span serving a request: it continues the caller's trace when ``carrier`` (headers,
    metadata) holds a valid ``traceparent``, else it starts one. An exception leaving it is
    recorded, and fails it unless ``exception_fails`` is False (the caller decides)."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, context=_propagator.extract(carrier or {}),
                                         kind=_otel.SpanKind.SERVER, attributes=attributes,
                                         set_status_on_exception=exception_fails)


def remote_span(traceparent: str, name: str, attributes: Mapping[str, Any] | None = None
                ) -> Any:
    """A started span, child of ``traceparent``, that the caller ends (it is not made current:
    for requests answered out of order, as storage's group commit does). None when off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=_propagator.extract({"traceparent": traceparent}),
                              kind=_otel.SpanKind.SERVER, attributes=attributes)


def fail(span: Any, description: str) -> None:
    """Mark a span as failed (a 5xx, a server-side gRPC code, a refused storage request)."""
    if _tracer is not None:
        span.set_status(_otel.Status(_otel.StatusCode.ERROR, description))


def traceparent() -> str | None:
    """The current span as a W3C traceparent to send along, or None (off, no span, or a trace
    not sampled: the receiver would record nothing of it)."""
    if _tracer is None:
        return None
    context = _otel.get_current_span().get_span_context()
    if not context.trace_flags.sampled:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
