#!/usr/bin/env python3
"""Throughput and memory of the processor's streaming core (no I/O, one core).

Generates seeded synthetic LLMEvents (20 services x 3 models x 2 variants, over 2 hours of
event time, made 20k at a time, slightly out of order, 0.5% duplicate ids, a few beyond the
allowed lateness), feeds them through Deduplicator + WindowedAggregator, draining the closed
windows.
Prints events/s and peak RSS for two event counts: the RSS should follow the keys and the
open windows, not the number of events.

    python scripts/bench_processor.py [--events N] [--quick]

Each run is a fresh subprocess, so that its peak RSS is its own. Event generation is not
timed. The time spent closing windows (merging panes) is shown apart: most of it depends on
the keys and the event-time span, not on the event count, so events/s is lowest for sparse
streams. The dedup ids grow with the event rate (the horizon is event time), not the count.
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

import numpy as np  # noqa: E402

from ipc.events import LLMEvent  # noqa: E402
from workers.processor.dedup import Deduplicator  # noqa: E402
from workers.processor.windows import WindowedAggregator  # noqa: E402

NS = 1_000_000_000
START_NS = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z
SPAN_S = 2 * 3600
SERVICES = [f"svc-{i:02d}" for i in range(20)]
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet"]
VARIANTS = ["a", "b"]
CHUNK = 20_000


def make_events(n: int, first: int, total: int, rng: np.random.Generator) -> list[LLMEvent]:
    """Events ``first .. first + n - 1`` of ``total`` spread over SPAN_S, in rough time
    order (jitter up to 20 s, 0.1% 1-5 min late)."""
    base = (np.arange(first, first + n, dtype=np.int64) * (SPAN_S * NS // total))
    jitter = rng.integers(0, 20 * NS, n)
    very_late = rng.random(n) < 0.001
    jitter[very_late] = rng.integers(60 * NS, 300 * NS, int(very_late.sum()))
    times = (START_NS + base - jitter).tolist()
    service = rng.integers(0, len(SERVICES), n).tolist()
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
            event_id=event_id, time_ns=times[i], service=SERVICES[service[i]],
            model=MODELS[model[i]], variant=VARIANTS[variant[i]],
            input_tokens=tokens_in[i], output_tokens=tokens_out[i], latency_ms=latency[i],
            ttft_ms=ttft[i], cost_usd=tokens_in[i] * 2.5e-6 + tokens_out[i] * 1e-5,
            status="error" if error[i] else "ok",
            error_type="rate_limit" if error[i] else None,
            quality=quality[i] if has_quality[i] else None, cache_hit=cache_hit[i],
            prompt_fingerprint=f"fp{fingerprint[i]}"))
    return events


def run(n: int, seed: int = 7) -> dict:
    """One measured run in this process: events are made a chunk at a time (so that they do
    not dominate the RSS) and only their processing is timed."""
    rng = np.random.default_rng(seed)
    dedup = Deduplicator(horizon_s=600)
    windows = WindowedAggregator()
    closing = [0.0]  # seconds spent merging panes into closed windows, inside add()
    close = windows._close

    def timed_close(*args) -> None:
        started = time.perf_counter()
        close(*args)
        closing[0] += time.perf_counter() - started

    windows._close = timed_close
    duplicates = closed = max_open = 0
    elapsed = 0.0
    for first in range(0, n, CHUNK):
        events = make_events(min(CHUNK, n - first), first, n, rng)
        started = time.perf_counter()
        for i, event in enumerate(events):
            if dedup.seen(event.event_id, event.time_ns, windows.watermark_ns):
                duplicates += 1
                continue
            windows.add(event)
            if not i & 1023:  # as the service would after each batch
                closed += len(windows.drain_closed())
        closed += len(windows.drain_closed())
        elapsed += time.perf_counter() - started
        max_open = max(max_open, windows.open_panes)
    return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed,
            "closing_s": closing[0],
            "duplicates": duplicates, "late": windows.late_count,
            "partly_late": windows.partly_late_count, "closed_windows": closed,
            "max_open_pane_aggregates": max_open, "dedup_ids": len(dedup),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="events of the larger run (the smaller is a quarter)")
    parser.add_argument("--quick", action="store_true", help="100k and 25k events")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child)))
        return 0
    large = 100_000 if args.quick else args.events
    print(f"{len(SERVICES)} services x {len(MODELS)} models x {len(VARIANTS)} variants, "
          f"{SPAN_S // 3600} h of event time; tumbling 60 s, sliding 300/60 s, lateness 30 s")
    for n in (large // 4, large):
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out)
        verdict = "meets" if r["events_per_s"] >= 100_000 else "MISSES"
        print(f"{r['events']:>9,} events: {r['events_per_s']:>9,.0f} events/s ({verdict} "
              f"100k/s target), peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"{r['closed_windows']:,} windows closed in {r['closing_s']:.1f} of the "
              f"{r['seconds']:.1f} s ({r['closing_s'] / r['closed_windows'] * 1e6:.0f} us "
              "each, with the binning of the panes' buffered latencies), "
              f"at most {r['max_open_pane_aggregates']} pane aggregates open, "
              f"{r['duplicates']:,} duplicates, {r['late']:,} late, "
              f"{r['partly_late']:,} partly late, {r['dedup_ids']:,} ids remembered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
