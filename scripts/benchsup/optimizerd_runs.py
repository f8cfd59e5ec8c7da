"""The measurements of optimizerd: start and stop, crash recovery, idle cost, `optimizerctl
status`, and what is left when the supervisor itself is SIGKILLed."""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable

from benchsup.env import OPTIMIZERCTL, clean_env, loadavg
from benchsup.figures import Bench, columns, log_line, median, ms, pct, sec, summary
from benchsup.optimizerd import Optimizerd, RawClient
from benchsup.processes import orphan_check, time_command
from benchsup.usage import measure_idle

STOP_PARTS = ("services_stopped", "teardown", "request_received", "exit_after_log")


def run_start(b: Bench, key: str, title: str, make: Callable[[], Optimizerd]) -> None:
    log_line(f"\n== {title}: launch of `optimizerd start` -> READY=1, then `optimizerctl stop` "
             f"({loadavg()})")
    starts, inner, ctl, gone = [], [], [], []
    parts: dict[str, list[float]] = {k: [] for k in STOP_PARTS}
    for i in range(b.reps):
        d = make()
        try:
            starts.append(d.start())
            own = d.all_ready_line()
            if own is not None:
                inner.append(own)
            time.sleep(1.0)  # let it settle: first heartbeats, first resource sample
            t_ctl, t_gone, bd = d.stop()
            ctl.append(t_ctl)
            gone.append(t_gone)
            for k in STOP_PARTS:
                if k in bd:
                    parts[k].append(bd[k])
            log_line(f"  run {i + 1}: READY=1 after {sec(starts[-1])} (daemon's own figure "
                     f"{own} s); stop: optimizerctl {sec(t_ctl)}, pid gone {sec(t_gone)}, "
                     f"stop received {ms(bd.get('request_received'))} after the launch of "
                     f"optimizerctl, services stopped {ms(bd.get('services_stopped'))} later, "
                     f"teardown {ms(bd.get('teardown'))}, exit {ms(bd.get('exit_after_log'))}")
        finally:
            d.kill()
    log_line(f"  start-to-READY=1:               {summary(starts)}")
    log_line(f"  daemon's 'all ready in' figure:  {summary(inner)}  (from its __init__, "
             f"so without interpreter start and imports)")
    log_line(f"  stop (optimizerctl stop wall):   {summary(ctl)}")
    log_line(f"  stop (until daemon pid gone):    {summary(gone)}")
    log_line(f"  breakdown (log timestamps): optimizerctl launch -> 'stopping all services': "
             f"{summary(parts['request_received'], ms)}")
    log_line(f"    'stopping all' -> last service stopped: "
             f"{summary(parts['services_stopped'], ms)}")
    log_line(f"    last stopped -> 'optimizerd stopped' (teardown): "
             f"{summary(parts['teardown'], ms)}")
    log_line(f"    'optimizerd stopped' -> pid gone (interpreter exit): "
             f"{summary(parts['exit_after_log'], ms)}")
    b.put(key, {"start": starts, "daemon_ready": inner, "stop_ctl": ctl, "stop_gone": gone,
                **parts})


def crash_cycle(d: Optimizerd, name: str, settle: float) -> dict[str, float]:
    """SIGKILL the READY process of ``name``; times read from the daemon's log timestamps."""
    tail = d.tail
    svc = d.service(name)
    assert svc["state"] == "ready", svc
    pid = svc["pid"]
    tail.skip()
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)

    def transition(text: str) -> dict:
        return tail.wait_for(lambda r: r.get("logger") == "optimizerd.supervisor"
                             and r["msg"].startswith(f"{name}: {text}"), 10, f"{name}: {text}")
    noticed = transition("ready -> backoff")
    delay = float(re.search(r"restarting in ([\d.]+) s", noticed["msg"]).group(1))
    spawned = transition("stopped -> starting")
    ready = transition("starting -> ready")
    time.sleep(settle)  # > stable_after: the next kill is again a first failure
    return {"noticed": noticed["t"] - t_kill, "backoff": delay,
            "respawn": spawned["t"] - t_kill, "ready": ready["t"] - t_kill,
            "spawn_to_ready": ready["t"] - spawned["t"]}


