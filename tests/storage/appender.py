"""A client that appends to the event log until told to stop, recording what was acknowledged.

Run as a separate process by the crash tests: ``python appender.py RUNTIME_DIR LOG OUT_FILE``.
Each line of OUT_FILE is ``offset payload`` for an acknowledged record, written only after the
storage worker answered. Failed appends (the worker was killed) are not retried with the same
payload, so an acknowledged payload must appear exactly once in the log. SIGTERM stops it.
"""
from __future__ import annotations

import signal
import sys

from ipc import storage as s
from workers.storage_client import SyncStorageClient

BATCH = 50
IN_FLIGHT = 4


def main() -> None:
    runtime_dir, log_name, out_path = sys.argv[1:4]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    client = SyncStorageClient(runtime_dir, timeout=2.0)
    sequence = 0
    with open(out_path, "w", buffering=1) as out:
        while not stop:
            batches = []
            for _ in range(IN_FLIGHT):
                batches.append([f"event-{sequence + i}".encode() for i in range(BATCH)])
                sequence += BATCH
            try:
                results = client.pipeline([s.LogAppend(log=log_name, records=b)
                                           for b in batches])
            except s.StorageTimeout:
                client.close()  # replies of a killed worker never come: start afresh
                client = SyncStorageClient(runtime_dir, timeout=2.0)
                continue
            for records, result in zip(batches, results, strict=True):
                if isinstance(result, s.AppendResult):
                    out.write("".join(f"{result.first_offset + i} {r.decode()}\n"
                                      for i, r in enumerate(records)))
    client.close()


if __name__ == "__main__":
    main()
