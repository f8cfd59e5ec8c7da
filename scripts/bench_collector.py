#!/usr/bin/env python3
"""Collector ingest: events/s accepted end to end to durable storage, and acknowledgment latency.

Events/s accepted end-to-end to durable storage over OTLP/HTTP and JSON with concurrent
clients, and from Kafka. Target on this machine: >= 30,000 events/s over JSON batches and
>= 15,000 spans/s over OTLP/HTTP protobuf with p99 acknowledgment <= 50 ms at half that rate.

    python scripts/bench_collector.py [--quick] [--only json|otlp|kafka]

For JSON and OTLP, optimizerd runs with storage (LevelDB, fsync on) and the collector only, in
a temp dir on free ports (``scripts/bench_storage.daemon``). Load comes from client processes
(multiprocessing, spawn), each an asyncio loop with one aiohttp ClientSession:

- max throughput: closed loop, every client keeps ``--in-flight`` requests outstanding for a
  fixed duration; events/s = the ``accepted`` counts of 200 answers (for OTLP: spans sent in
  200 answers without partial_success rejections) over the elapsed time;
- latency: open loop paced at half the measured max rate (and at a tenth of it, and at half
  the target rate), requests sent at fixed times whether or not earlier ones were answered;
  latency runs from the scheduled send time to the answer read (so a client running late
  counts against the collector, no coordinated omission).

Bodies are encoded once per client: JSON batches of ``--batch`` events, OTLP
ExportTraceServiceRequest protobuf with ``--spans`` gen_ai spans; ids are varied per request
by a same-length byte replacement. At the end the event log's length (``LogInfo`` of
``llm-events``) must equal the events acknowledged.

Kafka: N events are produced to a topic of librdkafka's mock cluster (a separate process,
tests/storage/kafka_support.py) first, spread evenly over its 4 partitions, then the daemon
starts with ``[collector.kafka]``; the rate is measured from the first event in the log to the
N-th (the group's first join, ~3 s on the mock, is reported apart). The mock cluster keeps at
most 5 MiB per partition (older records are deleted, as by a real broker's retention), so N is
limited to what it retains (80,000 events fit); the script checks that every partition still
starts at offset 0 and holds all its records before the daemon starts.

Every process started here (daemon, clients, mock cluster) is killed at the end, also after an
error, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import struct
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_storage import daemon, free_port, percentile  # noqa: E402

EVENT_LOG = "llm-events"
JSON_MARK = b"@@@@@@@@@@@@"      # replaced per request: 12 ASCII characters
OTLP_MARK = b"QZQZQZQZ"          # replaced per request: the first 8 bytes of every trace id
TARGETS = {"json": 30_000, "otlp": 15_000}
P99_TARGET = 0.050
STALL_SECONDS = 15.0  # Kafka: no new event in the log for this long ends the wait
MOCK_PARTITIONS = 4  # of a topic the mock cluster creates


# --- bodies ----------------------------------------------------------------------------------

def json_body(batch: int) -> bytes:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    events = [{"event_id": f"{JSON_MARK.decode()}-{i}", "time": now, "service": "support-bot",
               "model": "gpt-4o", "provider": "openai", "operation": "chat",
               "input_tokens": 1200 + i, "output_tokens": 300, "latency_ms": 850.5,
               "ttft_ms": 120.0, "status": "ok", "tags": {"team": "search"}}
              for i in range(batch)]
    return json.dumps({"events": events}).encode()


def otlp_body(spans: int) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    def kv(key, value):
        v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
        return KeyValue(key=key, value=v)

    attrs = [kv("gen_ai.operation.name", "chat"), kv("gen_ai.system", "openai"),
             kv("gen_ai.request.model", "gpt-4o"), kv("gen_ai.response.model", "gpt-4o"),
             kv("gen_ai.usage.input_tokens", 1200), kv("gen_ai.usage.output_tokens", 300)]
    end = time.time_ns()
    scope = ScopeSpans()
    for i in range(spans):
        scope.spans.append(Span(
            trace_id=OTLP_MARK + struct.pack(">Q", i), span_id=struct.pack(">Q", i + 1),
            name="chat gpt-4o", kind=Span.SPAN_KIND_CLIENT, attributes=attrs,
            start_time_unix_nano=end - 850_000_000 - i, end_time_unix_nano=end - i))
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[kv("service.name", "support-bot")]),
        scope_spans=[scope])])
    return request.SerializeToString()


# --- client processes ------------------------------------------------------------------------

def client_main(kind: str, url: str, n_items: int, client_id: int, mode: str, start_at: float,
                seconds: float, in_flight: int, interval: float, offset: float,
                results: mp.Queue) -> None:
    """One load-generating process: ``mode`` "max" (closed loop) or "paced" (open loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    try:
        results.put(asyncio.run(client_loop(kind, url, n_items, client_id, mode, start_at,
                                            seconds, in_flight, interval, offset)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put({"error": f"client {client_id}: {exc!r}"})


async def client_loop(kind: str, url: str, n_items: int, client_id: int, mode: str,
                      start_at: float, seconds: float, in_flight: int, interval: float,
                      offset: float) -> dict:
    import aiohttp

    if kind == "json":
        template, mark, ctype = json_body(n_items), JSON_MARK, "application/json"
        path = "/v1/events"
    else:
        template, mark, ctype = otlp_body(n_items), OTLP_MARK, "application/x-protobuf"
        path = "/v1/traces"
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )
    seq = 0

    def next_body() -> bytes:
        nonlocal seq
        seq += 1
        if kind == "json":
            tag = f"c{client_id:02d}r{seq:08d}"[:12].encode()
        else:
            tag = struct.pack(">HIH", client_id + 1, seq, mode == "paced")
        return template.replace(mark, tag)

    stats = {"accepted": 0, "ok": 0, "refused": 0, "failed": 0, "latencies": [],
             "first": None, "last": 0.0, "errors": []}

    async def one(session, body: bytes, t0: float) -> None:
        try:
            async with session.post(url + path, data=body,
                                    headers={"Content-Type": ctype}) as r:
                answer = await r.read()
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats["failed"] += 1
            stats["errors"].append(repr(exc)[:200])
            return
        done = time.time()
        if status != 200:
            stats["refused" if status == 503 else "failed"] += 1
            if status != 503:
                stats["errors"].append(f"{status}: {answer[:200]!r}")
            return
        if kind == "json":
            accepted = json.loads(answer)["accepted"]
        else:
            partial = ExportTraceServiceResponse.FromString(answer).partial_success
            accepted = n_items - partial.rejected_spans
        stats["accepted"] += accepted
        stats["ok"] += 1
        stats["last"] = max(stats["last"], done)
        stats["latencies"].append(done - t0)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Open the connections before the clock starts.
        await asyncio.gather(*(session.get(url + "/health") for _ in range(in_flight)))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stats["first"] = time.time()
        end = start_at + seconds
        if mode == "max":
            async def lane() -> None:
                while time.time() < end:
                    await one(session, next_body(), time.time())
            await asyncio.gather(*(lane() for _ in range(in_flight)))
        else:
            tasks, k = [], 0
            while True:
                due = start_at + offset + k * interval
                if due >= end:
                    break
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(session, next_body(), due)))
                k += 1
            await asyncio.gather(*tasks)
    stats["errors"] = stats["errors"][:5]
    return stats


