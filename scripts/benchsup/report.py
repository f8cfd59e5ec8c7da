"""The target-vs-measured table at the end of a run, and the JSON file of every raw sample."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from benchsup.figures import Bench, log_line, median, mib, ms, pct, percent, sec

Row = tuple[str, str, str, str, str]


class Table:
    """Rows of (measurement, target, optimizerd, supervisord, circusd) from a run's results;
    a comparison cell also gives ours/theirs."""

    def __init__(self, results: dict[str, Any]):
        self.r = results
        self.rows: list[Row] = []

    def get(self, *path: Any) -> Any:
        cur: Any = self.r
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    def cmp_cell(self, tool: str, *path: Any, fn: Callable[[Any], float] = median,
                 fmt: Callable[[float], str] = sec, ours: float | None = None) -> str:
        v = self.get(f"compare_{tool}", *path)
        if v is None:
            return ""
        val = fn(v)
        ratio = f" (x{ours / val:.2f})" if ours is not None and val else ""
        return fmt(val) + ratio

    def both(self, *path: Any, fn: Callable[[Any], float] = median,
             fmt: Callable[[float], str] = sec, ours: float | None = None) -> tuple[str, str]:
        """The supervisord and the circusd cell of the same figure."""
        return tuple(self.cmp_cell(tool, *path, fn=fn, fmt=fmt, ours=ours)  # type: ignore
                     for tool in ("supervisord", "circusd"))

    def row(self, label: str, target: str, ours: float | None, fmt: Callable[[float], str],
            sup: str = "", cir: str = "") -> None:
        if ours is not None:
            self.rows.append((label, target, fmt(ours), sup, cir))

    def starts(self) -> None:
        r = self.r
        if self.get("start"):
            self.row("6 services start-to-READY=1 (median)", "<= 1.5 s",
                     median(r["start"]["start"]), sec)
        for n in (6, 50):
            if self.get(f"stubs{n}"):
                ours = median(r[f"stubs{n}"]["start"])
                self.row(f"{n} stubs start-to-READY=1 (median)", "<= 1.0 s" if n == 50 else "-",
                         ours, sec,
                         self.cmp_cell("supervisord", f"stubs{n}_startsecs=1", "start",
                                       ours=ours),
                         self.cmp_cell("circusd", f"stubs{n}", "start", ours=ours))
                sup0 = self.cmp_cell("supervisord", f"stubs{n}_startsecs=0", "start", ours=ours)
                if sup0:
                    self.rows.append(("  vs supervisord startsecs=0", "", "", sup0, ""))

    def crashes(self) -> None:
        def of(key: str) -> Callable[[Any], float]:
            return lambda v: median([s[key] for s in v])
        for name, target in (("collector", "<= 20 ms"), ("stub", "<= 20 ms")):
            c = self.get(f"crash_{name}", "log")
            if c:
                noticed = [s["noticed"] for s in c]
                self.rows.append((f"SIGKILL -> noticed, {name} (median / p95)", target,
                                  f"{ms(median(noticed))} / {ms(pct(noticed, 95))}",
                                  self.cmp_cell("supervisord", "crash", fn=of("noticed"), fmt=ms)
                                  if name == "stub" else "", ""))
        for name, target in (("collector", "<= 500 ms"), ("stub", "<= 150 ms")):
            c = self.get(f"crash_{name}", "log")
            if c:
                ready = [s["ready"] for s in c]
                ours = median(ready)
                cells = self.both("crash", fn=of("ready"), fmt=ms, ours=ours) \
                    if name == "stub" else ("", "")
                self.rows.append((f"SIGKILL -> replacement READY, {name} (median / p95)",
                                  target, f"{ms(ours)} / {ms(pct(ready, 95))}", *cells))

    def stops(self) -> None:
        r = self.r
        if self.get("start"):
            self.row("stop-all, six services: optimizerctl stop (median)", "<= 0.5 s",
                     median(r["start"]["stop_ctl"]), sec)
            self.row("stop-all, six services: until pid gone (median)", "<= 0.5 s",
                     median(r["start"]["stop_gone"]), sec)
        for n, target in ((6, "<= 0.5 s"), (50, "-")):
            if self.get(f"stubs{n}"):
                ours = median(r[f"stubs{n}"]["stop_gone"])
                self.row(f"stop-all, {n} stubs: until pid gone (median)", target, ours, sec,
                         self.cmp_cell("supervisord", f"stubs{n}_startsecs=1", "stop_gone",
                                       ours=ours),
                         self.cmp_cell("circusd", f"stubs{n}", "stop_gone", ours=ours))

    def idle(self) -> None:
        r = self.r
        for key, label, n in (("idle_six", "six services", None), ("idle_stubs6", "6 stubs", 6),
                              ("idle_stubs50", "50 stubs", 50)):
            if not self.get(key):
                continue
            fs = self.get(key, "fork server")
            ours = r[key]["supervisor"]["cpu_pct_sched"]
            self.row(f"idle CPU of supervisor, {label}", "<= 0.2%", ours, percent,
                     *(self.both(f"idle_stubs{n}", fn=lambda v: v["cpu_pct_sched"],
                                 fmt=percent, ours=ours) if n else ()))
            if fs:
                self.row(f"idle CPU of fork server, {label}", "-", fs["cpu_pct_sched"], percent)
            ours = r[key]["supervisor"]["rss_max"]
            self.row(f"RSS of supervisor, {label} (max)", "<= 50 MB", ours, mib,
                     *(self.both(f"idle_stubs{n}", fn=lambda v: v["rss_max"], fmt=mib, ours=ours)
                       if n else ()))
            if fs:
                self.row(f"RSS of fork server, {label} (max)", "-", fs["rss_max"], mib)

    def status(self) -> None:
        r = self.r
        if self.get("status"):
            ours = median(r["status"]["whole"])
            self.row("`optimizerctl status` whole command (median)", "<= 150 ms", ours, ms,
                     *self.both("status_whole", fmt=ms, ours=ours))
            self.rows.append(("raw status round trip (median / p99)", "<= 1 ms",
                              (f"{ms(median(r['status']['raw']))} / "
                               f"{ms(pct(r['status']['raw'], 99))}"), "", ""))

    def orphans(self) -> None:
        def orph(o: dict | None) -> str:
            if not o:
                return ""
            return ("none left" if o["left_after_3s"] == 0 else
                    f"{o['left_after_3s']} of {o['descendants']} left running")
        o = self.get("orphans")
        if o:
            self.rows.append(("SIGKILL of the supervisor: children", "none left", orph(o) + (
                f" ({ms(o['all_gone_s'])})" if o["all_gone_s"] is not None else ""),
                orph(self.get("compare_supervisord", "orphans")),
                orph(self.get("compare_circusd", "orphans"))))


def final_table(b: Bench) -> None:
    t = Table(b.results)
    for part in (t.starts, t.crashes, t.stops, t.idle, t.status, t.orphans):
        part()
    rows = [x for x in t.rows if x[2] or x[3] or x[4]]
    header = ("measurement", "target", "optimizerd", "supervisord (ours/theirs)",
              "circusd (ours/theirs)")
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(5)]
    log_line("\n== summary")
    for x in [header, tuple("-" * w for w in widths), *rows]:
        log_line("| " + " | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) + " |")


def write_json(b: Bench, path: str) -> None:
    with open(path, "w") as f:
        json.dump(b.results, f, indent=1, default=str)
