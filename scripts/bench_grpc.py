#!/usr/bin/env python3
"""gRPC API throughput and latency over real HTTP/2, as grpc.aio clients see it.

Starts optimizerd (storage, collector, processor, the REST API and the gRPC API) in a temp dir,
with the rate limit the gRPC API shares with the REST API (``[rest_api] rate_limit_per_s``,
``rate_limit_burst``) raised so that it does not cap the run, creates an operator API key with
``optimizerctl api-key create``, sets a config for a service through the REST API and seeds
what the streams and the session read, then measures, with clients in several processes:

1. unary: ``ConfigService.ResolveConfig`` (a different key on every call: the call an LLM client
   makes before each request; the REST benchmark's ``resolve``) and ``ConfigService.GetConfig``
   (the plain Get of the current config). Closed loop first (``--concurrency`` calls in flight
   per client process, spread over ``--channels`` HTTP/2 connections: the maximum), then open
   loop at half that rate, latency counted from the *scheduled* send time; then the closed
   loop again from h2load (nghttp2's C load generator, when installed: ``apt-get install
   nghttp2-client``), whose calls' gRPC codes the server's metrics confirm;
2. server streaming: ``OptimizationService.SubscribeOptimizationEvents`` replaying from
   ``since_offset=0`` an ``optimizer-events`` log pre-filled with ``--events`` records appended
   as the processor writes them (JSON ``{"type","id","time_ns","body"}``), one stream, then one
   stream per client process at once; events received per second, counted from the first
   event to the last. The service sends each log read's events in one message (a batch); the
   client counts events, not messages, and reads every event of every message (its offset),
   so it pays for decoding them all; the events per message are reported too. Each is
   measured with bodies as their JSON text (the default) and as ``Struct``
   (``body_format=EVENT_BODY_FORMAT_STRUCT``);
3. bidirectional: ``OptimizationService.OptimizationSession``; each client process opens
   ``--sessions`` sessions and keeps ``--window`` queries in flight on each (pipelined: a new
   query goes out as soon as one answer's ``complete`` arrives). Messages counted: every
   request message sent (one SessionQuery each) plus every response message received (one
   ``suggestion`` per open proposal of the service, ``--proposals``, capped at 5, and one
   ``complete``).

Every measurement also reports the CPU the daemon's processes used (by role, from psutil over
the measurement window) and the CPU of the client processes, so what bounds a figure shows.

    python scripts/bench_grpc.py [--processes 1 2] [--seconds 5] [--clients 2] [--json FILE]

The daemon is always killed at the end, whatever happens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families
from bench_daemon import (argument_parser, create_key, free_port, http, percentile,
                          running)

from ipc import storage as s
from workers.processor.outputs import EVENTS_LOG, PROPOSALS_NS, doc_id
from workers.storage_client import SyncStorageClient

SERVICE = "bench-svc"
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1),  # one connection per channel
                   ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
ROLES = ("grpc_api", "rest_api", "storage", "processor", "collector")


class Daemon:
    def __init__(self, proc: subprocess.Popen, base: str, target: str, runtime: str,
                 admin: str) -> None:
        self.proc, self.base, self.target, self.runtime = proc, base, target, runtime
        self.admin = admin  # the supervisor's /metrics, summed over the processes

    def rpcs(self, method: str) -> dict[str, float]:
        """grpc_api_rpcs for ``method`` by status code, now."""
        status, body = http("GET", self.admin + "/metrics")
        if status != 200:
            raise SystemExit(f"GET /metrics answered {status}")
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "grpc_api_rpcs_total" and sample.labels["method"] == method:
                    found[sample.labels["code"]] = sample.value
        return found

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The daemon's processes by role (their titles are ``optimizerd: <service>...``)."""
        found: dict[str, list[psutil.Process]] = {}
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return found
        for child in [psutil.Process(self.proc.pid), *children]:
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            role = next((r for r in ROLES if r in title), "other")
            found.setdefault(role, []).append(child)
        return found


