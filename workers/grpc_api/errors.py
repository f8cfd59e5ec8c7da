"""The service layer's errors as gRPC statuses, with google.rpc rich details.

The operations raise the REST API's ``Problem`` (its HTTP status says what kind of error it is);
here each becomes the matching code: 422 and 400 INVALID_ARGUMENT with a ``BadRequest`` field
violation naming the field path, 404 NOT_FOUND, 409 FAILED_PRECONDITION, 401
UNAUTHENTICATED, 403 PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED and 503 UNAVAILABLE with
``RetryInfo``, 504 DEADLINE_EXCEEDED. Every status carries an ``ErrorInfo`` with the problem's
type as reason. Anything else is INTERNAL with the request id only: internals never leak.
"""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from workers.rest_api.problems import TYPE_PREFIX, Problem

DOMAIN = "llm-optimizer"
_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(problem: Problem) -> grpc.StatusCode:
    return _CODES.get(problem.status, grpc.StatusCode.INTERNAL if problem.status >= 500
                      else grpc.StatusCode.FAILED_PRECONDITION)


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def problem_status(problem: Problem) -> grpc.Status:
    """``problem`` as a status whose details clients decode with grpc_status."""
    code = code_of(problem)
    reason = problem.type.removeprefix(TYPE_PREFIX) if problem.type != "about:blank" else ""
    details = [_packed(error_details_pb2.ErrorInfo(
        reason=(reason or code.name).upper().replace("-", "_"), domain=DOMAIN))]
    if problem.path is not None or code is grpc.StatusCode.INVALID_ARGUMENT:
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=problem.path or "",
                                                        description=problem.detail)])))
    if problem.retry_after is not None:
        details.append(_packed(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(problem.retry_after)))))
    return rpc_status.to_status(status_pb2.Status(
        code=code.value[0], message=problem.detail, details=details))


def internal_status(request_id: str) -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; the server log has it under request id {request_id}"))


def status_of(code: grpc.StatusCode, message: str) -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message))
