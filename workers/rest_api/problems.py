"""RFC 9457 problem details for the REST API.

Handlers raise ``Problem``; ``problem_middleware`` turns it, aiohttp's HTTP errors (404, 405,
413...), msgspec decoding errors and anything unexpected into ``application/problem+json``
answers, so that every error a client sees has the same shape. An unexpected exception is
logged with its traceback under the request id and answered with that id only: internals
(paths, SQL, stack frames) never reach the client. ``request_id_middleware`` gives every request
an id (the client's ``X-Request-Id`` if sane, else a new one) and echoes it on every answer.
"""
from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("workers.rest_api")

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:llm-optimizer:problem:"  # a URN: a stable name that does not pretend to resolve
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# A client's id is echoed into logs and headers: only short, plain ids are taken as they are.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# msgspec says "... - at `$.change.model`"; the path a client sees is "change.model".
_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MSGSPEC_FIELD = re.compile(r"(?:missing required|unknown) field `(?P<field>[^`]+)`")


class ProblemDetails(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of every error answer (RFC 9457); documented once in the OpenAPI document."""

    type: str  # always sent, although RFC 9457 lets "about:blank" be left out
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    path: str | None = None  # the offending field of the body or query, e.g. change.model
    retry_after: int | None = None


class Problem(Exception):
    """An error answer, raised anywhere below a handler."""

    def __init__(self, status: int, title: str, detail: str, *, path: str | None = None,
                 type_suffix: str | None = None, retry_after: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail
        self.path = path
        self.type = TYPE_PREFIX + type_suffix if type_suffix else "about:blank"
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def details(self, request: web.Request) -> ProblemDetails:
        return ProblemDetails(type=self.type, title=self.title, status=self.status,
                              detail=self.detail, instance=request.path,
                              request_id=request_id(request), path=self.path,
                              retry_after=self.retry_after)

    def response(self, request: web.Request) -> web.Response:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return web.Response(status=self.status, body=msgspec.json.encode(self.details(request)),
                            content_type=PROBLEM_CONTENT_TYPE, headers=headers)


def request_id(request: web.Request) -> str:
    """The request's id, made on first use (also without ``request_id_middleware``)."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request[REQUEST_ID_KEY] = rid
    return rid


def field_path(exc: msgspec.DecodeError) -> str | None:
    """The dotted path of the field a msgspec error is about: ``$.change.model`` becomes
    ``change.model``, ``$.items[2]`` ``items[2]``; a missing or unknown field is named too."""
    message = str(exc)
    found = _MSGSPEC_PATH.search(message)
    path = found["path"].removeprefix(".") if found else ""
    field = _MSGSPEC_FIELD.search(message)
    if field:
        path = f"{path}.{field['field']}" if path else field["field"]
    return path or None


def _without_path(exc: msgspec.DecodeError) -> str:
    return _MSGSPEC_PATH.sub("", str(exc))


def invalid_input(exc: msgspec.DecodeError, where: str = "body") -> Problem:
    """422 for a well-formed document with a bad field, 400 for one that is not JSON at all."""
    if isinstance(exc, msgspec.ValidationError):
        path = field_path(exc)
        at = f" at {path}" if path else ""
        return Problem(422, "Unprocessable Content", f"invalid {where}{at}: {_without_path(exc)}",
                       path=path, type_suffix="invalid-input")
    return Problem(400, "Bad Request", f"the {where} is not valid JSON: {exc}",
                   type_suffix="malformed-input")


def _from_http(request: web.Request, exc: web.HTTPException) -> Problem:
    if exc.status == 404:
        detail = f"no resource at {request.path}"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        detail = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    else:  # aiohttp's own text says what went wrong (e.g. the body size limit), unless default
        text = exc.text or ""
        detail = text if text and text != f"{exc.status}: {exc.reason}" else exc.reason
    keep = {k: v for k, v in exc.headers.items()
            if k.lower() not in ("content-type", "content-length")}
    return Problem(exc.status, exc.reason, detail, headers=keep)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return exc.response(request)
    except msgspec.DecodeError as exc:  # ValidationError included: a handler decoding a body
        return invalid_input(exc).response(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        return _from_http(request, exc).response(request)
    except Exception:
        rid = request_id(request)
        log.exception("request %s %s %s failed", rid, request.method, request.path)
        return Problem(500, "Internal Server Error",
                       f"an internal error occurred; quote request id {rid} when reporting it",
                       type_suffix="internal").response(request)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every answer, error or not, carries the request's id."""
    rid = request_id(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # without problem_middleware below
        exc.headers[REQUEST_ID_HEADER] = rid
        raise
    response.headers[REQUEST_ID_HEADER] = rid
    return response

