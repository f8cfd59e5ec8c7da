"""A librdkafka mock cluster in a separate process, for the Kafka event-log tests.

``python tests/storage/kafka_support.py`` creates a confluent_kafka Producer with
``test.mock.num.brokers``: librdkafka then runs an in-process mock cluster whose brokers listen
on 127.0.0.1 TCP ports. The script prints the brokers' addresses (from the client's metadata) as
one line ``BOOTSTRAP host:port,...`` and keeps the cluster up until its standard input reaches
EOF (the test process closed the pipe or died) or it is killed. The code under test thus reaches
the cluster over real TCP, exactly as it would a real one.

The mock cluster auto-creates a topic at its first use with 4 partitions (its admin API cannot
create topics), and it implements idempotent producers, consumer groups, rebalances and commits.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

NUM_BROKERS = 3
STARTUP_TIMEOUT = 15.0
PARTITIONS = 4  # of a topic the mock cluster auto-creates
# Quick group membership: the mock coordinator completes a rebalance once every member
# rejoined, which members notice at their next heartbeat.
FAST_GROUP = {"heartbeat.interval.ms": "200", "session.timeout.ms": "4000"}


def serve() -> None:
    import confluent_kafka

    # No bootstrap.servers: with test.mock.num.brokers librdkafka replaces it with the mock's.
    client = confluent_kafka.Producer({"test.mock.num.brokers": NUM_BROKERS,
                                       "log_level": 3})  # the "Mock cluster enabled" notice is 5
    metadata = client.list_topics(timeout=10)
    brokers = sorted(metadata.brokers.values(), key=lambda b: b.id)
    if len(brokers) != NUM_BROKERS:
        print(f"ERROR expected {NUM_BROKERS} brokers, metadata has {brokers!r}", flush=True)
        sys.exit(1)
    print("BOOTSTRAP " + ",".join(f"{b.host}:{b.port}" for b in brokers), flush=True)
    # Keep the process (and so the cluster's threads) alive until stdin closes.
    while sys.stdin.buffer.read(4096):
        pass


@dataclass
class MockCluster:
    process: subprocess.Popen
    bootstrap: str
    stderr_lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> MockCluster:
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            line = _read_line(process, STARTUP_TIMEOUT)
            if not line.startswith("BOOTSTRAP "):
                raise RuntimeError(f"mock cluster did not start: {line!r}")
            return cls(process, line.split(" ", 1)[1].strip())
        except BaseException:
            _kill(process)
            raise

    def stop(self) -> None:
        _kill(self.process)


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first stdout line of ``process``, waiting at most ``timeout`` seconds for it."""
    deadline = time.monotonic() + timeout
    fd = process.stdout.fileno()
    buffered = b""
    while b"\n" not in buffered:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from the mock cluster within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                err = process.stderr.read().decode(errors="replace") if process.poll() is not None \
                    else ""
                raise RuntimeError(f"mock cluster exited (code {process.poll()}): {err[-2000:]}")
            buffered += chunk
    return buffered.split(b"\n", 1)[0].decode()


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
    process.wait(timeout=10)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def dead_bootstrap() -> str:
    """host:port of a TCP port that was just free and has no listener (connections refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


if __name__ == "__main__":
    serve()
