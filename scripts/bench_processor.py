#!/usr/bin/env python3
"""Throughput and memory of the processor's streaming core (no I/O, one core).

Generates seeded synthetic LLMEvents (20 services x 3 models x 2 variants, over 2 hours of
event time, made 20k at a time, slightly out of order, 0.5% duplicate ids, a few beyond the
allowed lateness) and feeds them, ``BATCH`` at a time as the service reads them, through the
whole ``ProcessorCore`` (dedup, windows, analysis history, analyzers, decisions) with the
service's default [processor] settings: ``ingest`` until an analysis boundary,
``drain_windows``, ``analyze`` when one is due. ``--part windows`` measures only
Deduplicator + WindowedAggregator (the windows, without the analyzers).

Prints events/s, peak RSS, windows closed and the time spent closing windows and analyzing,
for two event counts and for the larger count with twice the keys (40 services): the RSS
should follow the keys, not the number of events. The remembered dedup ids grow with the
event rate (the horizon is event time), which is the one part that follows the events.

    python scripts/bench_processor.py [--events N] [--quick] [--part core|windows]
                                      [--outputs]

``--outputs`` also builds every closed window's ``summary()``, as the service's
``Outputs.windows`` does before writing them (sliding windows included).
Each run is a fresh subprocess, so that its peak RSS is its own. Event generation is not
timed.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from ipc.config import ProcessorSection  # noqa: E402
from ipc.events import LLMEvent  # noqa: E402
from ipc.prices import shipped_prices  # noqa: E402
from workers.processor.core import ProcessorCore  # noqa: E402
from workers.processor.dedup import Deduplicator  # noqa: E402
from workers.processor.windows import WindowedAggregator  # noqa: E402

NS = 1_000_000_000
START_NS = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z
SPAN_S = 2 * 3600
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet"]
VARIANTS = ["a", "b"]
CHUNK = 20_000
BATCH = 2_000  # events per ingest call, as workers.processor.worker reads them


def services_of(n: int) -> list[str]:
    return [f"svc-{i:02d}" for i in range(n)]


def make_events(n: int, first: int, total: int, rng: np.random.Generator,
                services: list[str]) -> list[LLMEvent]:
    """Events ``first .. first + n - 1`` of ``total`` spread over SPAN_S, in rough time
    order (jitter up to 20 s, 0.1% 1-5 min late)."""
    base = (np.arange(first, first + n, dtype=np.int64) * (SPAN_S * NS // total))
    jitter = rng.integers(0, 20 * NS, n)
    very_late = rng.random(n) < 0.001
    jitter[very_late] = rng.integers(60 * NS, 300 * NS, int(very_late.sum()))
    times = (START_NS + base - jitter).tolist()
    service = rng.integers(0, len(services), n).tolist()
    model = rng.integers(0, len(MODELS), n).tolist()
    variant = rng.integers(0, len(VARIANTS), n).tolist()
    latency = rng.lognormal(6.0, 0.6, n).tolist()
    ttft = (np.array(latency) * rng.uniform(0.1, 0.5, n)).tolist()
    tokens_in = rng.integers(50, 4000, n).tolist()
    tokens_out = rng.integers(10, 800, n).tolist()
    error = (rng.random(n) < 0.02).tolist()
    quality = rng.beta(8, 2, n).tolist()
    has_quality = (rng.random(n) < 0.3).tolist()
    cache_hit = (rng.random(n) < 0.2).tolist()
    fingerprint = rng.zipf(1.3, n).tolist()
    duplicate = (rng.random(n) < 0.005).tolist()
    events = []
    for i in range(n):
        j = first + i
        event_id = f"e{j - 1}" if duplicate[i] and j else f"e{j}"
        events.append(LLMEvent(
            event_id=event_id, time_ns=times[i], service=services[service[i]],
            model=MODELS[model[i]], variant=VARIANTS[variant[i]],
            input_tokens=tokens_in[i], output_tokens=tokens_out[i], latency_ms=latency[i],
            ttft_ms=ttft[i], cost_usd=tokens_in[i] * 2.5e-6 + tokens_out[i] * 1e-5,
            status="error" if error[i] else "ok",
            error_type="rate_limit" if error[i] else None,
            quality=quality[i] if has_quality[i] else None, cache_hit=cache_hit[i],
            prompt_fingerprint=f"fp{fingerprint[i]}"))
    return events


def _timed(obj, name: str, spent: list[float]) -> None:
    """Wrap ``obj.name`` so that the time spent in it is added to ``spent[0]``."""
    method = getattr(obj, name)

    def timed(*args):
        started = time.perf_counter()
        try:
            return method(*args)
        finally:
            spent[0] += time.perf_counter() - started

    setattr(obj, name, timed)


def run_core(n: int, services: int, outputs: bool, seed: int = 7) -> dict:
    """One measured run of the whole ProcessorCore in this process: events are made a chunk
    at a time (so that they do not dominate the RSS) and only their processing is timed."""
    rng = np.random.default_rng(seed)
    names = services_of(services)
    core = ProcessorCore(msgspec.convert({}, ProcessorSection), shipped_prices())
    closing, analysis, summaries = [0.0], [0.0], [0.0]
    _timed(core.windows, "_close", closing)
    closed = analyses = max_open = 0
    elapsed = 0.0
    for first in range(0, n, CHUNK):
        chunk = make_events(min(CHUNK, n - first), first, n, rng, names)
        started = time.perf_counter()
        for at in range(0, len(chunk), BATCH):
            events = chunk[at:at + BATCH]
            done = 0
            while True:
                done += core.ingest(events[done:])
                drained = core.drain_windows()
                closed += len(drained)
                if outputs:
                    began = time.perf_counter()
                    for window in drained:
                        window.aggregate.summary()
                    summaries[0] += time.perf_counter() - began
                boundary = core.due_analysis()
                if boundary is None:
                    break
                began = time.perf_counter()
                core.analyze(boundary)
                analysis[0] += time.perf_counter() - began
                analyses += 1
        elapsed += time.perf_counter() - started
        max_open = max(max_open, core.windows.open_panes)
    counters = core.counters
    return {"events": n, "keys": len(core.history), "seconds": elapsed,
            "events_per_s": n / elapsed, "closing_s": closing[0], "analysis_s": analysis[0],
            "summaries_s": summaries[0], "analyses": analyses,
            "duplicates": counters.duplicates, "late": counters.late,
            "closed_windows": closed, "max_open_pane_aggregates": max_open,
            "dedup_ids": len(core.dedup),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_windows(n: int, services: int, outputs: bool, seed: int = 7) -> dict:
    """Deduplicator + WindowedAggregator alone, draining every 1024 events."""
    rng = np.random.default_rng(seed)
    names = services_of(services)
    dedup = Deduplicator(horizon_s=600)
    windows = WindowedAggregator()
    closing, summaries = [0.0], [0.0]
    _timed(windows, "_close", closing)
    duplicates = closed = max_open = 0
    keys = set()
    elapsed = 0.0

    def drain() -> int:
        drained = windows.drain_closed()
        if outputs:
            began = time.perf_counter()
            for window in drained:
                window.aggregate.summary()
            summaries[0] += time.perf_counter() - began
        for window in drained:
            keys.add(window.key)
        return len(drained)

    for first in range(0, n, CHUNK):
        events = make_events(min(CHUNK, n - first), first, n, rng, names)
        started = time.perf_counter()
        for i, event in enumerate(events):
            if dedup.seen(event.event_id, event.time_ns, windows.watermark_ns):
                duplicates += 1
                continue
            windows.add(event)
            if not i & 1023:  # as the service would after each batch
                closed += drain()
        closed += drain()
        elapsed += time.perf_counter() - started
        max_open = max(max_open, windows.open_panes)
    return {"events": n, "keys": len(keys), "seconds": elapsed, "events_per_s": n / elapsed,
            "closing_s": closing[0], "analysis_s": 0.0, "summaries_s": summaries[0],
            "analyses": 0, "duplicates": duplicates, "late": windows.late_count,
            "closed_windows": closed, "max_open_pane_aggregates": max_open,
            "dedup_ids": len(dedup),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="events of the larger runs (the smaller is a quarter)")
    parser.add_argument("--quick", action="store_true", help="100k and 25k events")
    parser.add_argument("--part", choices=("core", "windows"), default="core",
                        help="the whole ProcessorCore (default) or only dedup + windows")
    parser.add_argument("--outputs", action="store_true",
                        help="also build every closed window's summary(), as Outputs does")
    parser.add_argument("--services", type=int, default=20,
                        help="services of the smaller runs (x 3 models x 2 variants)")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runner = run_core if args.part == "core" else run_windows
    if args.child:
        n, services = args.child
        print(json.dumps(runner(n, services, args.outputs)))
        return 0
    large = 100_000 if args.quick else args.events
    print(f"part {args.part}{' + output summaries' if args.outputs else ''}: "
          f"{args.services} "
          f"services x {len(MODELS)} models x {len(VARIANTS)} variants, "
          f"{SPAN_S // 3600} h of event time; tumbling 60 s, sliding 300/60 s, lateness 30 s")
    for n, services in ((large // 4, args.services), (large, args.services),
                        (large, 2 * args.services)):
        command = [sys.executable, __file__, "--part", args.part, "--child", str(n),
                   str(services)] + (["--outputs"] if args.outputs else [])
        r = json.loads(subprocess.run(command, check=True, capture_output=True,
                                      text=True).stdout)
        verdict = "meets" if r["events_per_s"] >= 100_000 else "MISSES"
        closed = max(r["closed_windows"], 1)
        print(f"{r['events']:>9,} events, {r['keys']:>3} keys: {r['events_per_s']:>9,.0f} "
              f"events/s ({verdict} 100k/s), peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"{r['seconds']:.1f} s, of which closing {r['closed_windows']:,} windows "
              f"{r['closing_s']:.1f} s ({r['closing_s'] / closed * 1e6:.0f} us each), "
              f"{r['analyses']} analyses {r['analysis_s']:.1f} s"
              + (f", summaries {r['summaries_s']:.1f} s" if args.outputs else "")
              + f"; at most {r['max_open_pane_aggregates']} pane aggregates open, "
              f"{r['duplicates']:,} duplicates, {r['late']:,} late, "
              f"{r['dedup_ids']:,} ids remembered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
