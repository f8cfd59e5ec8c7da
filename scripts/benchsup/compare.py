"""The same measurements of supervisord and circusd over the same number of stub children:
start and stop, a SIGKILLed child, idle cost, their status command, SIGKILL of the daemon."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from benchsup.env import loadavg, tool_env
from benchsup.figures import Bench, columns, log_line, median, ms, pct, summary
from benchsup.other_daemons import Circusd, OtherDaemon, Supervisord, Venv
from benchsup.processes import orphan_check, time_command
from benchsup.usage import measure_idle

Make = Callable[..., OtherDaemon]


def compare_start_stop(b: Bench, tool: str, make: Make, only: str | None, res: dict) -> None:
    reps = 1 if b.quick else 3
    for n in (6, 50):
        if only not in (None, f"stubs{n}", "stop") or (n == 50 and only == "stop"):
            continue
        variants = [{}] if tool == "circusd" else [{"startsecs": 1}, {"startsecs": 0}]
        for kw in variants:
            starts, ctl, gone, left = [], [], [], []
            for _ in range(reps):
                d = make(n, **kw)
                try:
                    starts.append(d.start())
                    time.sleep(1.0)
                    t_ctl, t_gone, n_left = d.stop()
                    ctl.append(t_ctl)
                    gone.append(t_gone)
                    left.append(n_left)
                finally:
                    d.kill()
            tag = f" startsecs={kw['startsecs']}" if kw else ""
            what = "all RUNNING (log)" if tool == "supervisord" else "all watchers active"
            log_line(f"    {n} children{tag}: start -> {what}: {summary(starts)}; stop: "
                     f"ctl {summary(ctl)}; pid gone {summary(gone)}"
                     + (f"; CHILDREN LEFT RUNNING after the stop: {left}" if any(left)
                        else ""))
            res[f"stubs{n}{tag.replace(' ', '_')}"] = {"start": starts, "stop_ctl": ctl,
                                                       "stop_gone": gone, "left": left}


def compare_crash(b: Bench, tool: str, make: Make, res: dict) -> None:
    kills = 3 if b.quick else 20
    d = make(6)
    try:
        d.start()
        time.sleep(1.5)
        # A random gap: circusd reaps and respawns from a periodic callback (every
        # check_delay, 5 s in an ini file), so a fixed gap would always hit one phase.
        period = 5.0 if tool == "circusd" else 1.0
        samples = [d.crash_cycle("stub0", 0.3 + random.uniform(0, period))
                   for _ in range(kills)]
    finally:
        d.kill()
    cols = columns(samples)
    if tool == "supervisord":
        log_line(f"    SIGKILL of a child (log timestamps, n={kills}): noticed ('exited:')"
                 f" median {ms(median(cols['noticed']))}, respawned ('spawned:') median "
                 f"{ms(median(cols['respawn']))}, replacement RUNNING median "
                 f"{ms(median(cols['ready']))}, p95 {ms(pct(cols['ready'], 95))}, max "
                 f"{ms(max(cols['ready']))}")
    else:  # `list` drops a pid once it is a zombie: circus's own reaping is not seen
        log_line(f"    SIGKILL of a child (polling `list` every 10 ms, n={kills}): new pid "
                 f"listed after median {ms(median(cols['ready']))}, p95 "
                 f"{ms(pct(cols['ready'], 95))}, max {ms(max(cols['ready']))}")
    res["crash"] = samples


def compare_idle(b: Bench, tool: str, make: Make, res: dict) -> None:
    window = 5.0 if b.quick else 30.0
    for n in (6, 50):
        d = make(n)
        try:
            d.start()
            if isinstance(d, Circusd):
                d.close_client()  # no client connected while idle
            time.sleep(3.0)
            r, _ = measure_idle({tool: d.proc.pid}, window)
            log_line(f"    idle, {n} children, {window:g} s: " + r[tool].line())
            res[f"idle_stubs{n}"] = vars(r[tool])
        finally:
            d.kill()


def compare_status(b: Bench, make: Make, res: dict) -> None:
    d = make(6)
    try:
        d.start()
        time.sleep(1.0)
        times = time_command(d.ctl_status(), 5 if b.quick else 20, tool_env(), check=False)
    finally:
        d.kill()
    log_line(f"    `{d.ctl_name} status`, 6 children: {summary(times, ms)}")
    res["status_whole"] = times


def compare_orphans(tool: str, make: Make, res: dict) -> None:
    d = make(6)
    try:
        d.start()
        time.sleep(1.0)
        res["orphans"] = orphan_check(tool, d.proc, 6)
    finally:
        d.kill()


def run_compare(b: Bench, venv: Venv, only: str | None) -> None:
    log_line(f"\n== compare: supervisord and circusd running the same number of stub children "
             f"({loadavg()})")
    venv.ensure()
    b.put("compare_versions", venv.versions)
    makers: dict[str, Make] = {
        "supervisord": lambda n, **kw: Supervisord(venv, n, **kw),
        "circusd": lambda n, **kw: Circusd(venv, n)}
    for tool, make in makers.items():
        res: dict[str, Any] = {}
        log_line(f"  -- {tool}")
        compare_start_stop(b, tool, make, only, res)
        if only in (None, "crash"):
            compare_crash(b, tool, make, res)
        if only in (None, "idle"):
            compare_idle(b, tool, make, res)
        if only in (None, "status"):
            compare_status(b, make, res)
        if only in (None, "orphans"):
            compare_orphans(tool, make, res)
        b.put(f"compare_{tool}", res)