class Clients:
    """Client processes of one run, always killed at the end."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.procs: list = []

    def run(self, kind: str, url: str, n_items: int, mode: str, n_clients: int, seconds: float,
            in_flight: int = 1, rate: float = 0.0) -> dict:
        results = self.ctx.Queue()
        start_at = time.time() + 3.0  # spawn, imports, bodies and connections before this
        interval = n_clients * n_items / rate if rate else 0.0  # per client, between requests
        self.procs = [self.ctx.Process(
            target=client_main, daemon=True,
            args=(kind, url, n_items, i, mode, start_at, seconds, in_flight, interval,
                  interval * i / n_clients, results)) for i in range(n_clients)]
        for p in self.procs:
            p.start()
        try:
            out = [results.get(timeout=seconds + 120) for _ in self.procs]
        finally:
            self.kill()
        errors = [o["error"] for o in out if "error" in o]
        if errors:
            raise RuntimeError("; ".join(errors))
        last = max(o["last"] for o in out) or time.time()
        total = {k: sum(o[k] for o in out) for k in ("accepted", "ok", "refused", "failed")}
        total["latencies"] = [x for o in out for x in o["latencies"]]
        total["errors"] = [e for o in out for e in o["errors"]][:5]
        total["elapsed"] = max(1e-9, (last if mode == "max" else start_at + seconds) - start_at)
        total["rate"] = total["accepted"] / total["elapsed"]
        return total

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
        self.procs = []


# --- runs ------------------------------------------------------------------------------------

def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the collector did not answer on {url}/health")
        time.sleep(0.1)


def ingest_buckets(admin: str, source: str) -> dict[float, float]:
    """collector_ingest_seconds (arrival to durable, in the daemon) cumulative buckets."""
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("collector_ingest_seconds_bucket{") and f'source="{source}"' in line:
            labels, value = line.rsplit(" ", 1)
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(value)
    return buckets


def server_summary(before: dict, after: dict) -> str:
    """Share of requests durable within 50 ms in the daemon, and the bucket holding the p99."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in sorted(after)}
    total = delta.get(float("inf"), 0)
    if not total:
        return "no server-side samples"
    p99 = next(le for le, n in delta.items() if n >= 0.99 * total)
    p50 = next(le for le, n in delta.items() if n >= 0.5 * total)
    return (f"in the daemon (arrival -> durable): {delta.get(0.05, 0) / total:.1%} within 50 ms, "
            f"p50 <= {p50 * 1e3:g} ms, p99 <= {p99 * 1e3:g} ms")


