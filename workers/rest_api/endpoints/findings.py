"""Findings and window metrics, as the processor stored them: findings in documents
``findings``, closed windows as time series in ``windows`` (``ipc.window_series``).

Times in queries are milliseconds since the epoch. Reads are bounded per request: a filter that
matches little answers a short page with a cursor rather than scanning everything at once.
"""
from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ipc import storage as s
from ipc import window_series as ws
from workers.rest_api.auth import Role
from workers.rest_api.endpoints.common import (MAX_PAGE, Deps, decode_cursor, encode_cursor,
                                               scan_documents)
from workers.rest_api.routes import Call, RouteTable

FOREVER_MS = 2 ** 62 // 1_000_000  # in nanoseconds it still fits storage's 64-bit integers
Ms = Annotated[int, Meta(ge=0, le=FOREVER_MS, description="Milliseconds since the epoch.")]
MAX_POINTS = 10_000


class Finding(Struct, kw_only=True):
    id: str
    kind: str
    service: str
    model: str
    operation: str
    variant: str
    severity: Literal["info", "warning", "critical"]
    title: str
    detail: str
    evidence: dict[str, float]
    window_start_ns: int
    window_end_ns: int


class FindingPage(Struct, kw_only=True):
    items: list[Finding]
    next_cursor: str | None = None


class FindingQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    service: str | None = None
    kind: str | None = None
    severity: Literal["info", "warning", "critical"] | None = None
    start: Ms | None = None  # findings whose windows end at or after this
    end: Ms | None = None  # ... and start before this
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE)] = 50
    cursor: str | None = None


class WindowQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    service: str | None = None
    model: str | None = None
    variant: str | None = None  # "baseline" for calls that carry no variant
    operation: str | None = None
    kind: Literal["tumbling", "sliding"] = "tumbling"
    start: Ms = 0
    end: Ms = FOREVER_MS
    limit: Annotated[int, Meta(ge=1, le=MAX_POINTS)] = 1000  # points per series


class Window(Struct, kw_only=True):
    start_ns: int
    end_ns: int
    summary: dict[str, Any]


class Series(Struct, kw_only=True):
    service: str
    model: str
    variant: str
    operation: str
    windows: list[Window]


class WindowsAnswer(Struct, kw_only=True):
    kind: str
    series: list[Series]


class SummaryQuery(Struct, kw_only=True, forbid_unknown_fields=True):
    service: str
    start: Ms = 0
    end: Ms = FOREVER_MS


class Totals(Struct, kw_only=True):
    windows: int = 0
    calls: int = 0
    errors: int = 0
    error_rate: float | None = None
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    quality_mean: float | None = None
    quality_n: int = 0
    p95_ms: float | None = None  # count-weighted mean of window p95s


class Summary(Struct, kw_only=True):
    service: str
    start: int
    end: int
    totals: Totals
    by_model: dict[str, Totals]


async def window_keys(deps: Deps) -> list[ws.WindowKey]:
    keys: list[ws.WindowKey] = []
    cursor = None
    while True:
        page = await deps.storage.call(s.DocList(ns=ws.NS, prefix="key.", limit=1000,
                                                 cursor=cursor))
        keys += [ws.decode_key(d.body) for d in page.documents]
        if page.next_cursor is None:
            return keys
        cursor = page.next_cursor


async def windows_of(deps: Deps, kind: ws.Kind, key: ws.WindowKey, start: int, end: int,
                     limit: int) -> list[ws.WindowPoint]:
    points = await deps.storage.call(s.TsRange(ns=ws.NS, series=ws.series_name(
        kind, key.as_tuple()), start=start, end=end, limit=limit))
    return [ws.decode_point(p.value) for p in points]


