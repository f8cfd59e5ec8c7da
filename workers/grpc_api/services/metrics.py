"""MetricsService (protos/llm_optimizer/v1/metrics.proto) over the REST operations
``list_windows``, ``metrics_summary``, ``list_findings`` and ``list_events``.

* Exports are pages of those same operations, written as JSON lines or CSV.
* SubscribeAlerts tails the optimizer-events log as the REST event stream does (workers/rest_api
  /sse.py). SubscribeMetrics and SubscribeCost poll ``list_windows`` every ``POLL_S``: nothing
  announces closed windows, and the processor closes them per key in event-time order, so a
  window is new when it starts after the last one seen of its key.
* RecordMetrics is the collector's JSON ingest in this process: each LLMCallEvent becomes the
  JSON event object and goes through ``ipc.events.parse_json_event``, then the collector's
  ``IngestPipeline`` (pricing, the event-log producer of ``[event_log]``, dead letters) and its
  per-client rate limit (``[collector]`` settings; buckets and the in-flight bound are per
  process, as they are per collector process). In-process rather than forwarded over HTTP, so
  that nothing is validated twice and an acknowledgement means the log's own.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import msgspec

from ipc import storage as s
from ipc.endpoints import runtime_dir
from ipc.events import EventRejected, encode_feedback, parse_feedback, parse_json_event
from ipc.prices import price_table_from_config
from protos.llm_optimizer.v1 import common_pb2, metrics_pb2, metrics_pb2_grpc
from workers.collector.admission import ClientLimits, OverBudget
from workers.collector.json_ingest import FEEDBACK_LOG, MAX_EVENTS_PER_REQUEST
from workers.collector.otlp_grpc import peer_address
from workers.collector.pipeline import IngestPipeline, NotDurable, Overloaded, Refused
from workers.eventlog import open_producer
from workers.grpc_api.convert import enum_text, enum_value, ms_of, struct, timestamp_ns
from workers.grpc_api.errors import problem_status
from workers.grpc_api.interceptor import GuardedServer, current_principal
from workers.grpc_api.layer import ServiceLayer
from workers.rest_api.auth import Role, authorize
from workers.rest_api.endpoints.common import EVENTS_LOG, MAX_PAGE, decode_cursor, encode_cursor
from workers.rest_api.endpoints.findings import MAX_POINTS
from workers.rest_api.problems import Problem

M = metrics_pb2
SOURCE = "grpc"
POLL_S = 2.0  # SubscribeMetrics/SubscribeCost: how often the window series are read
LONG_POLL_S = 15.0
READ_BATCH = 200
DEDUP_MAX = 2048
EXPORT_DEFAULT, EXPORT_MAX = 1000, 10_000
EXPORT_CALLS = 2 * EXPORT_MAX // MAX_PAGE
SEVERITY_RANK = {"info": 1, "warning": 2, "critical": 3}
# REST query names as this API's field names, for the field path of an INVALID_ARGUMENT.
FIELD_NAMES = {"start": "start_time", "end": "end_time", "limit": "page_size",
               "cursor": "page_token"}


async def _call(layer: ServiceLayer, operation: str, query: dict[str, Any],
                prefix: str = "") -> Any:
    """The operation's plain answer; a refused query names the request's field."""
    try:
        return msgspec.to_builtins(await layer.call(operation, query=query))
    except Problem as exc:
        if exc.status == 422 and exc.path:
            exc.path = prefix + FIELD_NAMES.get(exc.path, exc.path)
        raise


def _set(query: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``query`` with the values that are set (proto3 empty strings and zeros mean unset)."""
    query.update({k: v for k, v in values.items() if v not in (None, "", 0)})
    return query


def _window_query(r: M.QueryMetricsRequest) -> dict[str, Any]:
    return _set({}, service=r.service, model=r.model, variant=r.variant,
                operation=r.operation, kind=enum_text(M.WindowKind, r.kind),
                start=ms_of(r.start_time, r.HasField("start_time")),
                end=ms_of(r.end_time, r.HasField("end_time")),
                limit=min(r.limit, MAX_POINTS) if r.limit > 0 else None)