def log_length(client) -> int:
    from ipc import storage as s

    state = client.call(s.LogInfo(log=EVENT_LOG))
    return state.next_offset - state.first_offset


def run_http(kind: str, args, clients: Clients) -> list[dict]:
    listen = f"127.0.0.1:{free_port()}"
    url = f"http://{listen}"
    n_items = args.batch if kind == "json" else args.spans
    collector = {"listen": listen, "otlp_grpc_listen": f"127.0.0.1:{free_port()}",
                 "processes": args.collector_processes}
    admin = f"127.0.0.1:{free_port()}"
    source = "json" if kind == "json" else "otlp_http"
    rows = []
    with daemon({"backend": "leveldb"}, sections={"collector": collector,
                                                  "admin": {"listen": admin}},
                prefix="bench-collector-") as storage:
        admin = f"http://{admin}"
        wait_http(url)
        acked = 0
        # Warm-up (not reported): imports, caches, LevelDB's first files.
        warm = clients.run(kind, url, n_items, "max", args.clients, 1.0 if args.quick else 2.0,
                           in_flight=args.in_flight)
        acked += warm["accepted"]
        top = clients.run(kind, url, n_items, "max", args.clients, args.seconds,
                          in_flight=args.in_flight)
        acked += top["accepted"]
        lat = top["latencies"]
        rows.append({"kind": kind, "load": f"max, {args.clients}x{args.in_flight} in flight",
                     "rate": top["rate"], "p50": percentile(lat, .5) if lat else None,
                     "p99": percentile(lat, .99) if lat else None, "run": top})
        # Half the measured max (the stricter reading of the target), a tenth of it (service
        # time without queueing), and half the target rate (the target's own words).
        for rate, label in ((top["rate"] / 2, "half"), (top["rate"] / 10, "a tenth"),
                            (TARGETS[kind] / 2, "half the target")):
            before = ingest_buckets(admin, source)
            paced = clients.run(kind, url, n_items, "paced", args.clients, args.seconds,
                                rate=rate)
            paced["server"] = server_summary(before, ingest_buckets(admin, source))
            acked += paced["accepted"]
            lat = paced["latencies"]
            rows.append({"kind": kind, "load": f"paced at {rate:,.0f}/s ({label})",
                         "rate": paced["rate"], "p50": percentile(lat, .5) if lat else None,
                         "p99": percentile(lat, .99) if lat else None, "run": paced})
        length = log_length(storage)
        for row in rows:
            row["log_check"] = (length, acked)
        if length != acked:
            print(f"!! {kind}: event log has {length} records, {acked} were acknowledged",
                  flush=True)
    return rows