def add(totals: Totals, summary: dict[str, Any]) -> None:
    count = summary.get("count") or 0
    totals.windows += 1
    totals.calls += count
    totals.errors += summary.get("errors") or 0
    totals.cost_usd += summary.get("cost_usd") or 0.0
    totals.tokens_in += summary.get("tokens_in") or 0
    totals.tokens_out += summary.get("tokens_out") or 0
    n = summary.get("quality_n") or 0
    if n and summary.get("quality_mean") is not None:
        mean = totals.quality_mean or 0.0
        totals.quality_mean = (mean * totals.quality_n + summary["quality_mean"] * n) / \
            (totals.quality_n + n)
        totals.quality_n += n
    if count and summary.get("p95_ms") is not None:
        weight = totals.calls - count
        totals.p95_ms = ((totals.p95_ms or 0.0) * weight + summary["p95_ms"] * count) / \
            totals.calls
    totals.error_rate = totals.errors / totals.calls if totals.calls else None


def install(table: RouteTable, deps: Deps) -> None:
    viewer = Role.VIEWER

    @table.route("GET", "/v1/findings", role=viewer, query=FindingQuery,
                 responses={200: FindingPage}, tags=("findings",), cached=True)
    async def list_findings(call: Call) -> FindingPage:
        """Findings (latest evidence of each), filtered by service, kind, severity, time."""
        q: FindingQuery = call.query

        def match(body: dict[str, Any]) -> bool:
            if any(want is not None and body.get(name) != want for name, want in
                   (("service", q.service), ("kind", q.kind), ("severity", q.severity))):
                return False
            if q.start is not None and body["window_end_ns"] < q.start * 1_000_000:
                return False
            return q.end is None or body["window_start_ns"] < q.end * 1_000_000

        cursor = decode_cursor(q.cursor)
        found, after = await scan_documents(deps, "findings", "",
                                            cursor if isinstance(cursor, str) else None,
                                            q.limit, match)
        items = [msgspec.convert(body, Finding, strict=False) for _, body in found]
        return FindingPage(items=items, next_cursor=encode_cursor(after) if after else None)

    @table.route("GET", "/v1/metrics/windows", role=viewer, query=WindowQuery,
                 responses={200: WindowsAnswer}, tags=("metrics",), cached=True)
    async def list_windows(call: Call) -> WindowsAnswer:
        """Closed windows per (service, model, variant, operation) key in [start, end)."""
        q: WindowQuery = call.query
        variant = "" if q.variant == "baseline" else q.variant
        keys = [k for k in await window_keys(deps)
                if all(want is None or got == want for got, want in
                       ((k.service, q.service), (k.model, q.model), (k.variant, variant),
                        (k.operation, q.operation)))]
        found = await asyncio.gather(*(windows_of(deps, q.kind, k, q.start, q.end, q.limit)
                                       for k in keys))
        series = [Series(service=k.service, model=k.model, variant=k.variant or "baseline",
                         operation=k.operation,
                         windows=[Window(start_ns=p.start_ns, end_ns=p.end_ns,
                                         summary=p.summary) for p in points])
                  for k, points in zip(keys, found, strict=True) if points]
        return WindowsAnswer(kind=q.kind, series=series)

    @table.route("GET", "/v1/metrics/summary", role=viewer, query=SummaryQuery,
                 responses={200: Summary}, tags=("metrics",), cached=True)
    async def metrics_summary(call: Call) -> Summary:
        """A service's calls, errors, cost, tokens, quality and p95 over [start, end), merged
        from its tumbling windows (all models, variants and operations)."""
        q: SummaryQuery = call.query
        keys = [k for k in await window_keys(deps) if k.service == q.service]
        found = await asyncio.gather(*(windows_of(deps, "tumbling", k, q.start, q.end,
                                                  MAX_POINTS) for k in keys))
        totals, by_model = Totals(), {}
        for key, points in zip(keys, found, strict=True):
            for point in points:
                add(totals, point.summary)
                add(by_model.setdefault(key.model, Totals()), point.summary)
        return Summary(service=q.service, start=q.start, end=q.end, totals=totals,
                       by_model=by_model)