def _finding_query(r: M.ListFindingsRequest) -> dict[str, Any]:
    return _set({}, service=r.service, kind=r.kind,
                severity=enum_text(common_pb2.Severity, r.severity),
                start=ms_of(r.start_time, r.HasField("start_time")),
                end=ms_of(r.end_time, r.HasField("end_time")),
                limit=min(r.page_size, MAX_PAGE) if r.page_size > 0 else None,
                cursor=r.page_token)


def _event_query(r: M.ListEventsRequest) -> dict[str, Any]:
    return _set({}, service=r.service, model=r.model, variant=r.variant,
                start=ms_of(r.start_time, r.HasField("start_time")),
                end=ms_of(r.end_time, r.HasField("end_time")),
                limit=min(r.page_size, MAX_PAGE) if r.page_size > 0 else None,
                cursor=r.page_token)


def _window(w: dict[str, Any]) -> M.Window:
    return M.Window(start_time=timestamp_ns(w["start_ns"]), end_time=timestamp_ns(w["end_ns"]),
                    summary=struct(w["summary"]))


def _series(s_: dict[str, Any], windows: Iterable[dict[str, Any]]) -> M.Series:
    return M.Series(service=s_["service"], model=s_["model"], variant=s_["variant"],
                    operation=s_["operation"], windows=[_window(w) for w in windows])


def _totals(t: dict[str, Any]) -> M.Totals:
    return M.Totals(**{k: v for k, v in t.items() if v is not None})


def _finding(f: dict[str, Any]) -> M.Finding:
    return M.Finding(id=f["id"], kind=f["kind"], service=f["service"], model=f["model"],
                     operation=f["operation"], variant=f["variant"],
                     severity=enum_value(common_pb2.Severity, f["severity"]),
                     title=f["title"], detail=f["detail"], evidence=f["evidence"],
                     window_start_time=timestamp_ns(f["window_start_ns"]),
                     window_end_time=timestamp_ns(f["window_end_ns"]))


def _event(e: dict[str, Any]) -> M.LLMCallEvent:
    optional = {k: e[k] for k in ("ttft_ms", "cost_usd", "cache_hit", "quality")
                if e.get(k) is not None}
    return M.LLMCallEvent(
        offset=e["offset"], event_id=e["event_id"], time=timestamp_ns(e["time_ns"]),
        service=e["service"], model=e["model"], provider=e["provider"] or "",
        operation=e["operation"], input_tokens=e["input_tokens"],
        output_tokens=e["output_tokens"], latency_ms=e["latency_ms"],
        status=enum_value(M.CallStatus, e["status"]), error_type=e["error_type"] or "",
        variant=e["variant"] or "", tags=e["tags"], **optional)


def _event_json(e: M.LLMCallEvent) -> dict[str, Any]:
    """The collector's JSON event object for one message: what the JSON ingest validates."""
    obj: dict[str, Any] = _set({}, event_id=e.event_id, service=e.service, model=e.model,
                               provider=e.provider, operation=e.operation,
                               error_type=e.error_type, prompt_fingerprint=e.prompt_fingerprint,
                               variant=e.variant, status=enum_text(M.CallStatus, e.status))
    obj.update(input_tokens=e.input_tokens, output_tokens=e.output_tokens,
               latency_ms=e.latency_ms)
    if e.HasField("time"):
        obj["time"] = e.time.ToJsonString()
    for name in ("cached_input_tokens", "ttft_ms", "cost_usd", "cache_hit", "quality"):
        if e.HasField(name):
            obj[name] = getattr(e, name)
    if e.tags:
        obj["tags"] = dict(e.tags)
    return obj


def _records(data: list[dict[str, Any]], csv_format: bool, header: bool) -> bytes:
    """JSON lines, or CSV with nested values as JSON text (columns: the first record's keys)."""
    if not csv_format:
        return b"".join(json.dumps(r).encode() + b"\n" for r in data)
    if not data:
        return b""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(data[0]), lineterminator="\n")
    if header:
        writer.writeheader()
    for record in data:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else
                         "" if v is None else v for k, v in record.items()})
    return out.getvalue().encode()


