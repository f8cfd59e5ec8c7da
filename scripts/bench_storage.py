#!/usr/bin/env python3
"""Storage throughput and latency through the storage worker, as other services see it.

Starts optimizerd with only the storage service (LevelDB, and PostgreSQL when a server can be
had), talks to it over storage.sock with the blocking client and prints events/s appended
durably, records/s read, and per-request p50/p99 latency, for batches of 1 and 500.

    python scripts/bench_storage.py [--quick] [--postgres-dsn DSN | --no-postgres]

Without --postgres-dsn a throwaway PostgreSQL cluster is made in a temp dir (initdb, as the
postgres user when run as root) and removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tomli_w  # noqa: E402

from ipc import storage as s  # noqa: E402
from workers.storage_client import SyncStorageClient  # noqa: E402

RECORD = b"x" * 200  # about the size of one encoded LLM-call event
# The console script next to the running interpreter (not a pyenv shim on PATH).
OPTIMIZERD = os.path.join(os.path.dirname(sys.executable), "optimizerd")
if not os.path.exists(OPTIMIZERD):
    OPTIMIZERD = "optimizerd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def daemon(storage: dict, env: dict[str, str] | None = None, sections: dict | None = None,
           prefix: str = "bench-storage-"):
    """optimizerd with the storage service alone, in a temp dir; killed at the end.

    ``sections`` are further config sections, e.g. ``{"collector": {...}}`` to run the
    collector too (every other built-in service is disabled)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    runtime = str(workdir / "run")
    doc = {"supervisor": {"runtime_dir": runtime, "data_dir": str(workdir / "data")},
           "admin": {"listen": f"127.0.0.1:{free_port()}"}, "storage": storage}
    for name in ("collector", "processor", "rest_api", "grpc_api", "integrations"):
        doc[name] = {"enabled": False}
    doc.update(sections or {})
    (workdir / "optimizer.toml").write_text(tomli_w.dumps(doc))
    proc = subprocess.Popen([OPTIMIZERD, "start", "-c", str(workdir / "optimizer.toml")],
                            env=dict(os.environ, **(env or {})), stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "daemon.log", "w"), start_new_session=True)
    try:
        client = SyncStorageClient(runtime, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.call(s.LogInfo(log="probe"), timeout=1)
                break
            except (s.StorageTimeout, s.Unavailable):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("storage did not come up:\n"
                                     + (workdir / "daemon.log").read_text()[-2000:]) from None
        yield client
        client.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def timed_requests(client: SyncStorageClient, make, count: int) -> list[float]:
    """Latency of ``count`` requests made one after the other (no pipelining)."""
    latencies = []
    for i in range(count):
        op = make(i)
        started = time.perf_counter()
        client.call(op)
        latencies.append(time.perf_counter() - started)
    return latencies


def throughput(client: SyncStorageClient, make, per_op: int, seconds: float,
               depth: int) -> float:
    """Items per second with ``depth`` requests in flight at a time."""
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        results = client.pipeline([make(i + k) for k in range(depth)])
        for r in results:
            if isinstance(r, Exception):
                raise r
        i += depth
        done += depth * per_op
    return done / (time.perf_counter() - started)


def run_backend(label: str, client: SyncStorageClient, quick: bool) -> list[tuple]:
    rows = []
    n = 300 if quick else 2000
    seconds = 1.5 if quick else 5.0
    for batch in (1, 500):
        records = [RECORD] * batch
        log = f"bench-{batch}"
        lat = timed_requests(client, lambda _i, r=records, g=log: s.LogAppend(log=g, records=r),
                             n if batch == 1 else n // 10)
        rate = throughput(client, lambda _i, r=records, g=log: s.LogAppend(log=g, records=r),
                          batch, seconds, depth=16 if batch == 1 else 8)
        rows.append((label, f"append x{batch}", rate, percentile(lat, .5), percentile(lat, .99)))
    total = client.call(s.LogInfo(log="bench-500")).next_offset
    for batch in (1, 500):
        lat = timed_requests(client, lambda i, b=batch: s.LogRead(
            log="bench-500", offset=(i * b) % max(1, total - b), max_records=b),
            n if batch == 1 else n // 10)
        rate = throughput(client, lambda i, b=batch: s.LogRead(
            log="bench-500", offset=(i * b) % max(1, total - b), max_records=b),
            batch, seconds, depth=16 if batch == 1 else 8)
        rows.append((label, f"read x{batch}", rate, percentile(lat, .5), percentile(lat, .99)))
    client.call(s.Put(ns="test", key=b"k", value=RECORD))
    lat = timed_requests(client, lambda _i: s.Get(ns="test", key=b"k"), n)
    rate = throughput(client, lambda _i: s.Get(ns="test", key=b"k"), 1, seconds, depth=16)
    rows.append((label, "get", rate, percentile(lat, .5), percentile(lat, .99)))
    return rows


@contextmanager
def postgres(dsn: str | None):
    """The given server, or a throwaway cluster made for the run."""
    if dsn:
        yield dsn
        return
    from tests.storage.pg_cluster import make_cluster, pg_bindir

    bindir = pg_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL server binaries: pass --postgres-dsn or --no-postgres")
    cluster = make_cluster(bindir)
    try:
        yield cluster.dsn(cluster.create_database())
    finally:
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter runs")
    parser.add_argument("--postgres-dsn", help="benchmark this PostgreSQL instead of a temp one")
    parser.add_argument("--no-postgres", action="store_true", help="LevelDB only")
    args = parser.parse_args()
    rows = []
    print(f"storage benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{len(RECORD)}-byte records, fsync on (sync = true)", flush=True)
    with daemon({"backend": "leveldb"}) as client:
        rows += run_backend("leveldb", client, args.quick)
    if not args.no_postgres:
        with postgres(args.postgres_dsn) as dsn, daemon({"backend": "postgres"},
                               env={"LLM_OPTIMIZER__STORAGE__POSTGRES_DSN": dsn}) as client:
            rows += run_backend("postgres", client, args.quick)
    print(f"{'backend':<9} {'operation':<11} {'items/s':>11} {'p50 µs':>9} {'p99 µs':>9}")
    for backend, op, rate, p50, p99 in rows:
        print(f"{backend:<9} {op:<11} {rate:>11,.0f} {p50 * 1e6:>9.0f} {p99 * 1e6:>9.0f}")
    if rows:
        print("items/s: records appended or read (get: requests) with requests pipelined; "
              "p50/p99: one request at a time, round trip through storage.sock")


if __name__ == "__main__":
    main()