class CpuWindow:
    """CPU each role of the daemon used while the clients measured, in % of a core: a thread
    samples the processes' CPU times every 0.1 s, and the window is the one the clients report
    (from the latest start to the earliest end), so client start-up and warm-up are left out."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.samples: list[tuple[float, dict[tuple[str, int], float]]] = []
        self.stopping = threading.Event()

    def _times(self) -> dict[tuple[str, int], float]:
        out = {}
        for role, members in self.procs.items():
            for p in members:
                try:
                    t = p.cpu_times()
                    out[(role, p.pid)] = t.user + t.system
                except psutil.Error:
                    pass
        return out

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append((time.time(), self._times()))
            self.stopping.wait(0.1)

    def start(self) -> None:
        self.procs = self.daemon.processes()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self, t0: float, t1: float) -> dict[str, float]:
        self.stopping.set()
        self.thread.join()
        inside = [x for x in self.samples if t0 <= x[0] <= t1] or self.samples[-2:]
        (a, before), (b, after) = inside[0], inside[-1]
        if b <= a:
            return {}
        multi = len(self.procs.get("grpc_api", [])) > 1
        usage: dict[str, float] = {}
        for (role, pid), spent in after.items():
            label = f"grpc_api[{pid}]" if role == "grpc_api" and multi else role
            usage[label] = usage.get(label, 0.0) + spent - before.get((role, pid), spent)
        return {k: round(100 * v / (b - a), 1) for k, v in sorted(usage.items()) if v > 0}


def fmt_cpu(server: dict[str, float], clients: float) -> str:
    parts = [f"{k} {v:.0f}%" for k, v in server.items() if v >= 1]
    return f"CPU: {', '.join(parts)}; clients {clients:.0f}%"


@contextmanager
def daemon(processes: int) -> Iterator[Daemon]:
    """optimizerd with storage, collector, processor, the REST API (one process) and
    ``processes`` gRPC API processes in a temp dir; killed at the end."""
    listen, grpc_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    admin: list[str] = []  # the supervisor's admin URL, from the config

    def configure(doc: dict) -> Callable[[], bool]:
        admin.append(f"http://{doc['admin']['listen']}")
        # the gRPC API shares the REST API's rate limit: raised out of the way
        doc["rest_api"] = {"listen": listen, "processes": 1,
                           "rate_limit_per_s": 10_000_000.0, "rate_limit_burst": 10_000_000,
                           "max_in_flight": 4096}
        doc["grpc_api"] = {"listen": grpc_listen, "processes": processes,
                           "reflection": "off"}
        return lambda: http("GET", base + "/ready")[0] == 200 and _grpc_listening(grpc_listen)

    with running("bench-grpc-", configure) as (proc, runtime):
        d = Daemon(proc, base, grpc_listen, runtime, admin[0])
        deadline = time.monotonic() + 60
        while len(d.processes().get("grpc_api", [])) < processes:
            if time.monotonic() > deadline:
                raise SystemExit(f"fewer than {processes} grpc_api processes came up")
            time.sleep(0.1)
        yield d


def _grpc_listening(listen: str) -> bool:
    host, port = listen.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _proposal(i: int, service: str) -> dict:
    """An open proposal as the processor stores it (its change validates against the config)."""
    return {"id": f"caching:{service}:{i}", "strategy": "caching", "service": service,
            "operation": f"op-{i}", "model": "gpt-4o", "title": f"cache answers of op-{i}",
            "rationale": "30% of the prompts repeat within an hour",
            "expected_impact": {"cost_pct": -12.5, "savings_usd_per_day": 1.0 + i,
                                "quality_delta": -0.01, "latency_delta_ms": None,
                                "error_rate_delta": 0.0, "confidence": 0.9},
            "constraints": {"quality_tolerance": 0.02, "latency_budget_ms": None,
                            "min_samples": 50},
            "change": {"cache": {"enabled": True}}, "needs_experiment": False,
            "evidence": {"repeat_share": 0.3}, "created_ns": 1, "status": "open",
            "status_detail": "", "first_ns": 1_000, "updated_ns": 2_000}


def _event_body(i: int) -> dict:
    """A proposal event's body, as the processor appends it (about 600 bytes of JSON)."""
    return _proposal(i, f"svc-{i % 7}")


