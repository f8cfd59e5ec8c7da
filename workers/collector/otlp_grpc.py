"""OTLP/gRPC traces: ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` on
``[collector] otlp_grpc_listen`` (grpc.aio), with the mapping OTLP/HTTP uses.

An overloaded collector, or a client over its rate limit, answers RESOURCE_EXHAUSTED and one
whose event log did not take the events UNAVAILABLE, both with a ``google.rpc.RetryInfo`` in
the status details: OTLP exporters retry RESOURCE_EXHAUSTED only when it carries RetryInfo.
Messages are bounded like HTTP bodies (decompressed); gzip is handled by gRPC itself.
SO_REUSEPORT only when the collector runs more than one process, so that a port already taken
is an error otherwise.
"""
from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)

from workers.collector.admission import ClientLimits, OverBudget
from workers.collector.otlp_http import IGNORED_SPANS
from workers.collector.otlp_mapping import map_request
from workers.collector.pipeline import IngestPipeline, NotDurable, Overloaded

SOURCE = "otlp_grpc"
STOP_GRACE = 2.0


def _retry_trailer(code: int, message: str, retry_after: float) -> tuple[tuple[str, bytes]]:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(retry_after),
                                          nanos=int(retry_after % 1 * 1e9)))
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def peer_address(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` or ``ipv6:[::1]:5000`` -> the address without the port."""
    address = peer.split(":", 1)[-1]
    return address.rsplit(":", 1)[0].strip("[]") if address.count(":") else address


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, pipeline: IngestPipeline, limits: ClientLimits | None):
        self.pipeline, self.limits = pipeline, limits

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext
                     ) -> trace_service_pb2.ExportTraceServiceResponse:
        started = time.monotonic()
        mapped = map_request(request)
        try:
            if self.limits is not None:
                metadata = {k: v for k, v in context.invocation_metadata() or ()
                            if isinstance(v, str)}
                client = self.limits.client_of(metadata, peer_address(context.peer() or ""))
                self.limits.admit(SOURCE, client, mapped.llm_spans)
            if mapped.ignored:
                IGNORED_SPANS.labels(SOURCE).inc(mapped.ignored)
            await self.pipeline.submit(SOURCE, mapped.events, started)
        except (Overloaded, OverBudget) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                trailing_metadata=_retry_trailer(
                                    code_pb2.RESOURCE_EXHAUSTED, str(exc), exc.retry_after))
        except NotDurable as exc:
            message = f"events not durable: {exc}"
            await context.abort(grpc.StatusCode.UNAVAILABLE, message,
                                trailing_metadata=_retry_trailer(code_pb2.UNAVAILABLE,
                                                                 message, exc.retry_after))
        await self.pipeline.dead_letter(SOURCE, mapped.rejected)
        return mapped.response()


async def start_server(listen: str, pipeline: IngestPipeline, limits: ClientLimits | None,
                       processes: int, max_message_bytes: int) -> Any:
    """A started grpc.aio server with the TraceService on ``listen``."""
    options = [("grpc.so_reuseport", 1 if processes > 1 else 0),
               ("grpc.max_receive_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        TraceService(pipeline, limits), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot bind OTLP/gRPC on {listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot bind OTLP/gRPC on {listen}")
    await server.start()
    return server


async def stop_server(server: Any) -> None:
    await server.stop(STOP_GRACE)  # in-flight Exports finish: their appends complete