class WindowWatch:
    """New closed windows of the keys a query matches, read by polling ``list_windows``: a
    listing of the keys (one point each), then each key's windows after the last one seen."""

    def __init__(self, layer: ServiceLayer, query: dict[str, Any]) -> None:
        self.layer, self.query = layer, query
        self.marks: dict[tuple[str, str, str, str], int] = {}  # key -> next start (ms)

    async def new(self) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(series, its windows not seen before), and marks them seen."""
        listed = await _call(self.layer, "list_windows", {**self.query, "limit": 1})
        keys = [self._key(found) for found in listed["series"]]
        for key in keys:  # keys unknown so far: every window of theirs is new
            self.marks.setdefault(key, 0)
        out = []
        while keys:
            answers = await asyncio.gather(*(_call(self.layer, "list_windows", {
                **self.query, **dict(zip(("service", "model", "variant", "operation"), key,
                                         strict=True)),
                "start": self.marks[key], "limit": MAX_POINTS}) for key in keys))
            full = []
            for key, answer in zip(keys, answers, strict=True):
                for found in answer["series"]:  # the key's own series, or none
                    windows = found["windows"]
                    if windows:
                        self.marks[key] = windows[-1]["start_ns"] // 1_000_000 + 1
                        out.append((found, windows))
                    if len(windows) == MAX_POINTS:
                        full.append(key)
            keys = full
        return out

    @staticmethod
    def _key(series: dict[str, Any]) -> tuple[str, str, str, str]:
        return (series["service"], series["model"], series["variant"], series["operation"])

    async def follow(self, closing: asyncio.Event
                     ) -> AsyncIterator[list[tuple[dict[str, Any], list[dict[str, Any]]]]]:
        """Each poll's new windows; what exists when the stream starts is not sent."""
        await self.new()
        while not closing.is_set():
            await asyncio.sleep(POLL_S)
            found = await self.new()
            if found:
                yield found