def check_retained(bootstrap: str, topic: str, n: int) -> None:
    """Fail unless the topic still holds all ``n`` records from offset 0: the mock cluster
    deletes a partition's oldest records beyond 5 MiB, and those cannot be ingested."""
    import confluent_kafka

    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-check"})
    try:
        marks = [consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, p),
                                                timeout=10) for p in range(MOCK_PARTITIONS)]
    finally:
        consumer.close()
    if any(low != 0 for low, _ in marks) or sum(high for _, high in marks) != n:
        raise RuntimeError(f"the mock cluster did not retain all {n:,} records (partition "
                           f"watermarks {marks}); use fewer --kafka-events")


def run_kafka(args) -> list[dict]:
    import confluent_kafka

    from tests.storage.kafka_support import MockCluster

    n = args.kafka_events
    rows = []
    cluster = MockCluster.start()
    try:
        topic = "bench-calls"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        producer = confluent_kafka.Producer({"bootstrap.servers": cluster.bootstrap,
                                             "linger.ms": 20, "batch.num.messages": 10000})
        template = json.dumps({"event_id": "@", "time": now, "service": "support-bot",
                               "model": "gpt-4o", "provider": "openai", "input_tokens": 1200,
                               "output_tokens": 300, "latency_ms": 850.5})
        head, tail = template.split('"@"')
        failed = []
        t0 = time.perf_counter()
        for i in range(n):
            while True:
                try:
                    producer.produce(topic, value=f'{head}"k-{i}"{tail}'.encode(),
                                     partition=i % MOCK_PARTITIONS,
                                     on_delivery=lambda err, _m: err and failed.append(err))
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(60) != 0 or failed:
            raise RuntimeError(f"produce failed: {failed[:3]}")
        produce_s = time.perf_counter() - t0
        del producer  # before the cluster goes away, or it logs its disconnections
        check_retained(cluster.bootstrap, topic, n)
        kafka = {"enabled": True, "bootstrap_servers": cluster.bootstrap, "topic": topic,
                 "group_id": "bench-collector", "value_format": "json",
                 "client_options": {"heartbeat.interval.ms": "200",
                                    "session.timeout.ms": "4000"}}
        collector = {"listen": f"127.0.0.1:{free_port()}",
                     "otlp_grpc_listen": f"127.0.0.1:{free_port()}", "kafka": kafka}
        started = time.perf_counter()
        with daemon({"backend": "leveldb"}, sections={"collector": collector},
                    prefix="bench-collector-") as storage:
            first = last = None
            length, progress = 0, (time.perf_counter(), 0)
            while length < n:
                length = log_length(storage)
                now_t = time.perf_counter()
                if length and first is None:
                    first = (now_t, length)
                if length >= n:
                    last = now_t
                    break
                if length != progress[1]:
                    progress = (now_t, length)
                elif now_t - progress[0] > (30 if first is None else STALL_SECONDS):
                    raise RuntimeError(f"Kafka ingest stalled: {length:,} of {n:,} events in "
                                       f"the log, none more for {now_t - progress[0]:.0f} s")
                time.sleep(0.02)
            time.sleep(0.5)
            final = log_length(storage)
        steady = (n - first[1]) / max(1e-9, last - first[0])
        rows.append({"kind": "kafka", "load": f"{n:,} records, mock cluster",
                     "rate": steady, "p50": None, "p99": None,
                     "run": {"to_first": first[0] - started, "total": last - started,
                             "produce_s": produce_s},
                     "log_check": (final, n)})
    finally:
        cluster.stop()
    return rows