def crash_cycle_polled(d: Optimizerd, name: str, settle: float) -> dict[str, float]:
    """The same, timed by polling status on the raw control socket every ~1 ms."""
    svc = d.service(name)
    assert svc["state"] == "ready", svc
    pid = svc["pid"]
    noticed = None
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while True:
        s = d.service(name)
        now = time.monotonic() - t0
        if noticed is None and (s["state"] != "ready" or s["pid"] != pid):
            noticed = now
        if s["state"] == "ready" and s["pid"] not in (None, pid):
            break
        if now > 10:
            raise TimeoutError(f"{name} not replaced within 10 s")
        time.sleep(0.001)
    time.sleep(settle)
    return {"noticed": noticed, "ready": now}


def run_crash(b: Bench) -> None:
    kills = 5 if b.quick else 20
    polled = 2 if b.quick else 5
    settle = 0.3
    log_line(f"\n== crash: SIGKILL a READY worker, {kills} times per service ({loadavg()})")
    log_line("  config: max_restarts=1000, backoff_base=0.1 (default), stable_after=0.05, "
             f"kills spaced {settle} s after the previous replacement was READY, so every "
             "restart is a first failure at the default first backoff (0.1 s +-20% jitter)")
    d = Optimizerd("crash", stubs=1, supervisor={"max_restarts": 1000, "stable_after": 0.05})
    try:
        d.start()
        time.sleep(0.5)
        for name in ("collector", "stub"):
            samples = [crash_cycle(d, name, settle) for _ in range(kills)]
            cols = columns(samples)
            log_line(f"  {name} (log timestamps, 1 ms resolution, n={kills}):")
            log_line(f"    kill -> noticed (ready -> backoff):  median "
                     f"{ms(median(cols['noticed']))}, p95 {ms(pct(cols['noticed'], 95))}, "
                     f"max {ms(max(cols['noticed']))}")
            wait = [s["respawn"] - s["noticed"] for s in samples]
            log_line(f"    backoff (noticed -> respawned):      median {ms(median(wait))}, "
                     f"min {ms(min(wait))}, max {ms(max(wait))} (planned "
                     f"{min(cols['backoff']):.2f}-{max(cols['backoff']):.2f} s)")
            log_line(f"    kill -> replacement spawned:         median "
                     f"{ms(median(cols['respawn']))}, p95 {ms(pct(cols['respawn'], 95))}")
            log_line(f"    spawn -> replacement READY:          median "
                     f"{ms(median(cols['spawn_to_ready']))}, p95 "
                     f"{ms(pct(cols['spawn_to_ready'], 95))}")
            log_line(f"    kill -> replacement READY:           median {ms(median(cols['ready']))}"
                     f", p95 {ms(pct(cols['ready'], 95))}, max {ms(max(cols['ready']))}")
            ps = [crash_cycle_polled(d, name, settle) for _ in range(polled)]
            log_line(f"    cross-check by polling raw status every ~1 ms (n={polled}): noticed "
                     f"median {ms(median([p['noticed'] for p in ps]))}, replacement READY median "
                     f"{ms(median([p['ready'] for p in ps]))}")
            b.put(f"crash_{name}", {"log": samples, "polled": ps})
    finally:
        d.kill()