class MetricsService(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, layer: ServiceLayer) -> None:
        self.layer = layer
        section = layer.deps.config.collector
        self.limits = ClientLimits.from_section(section)
        self.pipeline: IngestPipeline | None = None  # opened by the first RecordMetrics

    # --- reads -----------------------------------------------------------------------------

    async def QueryMetrics(self, request: M.QueryMetricsRequest,
                           context: grpc.aio.ServicerContext) -> M.QueryMetricsResponse:
        answer = await _call(self.layer, "list_windows", _window_query(request))
        return M.QueryMetricsResponse(
            kind=enum_value(M.WindowKind, answer["kind"]),
            series=[_series(x, x["windows"]) for x in answer["series"]])

    async def GetAnalytics(self, request: M.GetAnalyticsRequest,
                           context: grpc.aio.ServicerContext) -> M.Analytics:
        query = _set({}, service=request.service,
                     start=ms_of(request.start_time, request.HasField("start_time")),
                     end=ms_of(request.end_time, request.HasField("end_time")))
        answer = await _call(self.layer, "metrics_summary", query)
        return M.Analytics(service=answer["service"], start_time=timestamp_ns(
            answer["start"] * 1_000_000), end_time=timestamp_ns(answer["end"] * 1_000_000),
            totals=_totals(answer["totals"]),
            by_model={k: _totals(v) for k, v in answer["by_model"].items()})

    async def ListFindings(self, request: M.ListFindingsRequest,
                           context: grpc.aio.ServicerContext) -> M.ListFindingsResponse:
        page = await _call(self.layer, "list_findings", _finding_query(request))
        return M.ListFindingsResponse(findings=[_finding(f) for f in page["items"]],
                                      next_page_token=page.get("next_cursor") or "")

    async def ListEvents(self, request: M.ListEventsRequest,
                         context: grpc.aio.ServicerContext) -> M.ListEventsResponse:
        page = await _call(self.layer, "list_events", _event_query(request))
        return M.ListEventsResponse(events=[_event(e) for e in page["items"]],
                                    next_page_token=page["next_cursor"],
                                    end_of_log=page["end_of_log"])

    # --- export ----------------------------------------------------------------------------

    async def ExportMetrics(self, request: M.ExportMetricsRequest,
                            context: grpc.aio.ServicerContext) -> M.ExportMetricsResponse:
        size = min(request.page_size, EXPORT_MAX) if request.page_size > 0 else EXPORT_DEFAULT
        dataset = request.dataset or M.ExportMetricsRequest.DATASET_WINDOWS
        if dataset == M.ExportMetricsRequest.DATASET_WINDOWS:
            data, token = await self._export_windows(request, size)
        elif dataset == M.ExportMetricsRequest.DATASET_FINDINGS:
            data, token = await self._export_pages(
                "list_findings", _finding_query(request.findings), "findings.",
                request.page_token, size)
        else:
            data, token = await self._export_pages(
                "list_events", _event_query(request.events), "events.", request.page_token,
                size)
        csv_format = request.format == M.ExportMetricsRequest.FORMAT_CSV
        return M.ExportMetricsResponse(
            content_type="text/csv" if csv_format else "application/x-ndjson",
            data=_records(data, csv_format, header=not request.page_token),
            record_count=len(data), next_page_token=token or "")

    async def _export_pages(self, operation: str, query: dict[str, Any], prefix: str,
                            token: str, size: int) -> tuple[list[dict[str, Any]], str | None]:
        """Pages of a cursor-paged listing until ``size`` records, or ``EXPORT_CALLS`` pages
        (bounded work for a rare filter); the token is the listing's cursor."""
        data: list[dict[str, Any]] = []
        cursor: str | None = token or None
        for _ in range(EXPORT_CALLS):
            query.update(limit=min(size - len(data), MAX_PAGE))
            query.pop("cursor", None)
            if cursor:
                query["cursor"] = cursor
            page = await _call(self.layer, operation, query, prefix)
            data += page["items"]
            cursor = page.get("next_cursor")
            if page.get("end_of_log"):
                cursor = None  # the events export ends at the log's end
            if not cursor or len(data) >= size:
                break
        return data, cursor

    async def _export_windows(self, request: M.ExportMetricsRequest, size: int
                              ) -> tuple[list[dict[str, Any]], str | None]:
        """Windows ordered by (start, key); the token is the last one sent, and a page reads
        each series from that start on (``list_windows`` has no cursor)."""
        query = _window_query(request.windows)
        after = decode_cursor(request.page_token)
        if after is not None and not (isinstance(after, list) and len(after) == 5):
            raise Problem(422, "Unprocessable Content", "the page token is not one this API "
                          "made", path="page_token", type_suffix="invalid-input")
        if after is not None:
            query["start"] = max(query.get("start", 0), after[0] // 1_000_000)
        limit = min(size + 1, MAX_POINTS)
        answer = await _call(self.layer, "list_windows", {**query, "limit": limit}, "windows.")
        rows = []
        for found in answer["series"]:
            key = [found["service"], found["model"], found["variant"], found["operation"]]
            for w in found["windows"]:
                if after is None or [w["start_ns"], *key] > after:
                    rows.append({"kind": answer["kind"], **dict(zip(
                        ("service", "model", "variant", "operation"), key, strict=True)),
                        "start_ns": w["start_ns"], "end_ns": w["end_ns"],
                        "summary": w["summary"]})
        rows.sort(key=lambda r: (r["start_ns"], r["service"], r["model"], r["variant"],
                                 r["operation"]))
        more = len(rows) > size or any(len(x["windows"]) == limit for x in answer["series"])
        rows = rows[:size]
        if not more or not rows:
            return rows, None
        last = rows[-1]
        return rows, encode_cursor([last["start_ns"], last["service"], last["model"],
                                    last["variant"], last["operation"]])

    # --- subscriptions ---------------------------------------------------------------------

    async def SubscribeMetrics(self, request: M.SubscribeMetricsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[M.MetricsUpdate]:
        query = _set({}, service=request.service, model=request.model,
                     variant=request.variant, operation=request.operation,
                     kind=enum_text(M.WindowKind, request.kind))
        kind = enum_value(M.WindowKind, query.get("kind", "tumbling"))
        async for batch in WindowWatch(self.layer, query).follow(self.layer.deps.closing):
            for found, windows in batch:
                for w in windows:
                    yield M.MetricsUpdate(kind=kind, series=_series(found, [w]))

    async def SubscribeCost(self, request: M.SubscribeCostRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[M.CostUpdate]:
        """One update per (service, model, window) among the windows a poll finds new (its
        variants and operations summed); totals run from the stream's start."""
        query = _set({"kind": "tumbling"}, service=request.service, model=request.model)
        totals: dict[tuple[str, str], float] = defaultdict(float)
        async for batch in WindowWatch(self.layer, query).follow(self.layer.deps.closing):
            sums: dict[tuple[str, str, int, int], dict[str, Any]] = {}
            for found, windows in batch:
                for w in windows:
                    window = sums.setdefault(
                        (found["service"], found["model"], w["start_ns"], w["end_ns"]),
                        {"cost_usd": 0.0, "count": 0, "tokens_in": 0, "tokens_out": 0})
                    for name in window:
                        window[name] += w["summary"].get(name) or 0
            for (service, model, start, end), window in sorted(sums.items()):
                totals[service, model] += window["cost_usd"]
                yield M.CostUpdate(service=service, model=model,
                                   window_start_time=timestamp_ns(start),
                                   window_end_time=timestamp_ns(end),
                                   cost_usd=window["cost_usd"], calls=window["count"],
                                   tokens_in=window["tokens_in"],
                                   tokens_out=window["tokens_out"],
                                   total_cost_usd=totals[service, model])

    async def SubscribeAlerts(self, request: M.SubscribeAlertsRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[M.Alert]:
        authorize(current_principal(), Role.VIEWER)  # as GET /v1/events/stream
        storage = self.layer.deps.storage
        at_least = SEVERITY_RANK[enum_text(common_pb2.Severity, request.min_severity)
                                 or "warning"]
        offset = request.since_offset if request.HasField("since_offset") else \
            (await storage.call(s.LogInfo(log=EVENTS_LOG))).next_offset
        seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        while not self.layer.deps.closing.is_set():
            page = await storage.call(
                s.LogRead(log=EVENTS_LOG, offset=offset, max_records=READ_BATCH,
                          wait_ms=int(LONG_POLL_S * 1000)), timeout=LONG_POLL_S + 10)
            offset = page.next_offset
            for record in page.records:
                try:
                    event = json.loads(record.payload)
                except ValueError:
                    continue
                ident = (str(event.get("type")), str(event.get("id")))
                alert = self._alert(request, at_least, record.offset, event)
                if alert is None or ident in seen:
                    continue
                seen[ident] = None
                if len(seen) > DEDUP_MAX:
                    seen.popitem(last=False)
                yield alert

    @staticmethod
    def _alert(request: M.SubscribeAlertsRequest, at_least: int, offset: int,
               event: dict[str, Any]) -> M.Alert | None:
        body = event.get("body")
        if not isinstance(body, dict) or (request.service and
                                          body.get("service") != request.service):
            return None
        common = {"offset": offset, "time": timestamp_ns(event.get("time_ns")),
                  "service": body.get("service", "")}
        if event.get("type") == "finding":
            if SEVERITY_RANK.get(body.get("severity"), 0) < at_least or (
                    request.kinds and body.get("kind") not in request.kinds):
                return None
            finding = _finding(body)
            return M.Alert(severity=finding.severity, title=finding.title, finding=finding,
                           **common)
        if event.get("type") == "rollout" and request.include_rollbacks and \
                body.get("kind") == "rolled_back":
            return M.Alert(severity=common_pb2.SEVERITY_WARNING,
                           title=f"rollout of {body.get('proposal_id')} rolled back: "
                                 f"{body.get('reason', '')}", rollback=struct(body), **common)
        return None

    # --- ingest ----------------------------------------------------------------------------

    def _ingest(self) -> IngestPipeline:
        if self.pipeline is None:
            config = self.layer.deps.config
            producer = open_producer(config, runtime_dir(config))
            self.layer.on_close(producer.close)
            self.pipeline = IngestPipeline(
                producer, self.layer.deps.storage,
                price_table_from_config(config.collector), config.collector.max_in_flight)
        return self.pipeline

    async def RecordMetrics(self, request_iterator: AsyncIterator[M.RecordMetricsRequest],
                            context: grpc.aio.ServicerContext) -> M.RecordMetricsResponse:
        authorize(current_principal(), Role.VIEWER)  # an app's key: least privilege
        pipeline = self._ingest()
        answer = M.RecordMetricsResponse()
        client = None
        if self.limits is not None:
            metadata = {k: v for k, v in context.invocation_metadata() or ()
                        if isinstance(v, str)}
            client = self.limits.client_of(metadata, peer_address(context.peer() or ""))
        async for message in request_iterator:
            started = time.monotonic()
            try:
                if max(len(message.events), len(message.feedback)) > MAX_EVENTS_PER_REQUEST:
                    raise Problem(413, "Content Too Large", f"at most "
                                  f"{MAX_EVENTS_PER_REQUEST} events and as many feedback "
                                  "items per message; send smaller messages")
                if client is not None:
                    self.limits.admit(SOURCE, client, len(message.events) +
                                      len(message.feedback))
                await self._events(pipeline, message.events, answer, started)
                await self._feedback(message.feedback, answer)
            except (Problem, Refused) as exc:
                await self._end(context, exc, answer.events_accepted)
        return answer

    async def _events(self, pipeline: IngestPipeline, events: Iterable[M.LLMCallEvent],
                      answer: M.RecordMetricsResponse, started: float) -> None:
        accepted, dead = [], []
        for event in events:
            index = answer.events_received
            answer.events_received += 1
            obj = _event_json(event)
            try:
                accepted.append(parse_json_event(obj, index))
            except EventRejected as exc:
                answer.rejected.add(index=index, path=exc.path, reason=exc.reason,
                                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
                dead.append((obj, exc.path, exc.reason))
        await pipeline.submit(SOURCE, accepted, started)
        answer.events_accepted += len(accepted)
        await pipeline.dead_letter(SOURCE, dead)

    async def _feedback(self, items: Iterable[M.QualityFeedback],
                        answer: M.RecordMetricsResponse) -> None:
        received, encoded = time.time_ns(), []
        for item in items:
            index = answer.feedback_received
            answer.feedback_received += 1
            try:
                encoded.append(encode_feedback(parse_feedback(
                    _set({"quality": item.quality}, event_id=item.event_id), index, received)))
            except EventRejected as exc:
                answer.rejected_feedback.add(index=index, path=exc.path, reason=exc.reason,
                                             code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
        if encoded:
            try:
                await self.layer.deps.storage.append(FEEDBACK_LOG, encoded)
            except s.StorageFailure as exc:
                raise NotDurable(f"feedback not durable: {exc}") from exc
            answer.feedback_accepted += len(encoded)

    @staticmethod
    async def _end(context: grpc.aio.ServicerContext, exc: Problem | Refused,
                   durable: int) -> None:
        """End the stream with ``exc``'s status and how many of its events are durable."""
        if isinstance(exc, Refused):
            wait = max(1, math.ceil(exc.retry_after))
            exc = Problem(429, "Too Many Requests", str(exc), retry_after=wait) \
                if isinstance(exc, (Overloaded, OverBudget)) else \
                Problem(503, "Service Unavailable", f"events not durable: {exc}",
                        retry_after=wait)
        status = problem_status(exc)
        await context.abort(status.code, status.details, trailing_metadata=(
            *status.trailing_metadata, ("x-durable-events", str(durable))))


def register(server: GuardedServer, layer: ServiceLayer) -> str:
    metrics_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(layer), server)
    return metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
