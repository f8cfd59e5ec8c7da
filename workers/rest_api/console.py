"""The web console: a static page at ``/ui`` that talks to this same API.

The page holds no data, so its files are public; every figure it shows comes from ``/v1/...``
calls made with the API key (or JWT) the user types in, kept in the browser's session storage.
The files are read once, at start, and served from memory as plain ``web.Response`` bodies, so
the API's compression middleware compresses them (brotli or gzip) like any other answer.

Caching: ``index.html`` is revalidated every time (``no-cache`` with an ``ETag``); it names its
script, stylesheet and vendor files with ``?v=<content hash>``, and such a versioned URL is
cached for a year (``immutable``). Every answer carries a strict Content-Security-Policy: only
this origin's scripts, styles, images and connections (``fetch`` and the event stream), no
inline script or style, no framing.
"""
from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent / "console"
STATIC_FILES = ("app.js", "style.css", "vendor/chart.min.js", "vendor/chart.js.LICENSE")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                    "Cross-Origin-Opener-Policy": "same-origin"}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
         ".LICENSE": "text/plain"}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # the first 12 hex digits of the content's SHA-256

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


def _asset(body: bytes, name: str) -> Asset:
    suffix = Path(name).suffix
    content_type = TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Asset(body, content_type, hashlib.sha256(body).hexdigest()[:12])


def load(root: Path = ROOT) -> tuple[Asset, dict[str, Asset]]:
    """(the page, the static files by name); the page's references carry the files' hashes."""
    static = {name: _asset((root / name).read_bytes(), name) for name in STATIC_FILES}
    page = (root / "index.html").read_text()
    for name, asset in static.items():
        page = page.replace(f'"/ui/static/{name}"', f'"/ui/static/{name}?v={asset.version}"')
    return _asset(page.encode(), "index.html"), static


def _answer(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    charset = "utf-8" if asset.content_type.startswith("text/") else None
    return web.Response(body=asset.body, content_type=asset.content_type, charset=charset,
                        headers=headers)


def install(app: web.Application) -> None:
    """``GET /ui`` (the page; ``/ui/`` redirects to it) and ``GET /ui/static/{name}``."""
    page, static = load()

    async def index(request: web.Request) -> web.Response:
        return _answer(request, page, REVALIDATE)

    async def slash(_request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/ui")

    async def asset(request: web.Request) -> web.Response:
        found = static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound(text="no such console file")
        versioned = request.query.get("v") == found.version
        return _answer(request, found, IMMUTABLE if versioned else REVALIDATE)

    app.router.add_get("/ui", index, name="console")
    app.router.add_get("/ui/", slash)
    app.router.add_get("/ui/static/{name:[A-Za-z0-9_./-]+}", asset, name="console_static")
