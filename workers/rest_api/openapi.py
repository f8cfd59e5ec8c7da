"""The OpenAPI 3.1 document of a RouteTable, served at /openapi.json, and a plain /docs page.

Schemas come from ``msgspec.json.schema_components`` over the very types the routes decode and
encode, so the document says what the server does. Every authenticated operation documents its
401, 403 and 429 problems; operations with input document 400/413/415/422; operations whose
path parameters are constrained (``{name:regex}``) document the pattern and 404; every
operation documents 503 (in-flight or time limit, storage unavailable).
"""
from __future__ import annotations

import html
import json
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web

from workers.rest_api.problems import PROBLEM_CONTENT_TYPE, ProblemDetails
from workers.rest_api.routes import Route, RouteTable

REF = "#/components/schemas/{name}"
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "A JWT, or an API key (llmo_...) sent as a bearer credential."},
    "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
AUTH_PROBLEMS = (401, 403, 429)
BODY_PROBLEMS = (400, 413, 415, 422)


def _problem_name(status: int) -> str:
    return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")


def _problem_response(status: int) -> dict[str, Any]:
    return {"description": HTTPStatus(status).phrase + " (problem details, RFC 9457)",
            "content": {PROBLEM_CONTENT_TYPE: {
                "schema": {"$ref": REF.format(name=ProblemDetails.__name__)}}}}


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", ()))
    return [{"name": name, "in": "query", "required": name in required, "schema": prop}
            for name, prop in schema.get("properties", {}).items()]


def _operation(route: Route, schemas: dict[Any, Any], components: dict[str, Any]
               ) -> tuple[dict[str, Any], set[int]]:
    """The operation object, and the problem statuses it refers to."""
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary,
                          "tags": list(route.tags)}
    if route.description:
        op["description"] = route.description
    patterns = route.path_patterns
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in route.path_params]
    for param in params:
        if param["name"] in patterns:
            param["schema"]["pattern"] = f"^(?:{patterns[param['name']]})$"
    if route.query is not None:
        params += _query_parameters(components[route.query.__name__])
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": schemas[route.body]}}}
    responses: dict[str, Any] = {}
    for status, kind in route.responses.items():
        answer: dict[str, Any] = {"description": HTTPStatus(status).phrase}
        if kind is not None:
            answer["content"] = {"application/json": {"schema": schemas[kind]}}
        responses[str(status)] = answer
    # Any operation may meet a full server, its time limit or storage away (503, Retry-After).
    problems = set(route.problems) | {503}
    if patterns:  # a value the router does not match: no resource at that path
        problems.add(404)
    if route.body is not None:
        problems.update(BODY_PROBLEMS)
    if route.query is not None:
        problems.add(422)
    if route.role is None:
        op["security"] = []
    else:
        problems.update(AUTH_PROBLEMS)
        op["security"] = [{name: []} for name in SECURITY_SCHEMES]
        op["x-required-role"] = route.role.value
        op["description"] = (op.get("description", "") +
                             f"\n\nRequires the {route.role.value} role or higher.").strip()
    for status in sorted(problems):
        responses[str(status)] = {"$ref": f"#/components/responses/{_problem_name(status)}"}
    op["responses"] = responses
    return op, problems


def build_document(table: RouteTable, *, title: str, version: str,
                   description: str = "") -> dict[str, Any]:
    types: list[Any] = [ProblemDetails]
    for route in table:
        types += [t for t in (route.body, route.query, *route.responses.values())
                  if t is not None]
    types = list(dict.fromkeys(types))
    generated, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas = dict(zip(types, generated, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    used_problems: set[int] = set()
    for route in table:
        op, problems = _operation(route, schemas, components)
        used_problems |= problems
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = op
    # A query type is spelled out as parameters: keep its schema only if something refers to it.
    referenced = json.dumps([paths, components])
    for route in table:
        name = route.query.__name__ if route.query is not None else None
        if name in components and f'"{REF.format(name=name)}"' not in referenced:
            del components[name]
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {_problem_name(s): _problem_response(s) for s in sorted(used_problems)},
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def docs_html(document: dict[str, Any]) -> str:
    """A readable listing of the operations; needs no script nor CDN."""
    info = document["info"]
    rows = []
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            role = op.get("x-required-role", "public")
            statuses = ", ".join(op["responses"])
            rows.append(
                f"<tr><td><code>{html.escape(method.upper())}</code></td>"
                f"<td><code>{html.escape(path)}</code></td><td>{html.escape(op['summary'])}</td>"
                f"<td>{html.escape(role)}</td><td>{html.escape(statuses)}</td></tr>")
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(info['title'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.3em .8em;"
        "text-align:left;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>{html.escape(info['title'])} {html.escape(info['version'])}</h1>"
        f"<p>{html.escape(info.get('description', ''))}</p>"
        "<p>The full description: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3.1). "
        "Authenticate with <code>Authorization: Bearer &lt;token or API key&gt;</code> or "
        "<code>X-API-Key</code>.</p>"
        "<table><tr><th>Method</th><th>Path</th><th>Summary</th><th>Role</th>"
        f"<th>Answers</th></tr>{''.join(rows)}</table></body></html>")


def add_docs_routes(app: web.Application, table: RouteTable, *, title: str, version: str,
                    description: str = "") -> dict[str, Any]:
    """Serve ``/openapi.json`` and ``/docs`` (public), built once from the table."""
    document = build_document(table, title=title, version=version, description=description)
    body = json.dumps(document, indent=1).encode()
    page = docs_html(document)

    async def openapi_json(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def docs(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    return document