# --- main ------------------------------------------------------------------------------------

def verdict(row: dict) -> str:
    p99 = row["p99"]
    met = p99 is not None and p99 <= P99_TARGET
    return f"{(p99 or 0) * 1e3:.1f} ms ({'met' if met else 'MISSED'})"


def on_sigterm(_signum, _frame):
    raise KeyboardInterrupt


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer Kafka events")
    parser.add_argument("--only", choices=("json", "otlp", "kafka"), action="append",
                        help="run only this part (repeatable)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (4)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="requests outstanding per client at max throughput (4)")
    parser.add_argument("--batch", type=int, default=500, help="events per JSON request (500)")
    parser.add_argument("--spans", type=int, default=512, help="spans per OTLP request (512)")
    parser.add_argument("--seconds", type=float, help="duration of each measured run (10; 4)")
    parser.add_argument("--kafka-events", type=int, help="events produced to Kafka (80k; 40k)")
    parser.add_argument("--collector-processes", type=int, default=1,
                        help="[collector] processes (1)")
    args = parser.parse_args()
    args.seconds = args.seconds or (4.0 if args.quick else 10.0)
    args.kafka_events = args.kafka_events or (40_000 if args.quick else 80_000)
    parts = args.only or ["json", "otlp", "kafka"]
    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"collector benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"LevelDB fsync on, collector processes {args.collector_processes}, "
          f"{args.clients} client processes; loadavg {loadavg()}", flush=True)
    clients = Clients()
    rows: list[dict] = []
    failures: list[str] = []
    try:
        for part in parts:
            print(f"-- {part} ...", flush=True)
            try:
                rows += run_kafka(args) if part == "kafka" else run_http(part, args, clients)
            except (RuntimeError, OSError) as exc:
                failures.append(f"{part}: {exc}")
                print(f"!! {part} failed: {exc}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        clients.kill()
    print(f"loadavg after: {loadavg()}")
    print()
    print(f"{'path':<6} {'load':<32} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'ok':>6} {'503':>5} {'err':>4}  log = acked")
    for r in rows:
        run = r["run"]
        p50 = f"{r['p50'] * 1e3:8.1f}" if r["p50"] is not None else f"{'-':>8}"
        p99 = f"{r['p99'] * 1e3:8.1f}" if r["p99"] is not None else f"{'-':>8}"
        length, acked = r["log_check"]
        check = f"{length:,} {'=' if length == acked else '!='} {acked:,}"
        ok = run.get("ok", "-")
        print(f"{r['kind']:<6} {r['load']:<32} {r['rate']:>10,.0f} {p50} {p99} "
              f"{ok:>6} {run.get('refused', '-'):>5} {run.get('failed', '-'):>4}  {check}")
        if "server" in run:
            print(f"       {run['server']}")
        for e in run.get("errors", []):
            print(f"       error: {e}")
        if r["kind"] == "kafka":
            print(f"       produce {run['produce_s']:.1f} s; daemon start to first event in "
                  f"the log {run['to_first']:.1f} s (group join), to all {run['total']:.1f} s; "
                  f"events/s from the first to the last")
    print()
    for kind, target in TARGETS.items():
        got = [r for r in rows if r["kind"] == kind]
        if len(got) >= 4:
            top, half, target_half = got[0], got[1], got[3]
            print(f"{kind}: max {top['rate']:,.0f}/s vs target {target:,}/s "
                  f"({'met' if top['rate'] >= target else 'MISSED'}); p99 vs "
                  f"{P99_TARGET * 1e3:.0f} ms: at half the max {verdict(half)}, at half the "
                  f"target rate ({target // 2:,}/s) {verdict(target_half)}")
    for failure in failures:
        print(f"FAILED {failure}")
    print("events/s: events (OTLP: spans) in 200 answers over the run; latency: request "
          "scheduled -> answer read, at the client; log = acked: LogInfo(llm-events) length "
          "vs events acknowledged (warm-up included)")


if __name__ == "__main__":
    main()
