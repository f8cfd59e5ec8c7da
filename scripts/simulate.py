#!/usr/bin/env python3
"""Traffic simulator: realistic LLM-call traffic with known ground truth, sent through a running
optimizerd's collector, then what the optimizer found, proposed, promoted and rolled back,
checked against that truth.

    python scripts/simulate.py [-c CONFIG] [--minutes 45] [--seed 7] [--json REPORT]

The daemon is the one ``-c CONFIG`` (or the embedded defaults) describes: events go to its
collector (``POST /v1/events``), operator commands to its processor over the control socket,
and results are read from its storage. Time is event time: minute after minute of traffic,
starting ``--minutes`` before now, each minute sent once the processor has taken the
previous one, so the optimizer's decisions (a canary config) shape the next minute's traffic
as they would a real client's. Hours of traffic take seconds.

Services and their ground truth:

- ``support-bot``: gpt-4o, with 10% of calls already on gpt-4o-mini, whose quality for this
  service is the same: the cheaper model should be proposed and promoted through the canary
  stages (with ``[processor.decisions] auto_deploy = true``), cutting cost by >= 50% while
  keeping >= 95% of the quality.
- ``faq-bot``: 40% of calls repeat one of a few hot prompts: caching should be proposed with a
  savings estimate within 20% of the true cost of the repeated calls.
- ``search``: p95 latency rises by 60% from ``--regression-at`` minutes on: a latency
  regression should be reported.
- ``writer``: at ``--experiment-at`` minutes (or once no other rollout of writer runs) an
  operator starts a canary of a cheaper model
  whose quality for this service is much lower: it should be rolled back automatically, while
  the canary weight is still at most 10%, within 3 analysis intervals.
- ``control``: healthy, steady, unique prompts: nothing should be proposed.

Calls are routed as a client library would: each request key resolves to a variant of the
service's current config (``ipc.variants``), which names the model that serves it. Exit
status: 0 when every check passed, 1 when one failed, 2 when the daemon could not be used.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from ipc import storage as s  # noqa: E402
from ipc.config_loader import ConfigError, load_config  # noqa: E402
from ipc.endpoints import runtime_dir  # noqa: E402
from ipc.prices import shipped_prices  # noqa: E402
from ipc.variants import LLMConfig, effective_config  # noqa: E402
from supervisor.ctl import Client, Unreachable  # noqa: E402
from workers.storage_client import SyncStorageClient  # noqa: E402

MINUTE_NS = 60 * 1_000_000_000
POST_BATCH = 5_000
WAIT_TIMEOUT = 60.0
CACHE_TTL_S = 600  # the caching proposal's default TTL: what "repeated" means for the truth


@dataclass(frozen=True)
class ModelTruth:
    """How a model behaves for a service: what the simulator draws calls from."""

    latency_ms: float  # median of a lognormal
    quality: float     # mean of a Beta with concentration 12
    error_rate: float = 0.01


@dataclass
class Service:
    name: str
    calls_per_minute: int
    mix: dict[str, float]                 # model -> share, before any config exists
    models: dict[str, ModelTruth]         # every model this service may be served by
    repeat_share: float = 0.0             # calls drawn from a small pool of hot prompts
    hot_prompts: int = 24
    tokens_in: int = 1200
    tokens_out: int = 300
    slow_from_minute: int | None = None   # latency x ``slow_factor`` from then on
    slow_factor: float = 1.0
    cache: dict[str, int] = field(default_factory=dict)  # fingerprint -> last time (s), canary


def scenario(args: argparse.Namespace) -> list[Service]:
    return [
        Service("support-bot", 3000, {"gpt-4o": 0.9, "gpt-4o-mini": 0.1},
                {"gpt-4o": ModelTruth(900, 0.82), "gpt-4o-mini": ModelTruth(650, 0.815)}),
        Service("faq-bot", 1200, {"claude-3-haiku": 1.0},
                {"claude-3-haiku": ModelTruth(500, 0.78)}, repeat_share=0.4),
        Service("search", 1200, {"gemini-2.0-flash-lite": 1.0},
                {"gemini-2.0-flash-lite": ModelTruth(400, 0.75)},
                slow_from_minute=args.regression_at, slow_factor=1.6),
        Service("writer", 2000, {"claude-sonnet-4-5": 1.0},
                {"claude-sonnet-4-5": ModelTruth(1500, 0.84),
                 "claude-haiku-4-5": ModelTruth(800, 0.60)}),
        Service("control", 600, {"ministral-3b-latest": 1.0},
                {"ministral-3b-latest": ModelTruth(450, 0.74)}),
    ]


# A model the service was not built for (an experiment the optimizer tries on evidence from
# other services): it answers, but worse.
UNFIT = ModelTruth(700, 0.55, error_rate=0.03)


class DaemonError(Exception):
    """The daemon could not be reached or refused what the simulator asked."""


class Daemon:
    """The running optimizerd: its collector, its processor's commands, its storage."""

    def __init__(self, config_path: str | None):
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise DaemonError(f"config: {exc}") from None
        self.runtime = runtime_dir(config)
        self.events_url = f"http://{config.collector.listen}/v1/events"
        self.control = Client(self.runtime, 10.0)
        self.storage = SyncStorageClient(self.runtime, timeout=10.0)
        self.lateness_ns = config.processor.allowed_lateness_s * 1_000_000_000

    def call(self, command: str, **args: Any) -> Any:
        try:
            reply = self.control.call("call", {"service": "processor", "command": command,
                                               "args": args})
        except Unreachable as exc:
            raise DaemonError(f"optimizerd: {exc}") from None
        if not reply.ok:
            why = reply.error.message if reply.error else repr(reply)
            raise DaemonError(f"processor {command}: {why}")
        return reply.result

    def processor_status(self) -> dict[str, Any]:
        return self.call("info")["status"]

    def config(self, service: str) -> LLMConfig | None:
        try:
            return msgspec.convert(self.call("config", service=service), LLMConfig)
        except DaemonError as exc:
            if "no config" in str(exc) or "not found" in str(exc).lower():
                return None
            raise

    def post(self, events: list[dict]) -> None:
        for i in range(0, len(events), POST_BATCH):
            body = json.dumps({"events": events[i:i + POST_BATCH]}).encode()
            request = urllib.request.Request(self.events_url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            for attempt in range(20):
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        reply = json.loads(answer.read())
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code not in (429, 503) or attempt == 19:
                        raise DaemonError(f"collector answered {exc.code}: "
                                          f"{exc.read()[:300]!r}") from None
                    time.sleep(float(exc.headers.get("Retry-After", "1")))
                except urllib.error.URLError as exc:
                    raise DaemonError(f"collector at {self.events_url}: {exc.reason}") from None
            if reply["rejected"]:
                raise DaemonError(f"collector rejected events: {reply['rejected'][:3]}")

    def documents(self, ns: str) -> list[dict]:
        found, cursor = [], None
        while True:
            page = self.storage.call(s.DocList(ns=ns, limit=1000, cursor=cursor))
            found += [json.loads(d.body) for d in page.documents]
            cursor = page.next_cursor
            if cursor is None:
                return found


class Simulator:
    def __init__(self, daemon: Daemon, services: list[Service], start_ns: int, seed: int):
        self.daemon, self.services, self.start_ns = daemon, services, start_ns
        self.rng = np.random.default_rng(seed)
        self.prices = shipped_prices()
        self.sent = 0
        self.serial = 0
        self.configs: dict[str, LLMConfig | None] = {}
        # ground-truth ledgers
        self.cost: dict[tuple[str, str], list[float]] = {}   # (service, model) -> [cost, calls]
        self.quality: dict[tuple[str, str], list[float]] = {}
        self.repeat_cost = 0.0
        self.faq_seen: dict[str, float] = {}
        self.faq_seconds = 0.0

    def minute(self, m: int) -> None:
        t0 = self.start_ns + m * MINUTE_NS
        events = []
        for service in self.services:
            events += self.calls(service, m, t0)
        events.sort(key=lambda e: e["time"])
        self.daemon.post(events)
        self.sent += len(events)

    def calls(self, service: Service, m: int, t0: int) -> list[dict]:
        rng, n = self.rng, service.calls_per_minute
        times = np.sort(rng.uniform(0, 60, n))
        config = self.configs.get(service.name)
        models = list(service.mix)
        natural = rng.choice(models, size=n, p=[service.mix[k] for k in models])
        out = []
        for i in range(n):
            self.serial += 1
            key = f"user-{rng.integers(0, 10**9)}"
            variant, model, cache_on = None, str(natural[i]), False
            if config is not None:
                effective = effective_config(config, key)
                model = effective["model"]
                cache_on = bool(effective.get("cache", {}).get("enabled"))
                variant = None if effective["variant"] == "baseline" else effective["variant"]
            truth = service.models.get(model) or UNFIT
            at = t0 / 1e9 + float(times[i])
            fingerprint = (f"{service.name}-hot-{rng.integers(0, service.hot_prompts)}"
                           if rng.random() < service.repeat_share
                           else f"{service.name}-{self.serial}")
            latency = float(rng.lognormal(np.log(truth.latency_ms), 0.4))
            if service.slow_from_minute is not None and m >= service.slow_from_minute:
                latency *= service.slow_factor
            tokens_in = int(rng.normal(service.tokens_in, service.tokens_in * 0.15))
            tokens_out = int(rng.normal(service.tokens_out, service.tokens_out * 0.2))
            tokens_in, tokens_out = max(tokens_in, 1), max(tokens_out, 1)
            price = self.prices.lookup(model)
            cost = (tokens_in * price.input + tokens_out * price.output) if price else 0.0
            quality = float(rng.beta(12 * truth.quality, 12 * (1 - truth.quality)))
            error = rng.random() < truth.error_rate
            self.ledger(service, model, cost, quality, fingerprint, at)
            hit = cache_on and at - service.cache.get(fingerprint, -1e18) <= CACHE_TTL_S
            if cache_on:
                service.cache[fingerprint] = at
            if hit:
                latency, cost = 20.0, 0.0
            out.append({"event_id": f"sim-{self.serial}", "time": round(at, 6),
                        "service": service.name, "model": model, "provider": None,
                        "input_tokens": tokens_in, "output_tokens": tokens_out,
                        "latency_ms": round(latency, 2), "cost_usd": cost,
                        "status": "error" if error else "ok",
                        "error_type": "server_error" if error else None,
                        "quality": round(quality, 4), "prompt_fingerprint": fingerprint,
                        "cache_hit": hit if cache_on else None, "variant": variant})
        if service.name == "faq-bot":
            self.faq_seconds += 60
        return out

    def ledger(self, service: Service, model: str, cost: float, quality: float,
               fingerprint: str, at: float) -> None:
        """The truth, from each call's cost without any cache."""
        c = self.cost.setdefault((service.name, model), [0.0, 0])
        c[0] += cost
        c[1] += 1
        q = self.quality.setdefault((service.name, model), [0.0, 0])
        q[0] += quality
        q[1] += 1
        if service.name == "faq-bot":
            # The truth a cache would save: calls whose prompt was seen within the TTL.
            if at - self.faq_seen.get(fingerprint, -1e18) <= CACHE_TTL_S:
                self.repeat_cost += cost
            self.faq_seen[fingerprint] = at

    def wait_processed(self) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            status = self.daemon.processor_status()
            if status.get("events", -1) >= self.sent:
                return status
            if time.monotonic() > deadline:
                raise DaemonError(f"the processor took {status.get('events')} of {self.sent} "
                                  f"events within {WAIT_TIMEOUT:g} s")
            time.sleep(0.05)

    def refresh_configs(self) -> None:
        for service in self.services:
            self.configs[service.name] = self.daemon.config(service.name)


# --- checks against the truth ----------------------------------------------------------------

def per_call(ledger: dict, service: str, model: str) -> float | None:
    total, n = ledger.get((service, model), (0.0, 0))
    return total / n if n else None


def report(sim: Simulator, args: argparse.Namespace) -> dict[str, Any]:
    daemon = sim.daemon
    findings = daemon.documents("findings")
    proposals = daemon.documents("optimizations")
    rollouts = daemon.documents("rollouts")
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    switch = [p for p in proposals if p["strategy"] == "model_selection"
              and p["service"] == "support-bot" and p["change"].get("model") == "gpt-4o-mini"]
    before = per_call(sim.cost, "support-bot", "gpt-4o")
    after = per_call(sim.cost, "support-bot", "gpt-4o-mini")
    q_before = per_call(sim.quality, "support-bot", "gpt-4o")
    q_after = per_call(sim.quality, "support-bot", "gpt-4o-mini")
    status = switch[0]["status"] if switch else "not proposed"
    cut = 1 - after / before if before and after else 0.0
    kept = q_after / q_before if q_before and q_after else 0.0
    check("cheaper model for support-bot proposed and promoted",
          bool(switch) and status == "promoted" and cut >= 0.5 and kept >= 0.95,
          f"status {status}; cost per call {before or 0:.6f} -> {after or 0:.6f} "
          f"({cut:.0%} less), quality kept {kept:.1%}")

    caching = [p for p in proposals if p["strategy"] == "caching" and p["service"] == "faq-bot"]
    truth = sim.repeat_cost * 86_400 / max(sim.faq_seconds, 1)
    estimate = caching[0]["expected_impact"]["savings_usd_per_day"] if caching else 0.0
    error = abs(estimate - truth) / truth if truth else 1.0
    check("caching for faq-bot proposed, savings within 20% of the truth",
          bool(caching) and error <= 0.2,
          f"estimate ${estimate:,.2f}/day vs truth ${truth:,.2f}/day ({error:.1%} off)")

    slow = [f for f in findings if f["kind"] == "latency_regression" and f["service"] == "search"]
    regression_ns = sim.start_ns + args.regression_at * MINUTE_NS
    check("latency regression of search reported",
          any(f["window_end_ns"] > regression_ns for f in slow),
          f"{len(slow)} finding(s): " + "; ".join(f["title"] for f in slow[:2]))

    writer = [r for r in rollouts if r["service"] == "writer"
              and r["proposal_id"].startswith("experiment.")]
    outcome = "no rollout"
    ok = False
    if writer:
        transitions = writer[-1]["transitions"]
        started, last = transitions[0], transitions[-1]
        intervals = (last["time_ns"] - started["time_ns"]) / (args.interval_s * 1e9)
        weight = max(t["weight_bp"] for t in transitions) / 100
        outcome = (f"{last['kind']} after {intervals:g} interval(s), canary weight at most "
                   f"{weight:g}%: {last['reason'][:120]}")
        ok = last["kind"] == "rolled_back" and intervals <= 3 and weight <= 10
    check("bad canary of writer rolled back automatically", ok, outcome)

    control = [p for p in proposals if p["service"] == "control"]
    check("nothing proposed for the healthy control service", not control,
          f"{len(control)} proposal(s)" + (f": {control[0]['title']}" if control else ""))

    return {"events_sent": sim.sent, "minutes": args.minutes,
            "found": [{"kind": f["kind"], "service": f["service"], "model": f["model"],
                       "title": f["title"]} for f in findings],
            "proposed": [{"id": p["id"], "strategy": p["strategy"], "service": p["service"],
                          "status": p["status"],
                          "savings_usd_per_day": p["expected_impact"]["savings_usd_per_day"]}
                         for p in proposals],
            "rollouts": [{"service": r["service"], "proposal_id": r["proposal_id"],
                          "phase": r["phase"],
                          "transitions": [t["kind"] for t in r["transitions"]]}
                         for r in rollouts],
            "checks": checks}


def print_report(result: dict[str, Any]) -> None:
    print(f"\nsent {result['events_sent']:,} events over {result['minutes']} minutes of "
          "event time\n")
    print("found:")
    for f in result["found"]:
        print(f"  {f['kind']:<22} {f['service']:<12} {f['title']}")
    print("proposed:")
    for p in result["proposed"]:
        print(f"  {p['strategy']:<20} {p['service']:<12} {p['status']:<12} "
              f"${p['savings_usd_per_day']:>10,.2f}/day  {p['id']}")
    print("rollouts:")
    for r in result["rollouts"]:
        print(f"  {r['service']:<12} {r['phase']:<12} {' -> '.join(r['transitions'])}")
    print("\nagainst the ground truth:")
    for c in result["checks"]:
        print(f"  [{'PASS' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")


def start_experiment(daemon: Daemon) -> bool:
    """The operator's canary of a cheaper model on writer; False if writer is busy."""
    if "writer" in daemon.call("rollouts"):
        return False
    daemon.call("experiment", service="writer", change={"model": "claude-haiku-4-5"})
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="the daemon's config file (default: embedded)")
    parser.add_argument("--minutes", type=int, default=45, help="event-time minutes (45)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--regression-at", type=int, default=25,
                        help="minute the search latency regression starts (25)")
    parser.add_argument("--experiment-at", type=int, default=12,
                        help="minute the writer canary starts (12)")
    parser.add_argument("--json", help="write the report here as JSON")
    args = parser.parse_args()
    try:
        daemon = Daemon(args.config)
        args.interval_s = load_config(args.config).processor.analysis_interval_s
        start_ns = (time.time_ns() // MINUTE_NS - args.minutes - 1) * MINUTE_NS
        sim = Simulator(daemon, scenario(args), start_ns, args.seed)
        daemon.call("configure", service="writer", model="claude-sonnet-4-5")
        experiment_started = False
        for m in range(args.minutes + 1):  # one more minute: the last ones' windows close
            if m >= args.experiment_at and not experiment_started:
                # Once the writer has no rollout of the optimizer's own running.
                experiment_started = start_experiment(daemon)
            sim.refresh_configs()
            sim.minute(m)
            status = sim.wait_processed()
            print(f"\rminute {m + 1}/{args.minutes + 1}: {sim.sent:,} events sent, "
                  f"{status.get('proposals', {})} proposals, rollouts "
                  f"{status.get('rollouts', [])}", end="", flush=True)
        result = report(sim, args)
    except DaemonError as exc:
        print(f"\nsimulate: {exc}", file=sys.stderr)
        return 2
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