def seed(runtime: str, proposals: int, events: int) -> None:
    """``proposals`` open proposals for SERVICE, 50 for other services (read past by the
    session's list call), and ``events`` records in the optimizer-events log."""
    client = SyncStorageClient(runtime)
    try:
        docs = [_proposal(i, SERVICE) for i in range(proposals)]
        docs += [_proposal(i, f"other-{i % 5}") for i in range(50)]
        client.pipeline([s.DocPut(ns=PROPOSALS_NS, id=doc_id("p", d["id"]),
                                  body=json.dumps(d).encode()) for d in docs])
        now = time.time_ns()
        for first in range(0, events, 1000):
            client.call(s.LogAppend(log=EVENTS_LOG, records=[
                json.dumps({"type": "proposal", "id": f"bench-{i}", "time_ns": now + i,
                            "body": _event_body(i)}).encode()
                for i in range(first, min(first + 1000, events))]))
    finally:
        client.close()


# --- clients (each in its own process) ---------------------------------------------------------

def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _unary_call(stubs: list, method: str, md: tuple, i: int):
    from protos.llm_optimizer.v1 import config_pb2
    stub = stubs[i % len(stubs)]
    if method == "ResolveConfig":
        return stub.ResolveConfig(config_pb2.ResolveConfigRequest(service=SERVICE,
                                                                  key=f"user-{i}"),
                                  metadata=md, timeout=30)
    return stub.GetConfig(config_pb2.GetConfigRequest(service=SERVICE), metadata=md,
                          timeout=30)


