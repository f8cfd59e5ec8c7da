#!/usr/bin/env python3
"""REST API throughput and latency over real HTTP, as API clients see it.

Starts optimizerd (storage, collector, processor and the REST API) in a temp dir, with the REST rate
limit raised so that it does not cap the run, creates an API key, sets a config for a service
through the API, then measures two operations with aiohttp clients in several processes:

* ``GET /v1/config/{service}/resolve?key=...`` with a different key every request;
* ``GET /v1/optimizations?limit=20``, an authenticated list call over 60 proposal documents
  seeded as the processor writes them (answers come from the per-process response cache,
  ``[rest_api] cache_ttl_s``: each process reads storage once a second).

Each is measured closed loop first (every client connection sends its next request as soon as
the previous answer is in: the maximum throughput), then open loop at half that rate: requests
are sent on a fixed schedule and latency counts from the *scheduled* send time, so a server
that falls behind is not hidden by clients that wait for it (no coordinated omission).

    python scripts/bench_rest.py [--processes 1 2] [--seconds 5] [--clients 2] [--conns 32]

The daemon is always killed at the end, whatever happens.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_daemon import (argument_parser, create_key, free_port, http, percentile,
                          running)

from ipc import storage as s
from workers.processor.outputs import PROPOSALS_NS, doc_id
from workers.storage_client import SyncStorageClient

SERVICE = "bench-svc"


@contextmanager
def daemon(processes: int) -> Iterator[tuple[str, str]]:
    """optimizerd with storage, collector, processor and ``processes`` REST API processes in a
    temp dir; yields (base URL, runtime dir) and is killed at the end."""
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"

    def configure(doc: dict) -> Callable[[], bool]:
        doc["rest_api"] = {"listen": listen, "processes": processes,
                           "rate_limit_per_s": 1_000_000.0, "rate_limit_burst": 1_000_000,
                           "max_in_flight": 4096}
        doc["grpc_api"] = {"enabled": False}
        return lambda: http("GET", base + "/ready")[0] == 200

    with running("bench-rest-", configure) as (_proc, runtime):
        yield base, runtime


def seed_optimizations(runtime: str, count: int) -> None:
    """Proposal documents as the processor writes them, so that the list call reads a full
    page (an empty namespace would flatter it)."""
    client = SyncStorageClient(runtime)
    try:
        client.pipeline([s.DocPut(ns=PROPOSALS_NS, id=doc_id("p", f"cheaper-model:svc-{i}"),
                                  body=json.dumps(_proposal(i)).encode())
                         for i in range(count)])
    finally:
        client.close()


def _proposal(i: int) -> dict:
    return {"id": f"cheaper-model:svc-{i}", "strategy": "cheaper_model",
            "service": f"svc-{i % 7}", "operation": "chat", "model": "gpt-4o",
            "title": f"Move svc-{i % 7} from gpt-4o to gpt-4o-mini", "status": "open",
            "status_detail": "", "change": {"model": "gpt-4o-mini"},
            "expected_impact": {"cost_reduction_pct": 82.0, "quality_delta_pct": -0.4},
            "rationale": "quality holds on the sampled traffic", "first_ns": i,
            "updated_ns": i}


# --- clients (each in its own process) ---------------------------------------------------------

def path_for(kind: str, i: int) -> str:
    if kind == "resolve":
        return f"/v1/config/{SERVICE}/resolve?key=user-{i}"
    return "/v1/optimizations?limit=20"


async def _closed(base: str, key: str, kind: str, conns: int, seconds: float,
                  offset: int) -> tuple[int, int, list[float]]:
    import aiohttp
    headers = {"Authorization": f"Bearer {key}"}
    done = errors = 0
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=conns, force_close=False)
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as session:
        # warm the connections up, then measure
        await asyncio.gather(*(session.get(path_for(kind, offset + c)) for c in range(conns)))
        stop = time.perf_counter() + seconds

        async def loop(c: int) -> None:
            nonlocal done, errors
            i = offset + c
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with session.get(path_for(kind, i)) as answer:
                    await answer.read()
                    if answer.status == 200:
                        done += 1
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
                i += conns
        await asyncio.gather(*(loop(c) for c in range(conns)))
    return done, errors, latencies


async def _open(base: str, key: str, kind: str, conns: int, seconds: float, rate: float,
                offset: int) -> tuple[int, int, list[float]]:
    """Send at ``rate`` requests/s on a fixed schedule; latency from the scheduled time."""
    import aiohttp
    headers = {"Authorization": f"Bearer {key}"}
    done = errors = 0
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(base, connector=connector, headers=headers) as session:
        await asyncio.gather(*(session.get(path_for(kind, offset + c)) for c in range(conns)))
        total = int(rate * seconds)
        start = time.perf_counter() + 0.05
        pending: set[asyncio.Task] = set()

        async def one(i: int, scheduled: float) -> None:
            nonlocal done, errors
            try:
                async with session.get(path_for(kind, offset + i)) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                done += 1
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors += 1

        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    return done, errors, latencies


def _client(args: tuple, out: mp.Queue) -> None:
    mode, rest = args[0], args[1:]
    runner = _closed if mode == "closed" else _open
    try:
        out.put(("ok", asyncio.run(runner(*rest))))
    except Exception as exc:  # reported by the parent
        out.put(("error", repr(exc)))


def run_clients(clients: int, mode: str, base: str, key: str, kind: str, conns: int,
                seconds: float, rate: float = 0.0) -> tuple[int, int, list[float], float]:
    """(successes, errors, latencies in s, wall seconds) over ``clients`` processes."""
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    procs = []
    for c in range(clients):
        extra = (rate / clients,) if mode == "open" else ()
        args = (mode, base, key, kind, conns, seconds, *extra, c * 10_000_000)
        procs.append(ctx.Process(target=_client, args=(args, out), daemon=True))
    started = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    wall = time.perf_counter() - started
    for p in procs:
        p.join(10)
    done = errors = 0
    latencies: list[float] = []
    for status, value in results:
        if status != "ok":
            raise SystemExit(f"a client failed: {value}")
        done, errors = done + value[0], errors + value[1]
        latencies += value[2]
    return done, errors, latencies, wall


def bench(processes: int, seconds: float, clients: int, conns: int) -> list[dict]:
    rows = []
    with daemon(processes) as (base, runtime):
        key = create_key(runtime, "operator")
        seed_optimizations(runtime, 60)
        status, body = http("PUT", f"{base}/v1/config/{SERVICE}", key,
                            {"expected_version": 0,
                             "config": {"model": "gpt-4o", "parameters": {"temperature": 0.2}}})
        if status not in (200, 201):
            raise SystemExit(f"PUT config answered {status}: {body[:300]!r}")
        status, body = http("GET", f"{base}/v1/config/{SERVICE}/resolve?key=probe", key)
        if status != 200:
            raise SystemExit(f"resolve answered {status}: {body[:300]!r}")
        for kind in ("resolve", "list"):
            done, errors, lat, _ = run_clients(clients, "closed", base, key, kind, conns,
                                               seconds)
            max_rps = done / seconds
            row = {"processes": processes, "operation": kind, "max_rps": max_rps,
                   "closed_errors": errors, "closed_p50_ms": percentile(lat, 0.5) * 1e3,
                   "closed_p99_ms": percentile(lat, 0.99) * 1e3}
            rate = max_rps / 2
            done, errors, lat, _ = run_clients(clients, "open", base, key, kind, conns,
                                               seconds, rate)
            row.update({"open_rate": rate, "open_done": done, "open_errors": errors,
                        "open_p50_ms": percentile(lat, 0.5) * 1e3,
                        "open_p99_ms": percentile(lat, 0.99) * 1e3})
            rows.append(row)
            print(f"rest_api processes={processes} {kind:8s} closed: {max_rps:8.0f} req/s "
                  f"(p50 {row['closed_p50_ms']:.1f} ms, p99 {row['closed_p99_ms']:.1f} ms, "
                  f"{row['closed_errors']} errors) | open at {rate:.0f} req/s: "
                  f"p50 {row['open_p50_ms']:.2f} ms, p99 {row['open_p99_ms']:.2f} ms "
                  f"({done} ok, {errors} errors)", flush=True)
    return rows


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0], "rest_api")
    parser.add_argument("--conns", type=int, default=32, help="connections per client")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.clients} client processes x {args.conns} connections, "
          f"{args.seconds:g} s per measurement", flush=True)
    rows = []
    for processes in args.processes:
        rows += bench(processes, args.seconds, args.clients, args.conns)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
