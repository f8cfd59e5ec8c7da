"""MetricsService over a real optimizerd: ingest through the collector's path (RecordMetrics),
reads compared with the REST routes for the same query, paging, exports, subscriptions, and
errors with their field paths.

The processor closes windows as event time advances, and event time only moves forward in one
daemon: each test uses its own service and a later stretch of event time than the one before.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import urllib.parse
import urllib.request
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipc import storage as s
from protos.llm_optimizer.v1 import common_pb2, metrics_pb2, metrics_pb2_grpc
from tests.conftest import post_events, wait_until
from workers.storage_client import SyncStorageClient

pytestmark = pytest.mark.timeout(120)
M = metrics_pb2
T0 = int(time.time()) // 3600 * 3600 - 10 * 3600  # event time: hours ago, whole hours


def rest(daemon, path: str, **query: Any) -> Any:
    url = f"{daemon.rest_base}{path}?{urllib.parse.urlencode(query)}"
    request = urllib.request.Request(url, headers={
        "Authorization": f"Bearer {daemon.keys['viewer']}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def calls(service: str, start: float, count: int, step: float = 2.0) -> list[dict]:
    return [{"event_id": f"{service}-{i}", "time": start + i * step, "service": service,
             "model": "gpt-4o" if i % 2 else "gpt-4o-mini", "input_tokens": 100,
             "output_tokens": 10, "latency_ms": 100.0 + i, "quality": 0.8}
            for i in range(count)]


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds))


def stub(daemon) -> metrics_pb2_grpc.MetricsServiceStub:
    return metrics_pb2_grpc.MetricsServiceStub(daemon.channel())


def violation(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest in {status}")


def all_events(client, service: str, page_size: int, metadata) -> list[M.LLMCallEvent]:
    got, token = [], ""
    while True:
        page = client.ListEvents(M.ListEventsRequest(service=service, page_size=page_size,
                                                     page_token=token),
                                 metadata=metadata)
        got += page.events
        token = page.next_page_token
        if page.end_of_log:
            return got


def test_record_metrics_durable_counts_and_rejections(grpc_daemon):
    service = "grpc-rec"

    def event(i: int, **change: Any) -> M.LLMCallEvent:
        fields = {"event_id": f"rec-{i}", "time": stamp(T0 + i), "service": service,
                  "model": "gpt-4o", "input_tokens": 50, "output_tokens": 5,
                  "latency_ms": 80.0, "tags": {"team": "a"}, **change}
        return M.LLMCallEvent(**fields)

    def messages():
        yield M.RecordMetricsRequest(events=[event(i) for i in range(100)])
        yield M.RecordMetricsRequest(
            events=[event(100, input_tokens=-1), *[event(i) for i in range(101, 200)],
                    event(200, service="")],
            feedback=[M.QualityFeedback(event_id="rec-1", quality=0.9),
                      M.QualityFeedback(event_id="rec-2", quality=1.5)])
        yield M.RecordMetricsRequest(events=[event(i, quality=0.7, cost_usd=0.001)
                                             for i in range(201, 302)])

    answer = stub(grpc_daemon).RecordMetrics(messages(), metadata=grpc_daemon.auth("viewer"))
    assert answer.events_received == 302 and answer.events_accepted == 300
    assert [(r.index, r.path) for r in answer.rejected] == [
        (100, "events[100].input_tokens"), (200, "events[200].service")]
    assert "negative" in answer.rejected[0].reason and answer.rejected[0].code == 3
    assert (answer.feedback_received, answer.feedback_accepted) == (2, 1)
    assert answer.rejected_feedback[0].path == "feedback[1].quality"

    got = all_events(stub(grpc_daemon), service, 120, grpc_daemon.auth("viewer"))
    assert len(got) == 300 and len({e.event_id for e in got}) == 300
    first = got[0]
    assert first.event_id == "rec-0" and first.time.seconds == T0
    assert first.cost_usd > 0 and first.tags == {"team": "a"}  # priced by the price table
    assert first.status == M.CALL_STATUS_OK
    items, cursor = [], None
    while True:
        page = rest(grpc_daemon, "/v1/events", service=service, limit=500,
                    **({"cursor": cursor} if cursor else {}))
        items += page["items"]
        cursor = page["next_cursor"]
        if page["end_of_log"]:
            break
    assert [i["event_id"] for i in items] == [e.event_id for e in got]
    assert [i["offset"] for i in items] == [e.offset for e in got]


def test_reads_match_rest_and_page(grpc_daemon):
    viewer = grpc_daemon.auth("viewer")
    service, client = "grpc-met", stub(grpc_daemon)
    start = T0 + 3600
    post_events(grpc_daemon.collector, calls(service, start, 150))  # 300 s of event time

    def windows() -> list:
        return rest(grpc_daemon, "/v1/metrics/windows", service=service)["series"]

    wait_until(lambda: len(windows()) == 2 and all(len(x["windows"]) >= 3 for x in windows()),
               30, interval=0.3, message="windows did not close")
    expected = rest(grpc_daemon, "/v1/metrics/windows", service=service)
    answer = client.QueryMetrics(M.QueryMetricsRequest(service=service), metadata=viewer)
    assert answer.kind == M.WINDOW_KIND_TUMBLING
    assert [(x.model, x.variant, x.operation, [(w.start_time.ToNanoseconds(),
                                                w.summary["count"]) for w in x.windows])
            for x in answer.series] == \
        [(x["model"], x["variant"], x["operation"],
          [(w["start_ns"], w["summary"]["count"]) for w in x["windows"]])
         for x in expected["series"]]
    bounded = client.QueryMetrics(M.QueryMetricsRequest(
        service=service, model="gpt-4o", start_time=stamp(start + 60),
        end_time=stamp(start + 180)), metadata=viewer)
    assert [w.start_time.seconds for w in bounded.series[0].windows] == \
        [start + 60, start + 120]

    summary = rest(grpc_daemon, "/v1/metrics/summary", service=service)
    analytics = client.GetAnalytics(M.GetAnalyticsRequest(service=service), metadata=viewer)
    assert analytics.totals.calls == summary["totals"]["calls"] > 0
    assert analytics.totals.cost_usd == pytest.approx(summary["totals"]["cost_usd"])
    assert analytics.totals.quality_mean == pytest.approx(0.8)
    assert set(analytics.by_model) == set(summary["by_model"]) == {"gpt-4o", "gpt-4o-mini"}
    assert analytics.by_model["gpt-4o"].calls == summary["by_model"]["gpt-4o"]["calls"]

    page = client.ListEvents(M.ListEventsRequest(service=service, model="gpt-4o",
                                                 page_size=20), metadata=viewer)
    same = rest(grpc_daemon, "/v1/events", service=service, model="gpt-4o", limit=20)
    assert [e.event_id for e in page.events] == [e["event_id"] for e in same["items"]]
    assert page.next_page_token == same["next_cursor"]
    rest_page = client.ListEvents(M.ListEventsRequest(service=service, model="gpt-4o",
                                                      page_size=100,
                                                      page_token=page.next_page_token),
                                  metadata=viewer)
    assert len(page.events) + len(rest_page.events) == 75 and rest_page.end_of_log


def test_findings_match_rest_and_page(grpc_daemon):
    viewer = grpc_daemon.auth("viewer")
    client = SyncStorageClient(grpc_daemon.daemon.runtime)
    try:
        for i in range(5):
            body = {"id": f"f.grpc-find.{i}", "variant": "", "new": True,
                    "kind": "spend_spike", "service": "grpc-find", "model": "gpt-4o",
                    "operation": "chat", "severity": "critical" if i < 2 else "warning",
                    "title": f"t{i}", "detail": "d", "evidence": {"p": 0.001},
                    "window_start_ns": (T0 + 60 * i) * 10 ** 9,
                    "window_end_ns": (T0 + 60 * i + 60) * 10 ** 9}
            client.call(s.DocPut(ns="findings", id=body["id"], body=json.dumps(body).encode()))
    finally:
        client.close()
    metrics = stub(grpc_daemon)
    critical = metrics.ListFindings(M.ListFindingsRequest(
        service="grpc-find", severity=common_pb2.SEVERITY_CRITICAL), metadata=viewer)
    same = rest(grpc_daemon, "/v1/findings", service="grpc-find", severity="critical")
    assert [f.id for f in critical.findings] == [f["id"] for f in same["items"]]
    assert len(critical.findings) == 2 and critical.findings[0].evidence == {"p": 0.001}
    assert critical.findings[0].window_start_time.seconds == T0
    first = metrics.ListFindings(M.ListFindingsRequest(service="grpc-find", page_size=3),
                                 metadata=viewer)
    rest_ = metrics.ListFindings(M.ListFindingsRequest(service="grpc-find", page_size=3,
                                                       page_token=first.next_page_token),
                                 metadata=viewer)
    assert len(first.findings) == 3 and len(rest_.findings) == 2
    assert not rest_.next_page_token


def test_export_pages_as_json_lines_and_csv(grpc_daemon):
    viewer = grpc_daemon.auth("viewer")
    metrics, events = stub(grpc_daemon), M.ListEventsRequest(service="grpc-rec")
    lines, token, pages = [], "", 0
    while True:
        page = metrics.ExportMetrics(M.ExportMetricsRequest(
            dataset=M.ExportMetricsRequest.DATASET_EVENTS, events=events, page_size=120,
            page_token=token), metadata=viewer)
        assert page.content_type == "application/x-ndjson"
        lines += [json.loads(line) for line in page.data.decode().splitlines()]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(lines) == 300 and pages == 3 and lines[0]["event_id"] == "rec-0"
    first = metrics.ExportMetrics(M.ExportMetricsRequest(
        dataset=M.ExportMetricsRequest.DATASET_WINDOWS, format=M.ExportMetricsRequest.FORMAT_CSV,
        windows=M.QueryMetricsRequest(service="grpc-met"), page_size=4), metadata=viewer)
    rows = list(csv.DictReader(io.StringIO(first.data.decode())))
    assert first.content_type == "text/csv" and len(rows) == 4 == first.record_count
    assert json.loads(rows[0]["summary"])["count"] > 0
    second = metrics.ExportMetrics(M.ExportMetricsRequest(
        dataset=M.ExportMetricsRequest.DATASET_WINDOWS, format=M.ExportMetricsRequest.FORMAT_CSV,
        windows=M.QueryMetricsRequest(service="grpc-met"), page_size=100,
        page_token=first.next_page_token), metadata=viewer)
    header = list(rows[0])
    more = list(csv.DictReader(io.StringIO(second.data.decode()), fieldnames=header))
    total = sum(len(x["windows"]) for x in
                rest(grpc_daemon, "/v1/metrics/windows", service="grpc-met")["series"])
    assert len(rows) + len(more) == total and not second.next_page_token
    keys = [(r["start_ns"], r["model"]) for r in rows + more]
    assert keys == sorted(keys) and len(set(keys)) == total


def test_errors_name_the_field_and_credentials_are_needed(grpc_daemon):
    viewer = grpc_daemon.auth("viewer")
    metrics = stub(grpc_daemon)
    with pytest.raises(grpc.RpcError) as err:
        metrics.QueryMetrics(M.QueryMetricsRequest(start_time=stamp(-10)), metadata=viewer)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(err.value) == "start_time"
    with pytest.raises(grpc.RpcError) as err:
        metrics.GetAnalytics(M.GetAnalyticsRequest(), metadata=viewer)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(err.value) == "service"
    with pytest.raises(grpc.RpcError) as err:
        metrics.ListEvents(M.ListEventsRequest(page_token="%%%"), metadata=viewer)
    assert violation(err.value) == "page_token"
    with pytest.raises(grpc.RpcError) as err:
        metrics.ListFindings(M.ListFindingsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        metrics.RecordMetrics(iter([M.RecordMetricsRequest()]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_subscribe_alerts_replays_and_filters(grpc_daemon):
    viewer = grpc_daemon.auth("viewer")
    client = SyncStorageClient(grpc_daemon.daemon.runtime)
    try:
        since = client.call(s.LogInfo(log="optimizer-events")).next_offset

        def finding(i: int, severity: str) -> bytes:
            body = {"id": f"f.alert.{i}", "variant": "", "new": True, "kind": "error_burst",
                    "service": "grpc-alert", "model": "m", "operation": "chat",
                    "severity": severity, "title": f"alert {i}", "detail": "d",
                    "evidence": {"errors": 5.0}, "window_start_ns": T0 * 10 ** 9,
                    "window_end_ns": (T0 + 60) * 10 ** 9}
            return json.dumps({"type": "finding", "id": body["id"], "time_ns": T0 * 10 ** 9,
                               "body": body}).encode()

        rollback = {"kind": "rolled_back", "service": "grpc-alert", "proposal_id": "p1",
                    "reason": "quality dropped", "time_ns": T0 * 10 ** 9}
        client.call(s.LogAppend(log="optimizer-events", records=[
            finding(0, "info"), finding(1, "critical"), finding(1, "critical"),  # appended twice
            json.dumps({"type": "rollout", "id": "p1.rolled_back.0", "time_ns": T0 * 10 ** 9,
                        "body": rollback}).encode(),
            finding(2, "warning")]))
    finally:
        client.close()

    async def read(want: int) -> list[M.Alert]:
        async with grpc_daemon.aio_channel() as channel:
            stream = metrics_pb2_grpc.MetricsServiceStub(channel).SubscribeAlerts(
                M.SubscribeAlertsRequest(service="grpc-alert", include_rollbacks=True,
                                         since_offset=since), metadata=viewer)
            got = []
            async for alert in stream:
                got.append(alert)
                if len(got) == want:
                    stream.cancel()
                    return got
        return got

    alerts = asyncio.run(asyncio.wait_for(read(3), 20))
    assert [(a.finding.id or "rollback", a.severity) for a in alerts] == [
        ("f.alert.1", common_pb2.SEVERITY_CRITICAL), ("rollback", common_pb2.SEVERITY_WARNING),
        ("f.alert.2", common_pb2.SEVERITY_WARNING)]
    assert alerts[0].offset == since + 1 and alerts[1].rollback["proposal_id"] == "p1"


def test_subscribe_metrics_and_cost_send_new_windows(grpc_daemon):
    viewer = grpc_daemon.auth("viewer")
    service, start = "grpc-live", T0 + 7200
    post_events(grpc_daemon.collector, calls(service, start, 60))  # 120 s: the first window closes
    wait_until(lambda: rest(grpc_daemon, "/v1/metrics/windows", service=service)["series"],
               30, interval=0.3, message="no window closed")

    async def read() -> tuple[list[M.MetricsUpdate], list[M.CostUpdate]]:
        async with grpc_daemon.aio_channel() as channel:
            metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
            updates = metrics.SubscribeMetrics(M.SubscribeMetricsRequest(
                service=service, model="gpt-4o"), metadata=viewer)
            costs = metrics.SubscribeCost(M.SubscribeCostRequest(service=service),
                                          metadata=viewer)
            first_update = asyncio.ensure_future(updates.read())
            first_cost = asyncio.ensure_future(costs.read())
            # Windows closed before a stream took its snapshot are not sent: feed three more
            # minutes of event time at a time until both streams have sent a new one.
            pending, batch = {first_update, first_cost}, 0
            while pending:
                later = [dict(e, event_id=f"{service}-later-{batch}-{i}") for i, e in
                         enumerate(calls(service, start + 120 + 180 * batch, 90))]
                await asyncio.to_thread(post_events, grpc_daemon.collector, later)
                batch += 1
                _, pending = await asyncio.wait(pending, timeout=3.0)
            got = [first_update.result(), first_cost.result()]
            updates.cancel()
            costs.cancel()
            return got

    update, cost = asyncio.run(asyncio.wait_for(read(), 40))
    assert update.series.service == service and update.series.model == "gpt-4o"
    assert update.kind == M.WINDOW_KIND_TUMBLING
    assert update.series.windows[0].start_time.seconds >= start + 60
    assert cost.service == service and cost.calls > 0
    assert cost.total_cost_usd == pytest.approx(cost.cost_usd)


def test_record_metrics_ends_with_the_durable_count(grpc_daemon):
    def messages():
        yield M.RecordMetricsRequest(events=[M.LLMCallEvent(
            event_id=f"cut-{i}", time=stamp(T0 + i), service="grpc-cut", model="m",
            input_tokens=1, output_tokens=1, latency_ms=1.0) for i in range(10)])
        yield M.RecordMetricsRequest(feedback=[M.QualityFeedback(event_id="cut-0", quality=1)]
                                     * 10_001)

    with pytest.raises(grpc.RpcError) as err:
        stub(grpc_daemon).RecordMetrics(messages(), metadata=grpc_daemon.auth("viewer"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["x-durable-events"] == "10"
    got = all_events(stub(grpc_daemon), "grpc-cut", 100, grpc_daemon.auth("viewer"))
    assert len(got) == 10