async def _unary(target: str, key: str, method: str, channels: int, conc: int, seconds: float,
                 rate: float, offset: int) -> dict:
    """Closed loop (rate 0: ``conc`` calls in flight) or open loop at ``rate`` calls/s."""
    import grpc

    from protos.llm_optimizer.v1 import config_pb2_grpc
    md = (("authorization", f"Bearer {key}"),)
    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
             for _ in range(channels)]
    stubs = [config_pb2_grpc.ConfigServiceStub(c) for c in chans]
    done = errors = 0
    codes: dict[str, int] = {}
    latencies: list[float] = []
    await asyncio.gather(*(_unary_call(stubs, method, md, offset + c) for c in range(conc)))

    async def one(i: int, started: float) -> None:
        nonlocal done, errors
        try:
            await _unary_call(stubs, method, md, i)
        except grpc.aio.AioRpcError as exc:
            errors += 1
            codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
            return
        done += 1
        latencies.append(time.perf_counter() - started)

    cpu0, t0, started = _cpu_seconds(), time.time(), time.perf_counter()
    if rate <= 0:
        stop = time.perf_counter() + seconds

        async def loop(c: int) -> None:
            i = offset + c
            while time.perf_counter() < stop:
                await one(i, time.perf_counter())
                i += conc
        await asyncio.gather(*(loop(c) for c in range(conc)))
    else:
        total, start = int(rate * seconds), time.perf_counter() + 0.05
        pending: set[asyncio.Task] = set()
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(offset + i, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    cpu, wall, t1 = _cpu_seconds() - cpu0, time.perf_counter() - started, time.time()
    for c in chans:
        await c.close()
    return {"done": done, "errors": errors, "codes": codes, "latencies": latencies,
            "cpu_s": cpu, "wall_s": wall, "t0": t0, "t1": t1}


async def _stream(target: str, key: str, seconds: float, expect: int, body_format: str
                  ) -> dict:
    """Replay the events log from offset 0 with bodies as ``body_format`` ("struct" or
    "json"); count events until ``expect`` or ``seconds``."""
    import grpc

    from protos.llm_optimizer.v1 import optimization_pb2 as pb
    from protos.llm_optimizer.v1 import optimization_pb2_grpc
    md = (("authorization", f"Bearer {key}"),)
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = optimization_pb2_grpc.OptimizationServiceStub(channel)
    await channel.channel_ready()
    cpu0, t0, started = _cpu_seconds(), time.time(), time.perf_counter()
    call = stub.SubscribeOptimizationEvents(pb.SubscribeOptimizationEventsRequest(
        since_offset=0, body_format=pb.EventBodyFormat.Value(
            f"EVENT_BODY_FORMAT_{body_format.upper()}")), metadata=md)
    count, messages, offset, first, last = 0, 0, -1, 0.0, 0.0
    stop = started + seconds
    try:
        async for message in call:
            for event in message.events:  # every event decoded and looked at
                if event.offset <= offset:
                    raise RuntimeError(f"offset {event.offset} after {offset}")
                offset = event.offset
            count += len(message.events)
            messages += 1
            if messages == 1:
                first = time.perf_counter()
            if count >= expect or time.perf_counter() > stop:
                break
        last = time.perf_counter()
    finally:
        call.cancel()
    cpu = _cpu_seconds() - cpu0
    await channel.close()
    return {"events": count, "messages": messages, "first_s": first - started,
            "span_s": last - first, "cpu_s": cpu, "wall_s": last - started, "t0": t0,
            "t1": time.time()}


async def _session(target: str, key: str, sessions: int, window: int, seconds: float,
                   offset: int) -> dict:
    """``sessions`` OptimizationSessions, each with ``window`` queries in flight."""
    import grpc

    from protos.llm_optimizer.v1 import optimization_pb2 as pb
    from protos.llm_optimizer.v1 import optimization_pb2_grpc
    md = (("authorization", f"Bearer {key}"),)
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = optimization_pb2_grpc.OptimizationServiceStub(channel)
    await channel.channel_ready()
    totals = {"sent": 0, "received": 0, "suggestions": 0, "completes": 0, "errors": 0}
    latencies: list[float] = []

    async def one(n: int) -> None:
        call = stub.OptimizationSession(metadata=md)
        sent_at: dict[str, float] = {}
        seq = 0

        async def send() -> None:
            nonlocal seq
            qid = f"{offset}-{n}-{seq}"
            seq += 1
            sent_at[qid] = time.perf_counter()
            await call.write(pb.SessionRequest(query=pb.SessionQuery(query_id=qid,
                                                                     service=SERVICE)))
            totals["sent"] += 1

        for _ in range(window):
            await send()
        stop = time.perf_counter() + seconds
        while sent_at:
            answer = await call.read()
            if answer is grpc.aio.EOF:
                break
            totals["received"] += 1
            kind = answer.WhichOneof("kind")
            if kind == "suggestion":
                totals["suggestions"] += 1
                continue
            if kind == "error":
                totals["errors"] += 1
                qid = answer.error.query_id
            else:
                totals["completes"] += 1
                qid = answer.complete.query_id
            latencies.append(time.perf_counter() - sent_at.pop(qid))
            if time.perf_counter() < stop:
                await send()
        await call.done_writing()
        call.cancel()

    # one query each to open the connection and warm the path up
    warm = stub.OptimizationSession(iter([pb.SessionRequest(query=pb.SessionQuery(
        query_id="warm", service=SERVICE))]), metadata=md)
    async for _answer in warm:
        pass
    cpu0, t0, started = _cpu_seconds(), time.time(), time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(sessions)))
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu0
    await channel.close()
    return {**totals, "latencies": latencies, "wall_s": wall, "cpu_s": cpu, "t0": t0,
            "t1": t0 + wall}


def _client(kind: str, args: tuple, out: mp.Queue) -> None:
    runner = {"unary": _unary, "stream": _stream, "session": _session}[kind]
    try:
        out.put(("ok", asyncio.run(runner(*args))))
    except Exception as exc:  # reported by the parent
        out.put(("error", repr(exc)))