def run_idle(b: Bench) -> None:
    window = 5.0 if b.quick else 30.0
    log_line(f"\n== idle: {window:g} s after READY (+3 s settling), heartbeats every 1 s")
    for key, title, make in (
            ("idle_six", "six services", lambda: Optimizerd("idle6svc")),
            ("idle_stubs6", "6 stubs", lambda: Optimizerd("idle6", stubs=6, builtins=False)),
            ("idle_stubs50", "50 stubs", lambda: Optimizerd("idle50", stubs=50, builtins=False))):
        d = make()
        try:
            d.start()
            time.sleep(3.0)
            pids = {"supervisor": d.pid, **d.helpers()}
            workers = d.worker_pids()
            log_line(f"  {title} ({loadavg()}):")
            res, groups = measure_idle(pids, window, {"workers": workers})
            for r in res.values():
                log_line("    " + r.line())
            log_line(f"    all {len(workers)} workers together: CPU {groups['workers']:.2f}% "
                     "of a core")
            b.put(key, {k: vars(v) for k, v in res.items()} | {"workers_cpu_pct":
                                                                 groups["workers"]})
        finally:
            d.kill()


def time_raw_status(d: Optimizerd, n: int) -> tuple[list[float], list[float]]:
    """Round trips of 'status' over the raw socket: n on one warm DEALER, then n/5 with a new
    context and socket each, as optimizerctl makes them."""
    raw = d.raw
    for _ in range(50):
        raw.status()  # warm-up
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        raw.status()
        lat.append(time.perf_counter() - t0)
    fresh = []
    for _ in range(n // 5):
        t0 = time.perf_counter()
        c = RawClient(d.runtime)
        c.status()
        c.close()
        fresh.append(time.perf_counter() - t0)
    return lat, fresh


def run_status(b: Bench) -> None:
    whole_n = 5 if b.quick else 20
    raw_n = 200 if b.quick else 1000
    log_line(f"\n== status: `optimizerctl status` round trip, six services ({loadavg()})")
    d = Optimizerd("status")
    try:
        d.start()
        time.sleep(1.0)
        env = clean_env()
        whole = time_command([OPTIMIZERCTL, "-c", d.cfg, "status"], whole_n, env)
        log_line(f"  whole command ({OPTIMIZERCTL} -c CFG status): {summary(whole, ms)}, "
                 f"p95 {ms(pct(whole, 95))}")
        json_whole = time_command([OPTIMIZERCTL, "--runtime-dir", d.runtime, "status", "--json"],
                                  whole_n, env)
        log_line(f"  whole command (--runtime-dir DIR status --json): {summary(json_whole, ms)}")
        # pyenv puts its version's bin first on PATH for us, so look for its shim by name
        shim = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                            "shims", "optimizerctl")
        shim_t = []
        if os.access(shim, os.X_OK):
            shim_t = time_command([shim, "-c", d.cfg, "status"], min(whole_n, 10), env)
            log_line(f"  through the PATH entry {shim} (a pyenv shim): {summary(shim_t, ms)}")
        base = time_command([sys.executable, "-c", "pass"], 10, env)
        imp = time_command([sys.executable, "-c", "import supervisor.ctl"], 10, env)
        log_line(f"  for reference: `python -c pass` {summary(base, ms)}; "
                 f"`python -c 'import supervisor.ctl'` {summary(imp, ms)}")
        lat, fresh = time_raw_status(d, raw_n)
        log_line(f"  raw socket (one DEALER, msgpack Request 'status' -> Reply, n={raw_n}): "
                 f"median {ms(median(lat))}, p99 {ms(pct(lat, 99))}, max {ms(max(lat))}")
        log_line(f"  raw socket, new context+socket per request (what optimizerctl does, "
                 f"n={len(fresh)}): median {ms(median(fresh))}, p99 {ms(pct(fresh, 99))}")
        b.put("status", {"whole": whole, "json_whole": json_whole, "shim": shim_t,
                         "python_pass": base, "import_ctl": imp, "raw": lat, "raw_fresh": fresh})
    finally:
        d.kill()


def run_orphans(b: Bench) -> None:
    log_line("\n== orphans: SIGKILL the supervisor of 6 stubs")
    d = Optimizerd("orphans", stubs=6, builtins=False)
    try:
        d.start()
        time.sleep(0.5)
        b.put("orphans", orphan_check("optimizerd", d.proc, 6))
    finally:
        d.kill()
