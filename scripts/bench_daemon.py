"""What the API benchmarks (bench_rest.py, bench_grpc.py) share: an optimizerd in a temp dir,
always killed at the end, an API key, plain HTTP calls and percentiles."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

OPTIMIZERD = os.path.join(os.path.dirname(sys.executable), "optimizerd")
OPTIMIZERCTL = os.path.join(os.path.dirname(sys.executable), "optimizerctl")
if not os.path.exists(OPTIMIZERD):
    OPTIMIZERD, OPTIMIZERCTL = "optimizerd", "optimizerctl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, key: str | None = None, body: object = None
         ) -> tuple[int, bytes]:
    """(status, body); 0 when nothing answers."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def base_config(workdir: Path) -> dict[str, Any]:
    """Storage, collector and processor on free loopback ports; the caller adds the APIs."""
    return {"supervisor": {"runtime_dir": str(workdir / "run"),
                           "data_dir": str(workdir / "data")},
            "admin": {"listen": f"127.0.0.1:{free_port()}"}, "storage": {},
            "collector": {"listen": f"127.0.0.1:{free_port()}",  # the processor needs it
                          "otlp_grpc_listen": f"127.0.0.1:{free_port()}"},
            "processor": {}, "integrations": {"enabled": False}}


@contextmanager
def running(prefix: str, configure: Callable[[dict[str, Any]], Callable[[], bool]]
            ) -> Iterator[tuple[subprocess.Popen, str]]:
    """optimizerd on ``base_config`` as ``configure`` completes it (it returns the check that
    says the daemon is ready for the benchmark); yields (process, runtime dir), and kills the
    daemon's whole session at the end, whatever happens: a SIGTERM to the benchmark (which
    would end it without unwinding) becomes SystemExit while the daemon runs."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    doc = base_config(workdir)
    ready = configure(doc)
    (workdir / "optimizer.toml").write_text(tomli_w.dumps(doc))
    log = open(workdir / "daemon.log", "w")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    proc = subprocess.Popen([OPTIMIZERD, "start", "-c", str(workdir / "optimizer.toml")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("optimizerd did not come up:\n"
                                 + (workdir / "daemon.log").read_text()[-3000:])
            time.sleep(0.1)
        yield proc, doc["supervisor"]["runtime_dir"]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def argument_parser(description: str, service: str) -> argparse.ArgumentParser:
    """The options every API benchmark takes: the ``[service] processes`` to try, the seconds
    per measurement, the client processes, and a file for the rows as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help=f"[{service}] processes to try (default: 1 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser


def create_key(runtime: str, role: str) -> str:
    done = subprocess.run([OPTIMIZERCTL, "--runtime-dir", runtime, "api-key", "create",
                           "--role", role, "--name", "bench"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"api-key create failed: {done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]
