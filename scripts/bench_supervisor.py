#!/usr/bin/env python3
"""Benchmark optimizerd's supervisor: start, crash recovery, stop, idle cost, control round trip.

    python scripts/bench_supervisor.py                 # every measurement (about 5 min)
    python scripts/bench_supervisor.py --quick         # fewer repetitions, a smoke run
    python scripts/bench_supervisor.py --only crash    # one measurement
    python scripts/bench_supervisor.py --compare       # also supervisord and circusd (about
                                                       # 13 min; pip installs both into a
                                                       # throwaway venv)

Every daemon runs in its own temporary directory with free TCP ports, in its own session
(process group). Every process the script starts is tracked by pid and killed at the end, also on
an error or Ctrl-C. docs/benchmarks.md describes the method and the figures of a full run.
This file parses the options and runs the measurements in order; the pieces are in the
package benchsup/ beside it (its __init__ lists them).

Measurements (``--only NAME``):
  start    the six default services: launch of `optimizerd start` to the READY=1 datagram on our
           own NOTIFY_SOCKET (AF_UNIX DGRAM); then `optimizerctl stop` time
  stubs6   the same with 6 stub services (built-ins disabled)
  stubs50  the same with 50 stub services
  stop     start and stubs6 again, reporting their stop figures
  crash    SIGKILL of collector and of a stub: kill-to-noticed and kill-to-replacement-READY,
           read from the daemon's --json-logs timestamps; a few kills cross-checked by polling
           the raw control socket
  idle     CPU (% of one core) and RSS of the supervisor and of the fork server, 30 s idle,
           heartbeats every 1 s; for the six services, 6 stubs and 50 stubs
  status   `optimizerctl status` whole command (subprocess) and raw socket round trip
  orphans  SIGKILL the supervisor: are its workers gone, and how soon
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from benchsup.compare import run_compare
from benchsup.env import OPTIMIZERCTL, OPTIMIZERD, loadavg, machine, source
from benchsup.figures import Bench, log_line
from benchsup.optimizerd import Optimizerd
from benchsup.optimizerd_runs import (
    run_crash,
    run_idle,
    run_orphans,
    run_start,
    run_status,
)
from benchsup.other_daemons import Venv
from benchsup.processes import REAPER
from benchsup.report import final_table, write_json

MEASUREMENTS = ("start", "stubs6", "stubs50", "stop", "crash", "idle", "status", "orphans")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter idle window")
    ap.add_argument("--only", choices=MEASUREMENTS, help="run one measurement")
    ap.add_argument("--compare", action="store_true",
                    help="also run supervisord and circusd (pip-installed into a temp venv)")
    ap.add_argument("--compare-venv", metavar="DIR",
                    help="venv to create or reuse for --compare (default: a temp dir, removed)")
    ap.add_argument("--json", metavar="FILE", help="write every raw figure to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs)")
    return ap.parse_args()


def header(b: Bench, quick: bool) -> None:
    """What runs, on what, from which code: printed and kept with the results."""
    log_line(f"bench_supervisor: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {machine()}; "
             f"{loadavg()}")
    src, commit, dirty = source()
    log_line(f"optimizerd: {OPTIMIZERD}; optimizerctl: {OPTIMIZERCTL}; code from {src}"
             + (f" (git {commit}{', modified' if dirty else ''})" if commit else "")
             + ("; --quick" if quick else ""))
    b.put("source", {"dir": src, "commit": commit, "modified": dirty})
    b.put("machine", machine())
    b.put("date", time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def run(b: Bench, args: argparse.Namespace) -> None:
    only = args.only

    def want(name: str) -> bool:
        return only is None or only == name
    if want("start") or want("stop"):
        run_start(b, "start", "six default services", lambda: Optimizerd("six"))
    if want("stubs6") or want("stop"):
        run_start(b, "stubs6", "6 stubs", lambda: Optimizerd("stubs6", stubs=6, builtins=False))
    if want("stubs50"):
        run_start(b, "stubs50", "50 stubs",
                  lambda: Optimizerd("stubs50", stubs=50, builtins=False))
    if want("crash"):
        run_crash(b)
    if want("idle"):
        run_idle(b)
    if want("status"):
        run_status(b)
    if want("orphans"):
        run_orphans(b)
    if args.compare and only != "start":
        run_compare(b, Venv(args.compare_venv), only)
    final_table(b)


def main() -> int:
    args = parse_args()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    # SIGINT too: a shell may start us with it ignored (a background job), Ctrl-C must work
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    REAPER.keep_dirs = args.keep
    b = Bench(quick=args.quick)
    code = 0
    try:
        header(b, args.quick)
        run(b, args)
    except KeyboardInterrupt as exc:
        log_line(f"\ninterrupted ({exc or 'Ctrl-C'}); cleaning up")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        REAPER.cleanup()
        if args.json:
            write_json(b, args.json)
    return code


if __name__ == "__main__":
    sys.exit(main())