def run_clients(kind: str, arglists: list[tuple], seconds: float) -> list[dict]:
    """The results of one client process per argument tuple (spawned: no gRPC state is
    inherited)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(kind, a, out), daemon=True) for a in arglists]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 180) for _ in procs]
    for p in procs:
        p.join(10)
    for status, value in results:
        if status != "ok":
            raise SystemExit(f"a {kind} client failed: {value}")
    return [value for _, value in results]


def measure(d: Daemon, kind: str, arglists: list[tuple], seconds: float
            ) -> tuple[list[dict], dict[str, float]]:
    """The clients' results, and the CPU the daemon used while all of them were measuring."""
    cpu = CpuWindow(d)
    cpu.start()
    results = run_clients(kind, arglists, seconds)
    return results, cpu.stop(*window(results))


def window(results: list[dict]) -> tuple[float, float]:
    """When all clients were measuring: from the latest start to the earliest end."""
    return max(r["t0"] for r in results), min(r["t1"] for r in results)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the measurements --------------------------------------------------------------------------

def h2load_unary(d: Daemon, key: str, method: str, opts: argparse.Namespace) -> dict:
    """Closed loop from h2load, nghttp2's HTTP/2 load generator in C, with as many calls in
    flight as the Python clients over ``--h2load-connections`` connections (enough for
    SO_REUSEPORT to spread them evenly over the processes): it needs a fraction of the Python
    clients' CPU, which leaves the server more of the 2 cores. It repeats one request
    (ResolveConfig: one key; resolving
    costs the same for any key) and sees HTTP only (every gRPC answer is HTTP 200), so the calls'
    gRPC status codes are read from the server's ``grpc_api_rpcs`` counter around the run."""
    from protos.llm_optimizer.v1 import config_pb2
    full = f"/llm_optimizer.v1.ConfigService/{method}"
    request = (config_pb2.ResolveConfigRequest(service=SERVICE, key="user-1")
               if method == "ResolveConfig" else config_pb2.GetConfigRequest(service=SERVICE))
    encoded = request.SerializeToString()
    warm_up = 1.0
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(b"\0" + len(encoded).to_bytes(4, "big") + encoded)  # one gRPC frame
        body.flush()
        before = d.rpcs(full)
        cpu = CpuWindow(d)
        cpu.start()
        children0, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        out = subprocess.run(
            ["h2load", f"--warm-up-time={warm_up:g}", "-D", f"{opts.seconds:g}", "-t", "1",
             "-c", str(opts.h2load_connections),
             "-m", str(max(opts.clients * opts.concurrency // opts.h2load_connections, 1)),
             "-d", body.name,
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", f"authorization: Bearer {key}", f"http://{d.target}{full}"],
            capture_output=True, text=True, timeout=opts.seconds + 60)
        ended, children1 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        server = cpu.stop(started + warm_up, ended)
        after = d.rpcs(full)
    finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out.stdout)
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out.stdout)
    if out.returncode != 0 or finished is None or counts is None:
        raise SystemExit(f"h2load failed ({out.returncode}): {out.stderr[-500:]}")
    codes = {code: int(after.get(code, 0) - before.get(code, 0)) for code in after}
    client_cpu = (children1.ru_utime + children1.ru_stime - children0.ru_utime
                  - children0.ru_stime) / (ended - started)
    return {"h2load_rps": float(finished.group(2)), "h2load_ok": int(counts.group(1)),
            "h2load_http_failed": int(counts.group(2)) + int(counts.group(3)),
            "h2load_server_codes": {code: n for code, n in codes.items() if n},
            "h2load_server_cpu": server, "h2load_client_cpu": round(100 * client_cpu, 1)}


def bench_unary(d: Daemon, key: str, method: str, opts: argparse.Namespace) -> dict:
    row: dict = {"processes": opts.current, "measure": "unary", "method": method}
    for mode in ("closed", "open"):
        rate = 0.0 if mode == "closed" else row["max_rps"] / 2
        results, server = measure(d, "unary", [
            (d.target, key, method, opts.channels, opts.concurrency, opts.seconds,
             rate / opts.clients, c * 10_000_000) for c in range(opts.clients)], opts.seconds)
        done = sum(r["done"] for r in results)
        errors = sum(r["errors"] for r in results)
        codes: dict[str, int] = {}
        for r in results:
            for code, n in r["codes"].items():
                codes[code] = codes.get(code, 0) + n
        lat = [x for r in results for x in r["latencies"]]
        client_cpu = sum(100 * r["cpu_s"] / r["wall_s"] for r in results)
        if mode == "closed":
            row.update({"max_rps": done / opts.seconds})
        else:
            row.update({"open_rate": rate, "open_done": done})
        row.update({f"{mode}_errors": errors, f"{mode}_codes": codes,
                    f"{mode}_p50_ms": percentile(lat, 0.5) * 1e3,
                    f"{mode}_p99_ms": percentile(lat, 0.99) * 1e3,
                    f"{mode}_server_cpu": server, f"{mode}_client_cpu": round(client_cpu, 1)})
    print(f"grpc_api processes={opts.current} unary {method}: closed {row['max_rps']:8.0f} "
          f"calls/s (p50 {row['closed_p50_ms']:.1f} ms, p99 {row['closed_p99_ms']:.1f} ms, "
          f"{row['closed_errors']} errors {row['closed_codes'] or ''}) | open at "
          f"{row['open_rate']:.0f} calls/s: p50 {row['open_p50_ms']:.2f} ms, p99 "
          f"{row['open_p99_ms']:.2f} ms ({row['open_done']} ok, {row['open_errors']} errors)",
          flush=True)
    print(f"    closed loop {fmt_cpu(row['closed_server_cpu'], row['closed_client_cpu'])}",
          flush=True)
    if shutil.which("h2load") is None:
        print("    h2load is not installed (apt-get install nghttp2-client): no C-client figure",
              flush=True)
        return row
    row.update(h2load_unary(d, key, method, opts))
    print(f"    h2load closed loop {row['h2load_rps']:8.0f} calls/s ({row['h2load_ok']} answered "
          f"HTTP 200, {row['h2load_http_failed']} not; gRPC codes counted by the server, "
          f"warm-up included: {row['h2load_server_codes']}); "
          f"{fmt_cpu(row['h2load_server_cpu'], row['h2load_client_cpu'])}", flush=True)
    return row


def bench_stream(d: Daemon, key: str, streams: int, body_format: str,
                 opts: argparse.Namespace) -> dict:
    results, server = measure(d, "stream", [
        (d.target, key, opts.seconds, opts.events, body_format) for _ in range(streams)],
        opts.seconds)
    per_stream = [r["events"] / r["span_s"] if r["span_s"] > 0 else 0.0 for r in results]
    row = {"processes": opts.current, "measure": "stream", "streams": streams,
           "body_format": body_format,
           "events": sum(r["events"] for r in results),
           "messages": sum(r["messages"] for r in results),
           "events_per_s": sum(per_stream), "per_stream": [round(x) for x in per_stream],
           "first_event_ms": max(r["first_s"] for r in results) * 1e3,
           "server_cpu": server,
           "client_cpu": round(sum(100 * r["cpu_s"] / r["wall_s"] for r in results), 1)}
    print(f"grpc_api processes={opts.current} stream x{streams}, {body_format} bodies: "
          f"{row['events_per_s']:8.0f} "
          f"events/s ({row['events']} events in {row['messages']} messages, "
          f"{row['events'] / max(row['messages'], 1):.0f} per message; per stream "
          f"{row['per_stream']}; first after {row['first_event_ms']:.0f} ms)", flush=True)
    print(f"    {fmt_cpu(server, row['client_cpu'])}", flush=True)
    return row


def bench_session(d: Daemon, key: str, opts: argparse.Namespace) -> dict:
    results, server = measure(d, "session", [
        (d.target, key, opts.sessions, opts.window, opts.seconds, c)
        for c in range(opts.clients)], opts.seconds)
    wall = max(r["wall_s"] for r in results)
    total = {k: sum(r[k] for r in results)
             for k in ("sent", "received", "suggestions", "completes", "errors")}
    lat = [x for r in results for x in r["latencies"]]
    row = {"processes": opts.current, "measure": "session", **total,
           "messages_per_s": (total["sent"] + total["received"]) / wall,
           "queries_per_s": total["completes"] / wall,
           "query_p50_ms": percentile(lat, 0.5) * 1e3,
           "query_p99_ms": percentile(lat, 0.99) * 1e3, "server_cpu": server,
           "client_cpu": round(100 * sum(r["cpu_s"] for r in results) / wall, 1)}
    print(f"grpc_api processes={opts.current} session: {row['messages_per_s']:8.0f} messages/s "
          f"({total['sent']} queries sent + {total['received']} answers received in "
          f"{wall:.1f} s; {row['queries_per_s']:.0f} queries/s, "
          f"{total['suggestions'] / max(total['completes'], 1):.1f} suggestions each; query "
          f"p50 {row['query_p50_ms']:.1f} ms, p99 {row['query_p99_ms']:.1f} ms with "
          f"{opts.window} in flight per session; {total['errors']} errors)", flush=True)
    print(f"    {fmt_cpu(server, row['client_cpu'])}", flush=True)
    return row


def bench(processes: int, opts: argparse.Namespace) -> list[dict]:
    opts.current = processes
    rows = []
    print(f"--- grpc_api processes={processes}; load average {loadavg()}", flush=True)
    with daemon(processes) as d:
        key = create_key(d.runtime, "operator")
        started = time.perf_counter()
        seed(d.runtime, opts.proposals, opts.events)
        print(f"seeded {opts.proposals} open proposals for {SERVICE!r} and {opts.events} "
              f"events in {time.perf_counter() - started:.1f} s", flush=True)
        status, body = http("PUT", f"{d.base}/v1/config/{SERVICE}", key,
                            {"expected_version": 0,
                             "config": {"model": "gpt-4o", "parameters": {"temperature": 0.2}}})
        if status not in (200, 201):
            raise SystemExit(f"PUT config answered {status}: {body[:300]!r}")
        for method in opts.unary:
            rows.append(bench_unary(d, key, method, opts))
        if "stream" in opts.only:
            for streams in sorted({1, opts.clients}):
                for body_format in opts.body_formats:
                    rows.append(bench_stream(d, key, streams, body_format, opts))
        if "session" in opts.only:
            rows.append(bench_session(d, key, opts))
    return rows


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0], "grpc_api")
    parser.add_argument("--channels", type=int, default=4,
                        help="unary: HTTP/2 connections per client process")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="unary: calls in flight per client process")
    parser.add_argument("--h2load-connections", type=int, default=32,
                        help="unary, h2load: HTTP/2 connections (calls in flight as the Python "
                             "clients': --clients x --concurrency)")
    parser.add_argument("--unary", nargs="*", default=["ResolveConfig", "GetConfig"],
                        choices=["ResolveConfig", "GetConfig"], help="unary RPCs to measure")
    parser.add_argument("--events", type=int, default=200_000,
                        help="stream: records pre-filled in the optimizer-events log")
    parser.add_argument("--body-formats", nargs="+", default=["json", "struct"],
                        choices=["json", "struct"],
                        help="stream: event bodies as their JSON text (the default) and/or as "
                             "Structs")
    parser.add_argument("--sessions", type=int, default=4,
                        help="bidirectional: sessions per client process")
    parser.add_argument("--window", type=int, default=8,
                        help="bidirectional: queries in flight per session")
    parser.add_argument("--proposals", type=int, default=5,
                        help="open proposals of the service (suggestions per answer, max 5)")
    parser.add_argument("--only", nargs="+", default=["stream", "session"],
                        choices=["stream", "session"],
                        help="which of the streaming measurements to run")
    opts = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {opts.clients} client processes; unary: {opts.channels} "
          f"channels x {opts.concurrency} calls in flight each; {opts.seconds:g} s per "
          f"measurement", flush=True)
    rows = []
    for processes in opts.processes:
        rows += bench(processes, opts)
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
