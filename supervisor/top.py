"""`optimizerctl top`: a live terminal view of a running optimizerd.

A frame is the status document (from the control socket) plus rates computed between two scrapes
of the supervisor's aggregated Prometheus text on the admin endpoint: ingest (events/s from
``collector_events_accepted_total``), spend ($/h from ``processor_llm_cost_usd_total``, summed
over services and models, with the top models) and REST requests/s (``rest_api_requests_total``).
A rate is the counter's increase over the monotonic time between the two scrapes; a counter that
went down (a reset) counts from zero. Without a previous scrape a rate is None ("n/a").

Only the view lives here; ``supervisor/ctl.py`` resolves the daemon and the admin address.
"""
from __future__ import annotations

import json
import os
import re
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from supervisor.formatting import age, rss

EVENTS = "collector_events_accepted_total"
COST = "processor_llm_cost_usd_total"
REQUESTS = "rest_api_requests_total"
TOP_MODELS = 3

STATE_STYLE = {"ready": "bold green", "running": "bold green", "starting": "yellow",
               "stopping": "yellow", "stopped": "dim", "backoff": "bold magenta",
               "failed": "bold red"}
HEALTH_STYLE = {"ok": "green", "degraded": "yellow", "unhealthy": "bold red"}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


# --- scraping ----------------------------------------------------------------------------------

def admin_url(listen: str) -> str:
    """The /metrics URL of an ``[admin] listen`` address (a wildcard host means this host)."""
    if listen.startswith(("http://", "https://")):
        return listen.rstrip("/") + ("" if listen.rstrip("/").endswith("/metrics")
                                     else "/metrics")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


def parse_counters(text: str, names: tuple[str, ...] = (EVENTS, COST, REQUESTS)
                   ) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of the named series in Prometheus text: name -> [(labels, value)]."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {n: [] for n in names}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match or match.group(1) not in found:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(match.group(2) or "")}
        try:
            found[match.group(1)].append((labels, float(match.group(3))))
        except ValueError:
            continue
    return found


@dataclass(frozen=True)
class Sample:
    """The counters of one scrape, at a monotonic time."""

    at: float
    events: float = 0.0
    requests: float = 0.0
    cost_by_model: dict[str, float] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        return sum(self.cost_by_model.values())

    @classmethod
    def from_text(cls, text: str, at: float) -> Sample:
        series = parse_counters(text)
        by_model: dict[str, float] = {}
        for labels, value in series[COST]:  # per (service, model): summed per model
            model = labels.get("model", "?")
            by_model[model] = by_model.get(model, 0.0) + value
        return cls(at=at, events=sum(v for _, v in series[EVENTS]),
                   requests=sum(v for _, v in series[REQUESTS]), cost_by_model=by_model)


def scrape(url: str, timeout: float = 3.0) -> Sample:
    """One scrape of /metrics; raises OSError (URLError included) when it does not answer."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode("utf-8", errors="replace")
    return Sample.from_text(text, time.monotonic())


def _increase(old: float, new: float) -> float:
    return new - old if new >= old else new  # went down: the counter was reset


@dataclass(frozen=True)
class Rates:
    interval_s: float
    events_per_s: float
    requests_per_s: float
    spend_per_h: float
    spend_per_h_by_model: dict[str, float]

    @classmethod
    def between(cls, a: Sample, b: Sample) -> Rates | None:
        dt = b.at - a.at
        if dt <= 0:
            return None
        by_model = {m: _increase(a.cost_by_model.get(m, 0.0), v) / dt * 3600
                    for m, v in b.cost_by_model.items()}
        return cls(interval_s=dt, events_per_s=_increase(a.events, b.events) / dt,
                   requests_per_s=_increase(a.requests, b.requests) / dt,
                   spend_per_h=sum(by_model.values()), spend_per_h_by_model=by_model)


# --- a frame -----------------------------------------------------------------------------------

@dataclass
class Frame:
    """What one refresh shows: the status document (None: daemon unreachable), the latest
    scrape and the rates since the one before."""

    status: dict[str, Any] | None
    metrics_url: str
    sample: Sample | None = None
    rates: Rates | None = None
    status_error: str = ""
    metrics_error: str = ""
    taken_at: float = field(default_factory=time.time)

    def top_models(self, n: int = TOP_MODELS) -> list[tuple[str, float, float | None]]:
        """(model, total USD, USD/h or None), highest rate first (then highest total)."""
        if self.sample is None:
            return []
        rates = self.rates.spend_per_h_by_model if self.rates else {}
        rows = [(m, total, rates.get(m)) for m, total in self.sample.cost_by_model.items()]
        rows.sort(key=lambda r: (-(r[2] or 0.0), -r[1], r[0]))
        return rows[:n]

    def as_json(self) -> dict[str, Any]:
        r, s = self.rates, self.sample
        return {
            "taken_at": self.taken_at,
            "supervisor": (self.status or {}).get("supervisor"),
            "services": [{k: svc.get(k) for k in (
                "name", "instance", "state", "pid", "uptime_s", "restarts", "heartbeat_age_s",
                "health", "cpu_percent", "rss_bytes", "reason")}
                for svc in (self.status or {}).get("services", [])],
            "metrics_url": self.metrics_url,
            "interval_s": round(r.interval_s, 3) if r else None,
            "events_per_s": r.events_per_s if r else None,
            "requests_per_s": r.requests_per_s if r else None,
            "spend_usd_per_h": r.spend_per_h if r else None,
            "events_total": s.events if s else None,
            "requests_total": s.requests if s else None,
            "spend_usd_total": s.cost if s else None,
            "top_models": [{"model": m, "spend_usd_total": t, "spend_usd_per_h": h}
                           for m, t, h in self.top_models()],
            "errors": {k: v for k, v in (("status", self.status_error),
                                         ("metrics", self.metrics_error)) if v},
        }


class Source:
    """Makes frames: ``status()`` gives the status document (raises on failure), the admin
    endpoint the counters; each frame's rates are over the time since the previous scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]], metrics_url: str):
        self.status, self.metrics_url = status, metrics_url
        self.last: Sample | None = None

    def prime(self) -> None:
        """A first scrape, so that the next frame has rates."""
        try:
            self.last = scrape(self.metrics_url)
        except (OSError, ValueError):
            self.last = None

    def frame(self) -> Frame:
        frame = Frame(status=None, metrics_url=self.metrics_url)
        try:
            frame.status = self.status()
        except Exception as exc:  # noqa: BLE001 - shown in the frame, the view keeps going
            frame.status_error = str(exc) or type(exc).__name__
        try:
            sample = scrape(self.metrics_url)
        except (OSError, ValueError) as exc:
            frame.metrics_error = f"{self.metrics_url}: {getattr(exc, 'reason', exc)}"
            self.last = None
            return frame
        frame.sample = sample
        frame.rates = Rates.between(self.last, sample) if self.last else None
        self.last = sample
        return frame


# --- rendering ---------------------------------------------------------------------------------

def usd(value: float) -> str:
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:.2f}"
    return f"${value:.4f}"


def render(frame: Frame, live: bool = False, interval: float = 1.0) -> RenderableType:
    parts: list[RenderableType] = []
    clock = time.strftime("%H:%M:%S", time.localtime(frame.taken_at))
    doc = frame.status
    if doc is None:
        parts.append(Text.assemble(("optimizerd not reachable", "bold red"),
                                   f": {frame.status_error}  ", (clock, "dim")))
    else:
        sup = doc["supervisor"]
        ready = Text("ready", "bold green") if sup.get("ready") else Text("not ready",
                                                                          "bold yellow")
        parts.append(Text.assemble(
            ("optimizerd", "bold"), f" pid {sup['pid']}  ",
            (str(sup["state"]), STATE_STYLE.get(sup["state"], "bold")),
            f"  up {age(sup['uptime_s'])}  config {sup['config_hash']}  ", ready,
            "  ", (clock, "dim")))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for title, justify in (("SERVICE", "left"), ("STATE", "left"), ("PID", "right"),
                               ("UPTIME", "right"), ("RESTARTS", "right"),
                               ("HB AGE", "right"), ("HEALTH", "left"), ("CPU%", "right"),
                               ("RSS", "right"), ("REASON", "left")):
            table.add_column(title, justify=justify, no_wrap=title != "REASON")
        for s in doc["services"]:
            name = s["name"] if s.get("instance", 0) == 0 else f"{s['name']}#{s['instance']}"
            cpu = "-" if s.get("cpu_percent") is None else f"{s['cpu_percent']:.1f}"
            table.add_row(name, Text(s["state"], STATE_STYLE.get(s["state"], "")),
                          str(s["pid"] or "-"), age(s["uptime_s"] or None),
                          Text(str(s["restarts"]), "yellow" if s["restarts"] else ""),
                          age(s["heartbeat_age_s"]),
                          Text(s["health"], HEALTH_STYLE.get(s["health"], "")), cpu,
                          rss(s.get("rss_bytes")), s.get("reason") or "")
        parts.append(table)
    parts.append(render_rates(frame, live))
    if live:
        parts.append(Text(f"q to quit  (refresh every {interval:g} s)", "dim"))
    return Group(*parts)


def render_rates(frame: Frame, live: bool = False) -> RenderableType:
    if frame.metrics_error:
        return Text.assemble(("rates n/a", "yellow"), f": metrics not readable at "
                             f"{frame.metrics_error}")
    r, s = frame.rates, frame.sample
    assert s is not None
    if r is None:
        figures = [Text("n/a", "dim")] * 3
        note = "   (measuring)" if live else ""
    else:
        figures = [Text(f"{r.events_per_s:.1f} events/s", "bold cyan"),
                   Text(f"{usd(r.spend_per_h)}/h", "bold cyan"),
                   Text(f"{r.requests_per_s:.1f} req/s", "bold cyan")]
        note = f"   over {r.interval_s:.1f} s"
    line = Text.assemble("ingest ", figures[0], f" ({s.events:.0f} total)   spend ",
                         figures[1], f" ({usd(s.cost)} total)")
    services = (frame.status or {}).get("services", [])
    if s.requests or any(svc["name"] == "rest_api" for svc in services):
        line.append("   REST ")
        line.append_text(figures[2])
    line.append(note, "dim")
    models = frame.top_models()
    if not models:
        return line
    shown = [f"{m} {usd(h)}/h ({usd(t)})" if h is not None else f"{m} ({usd(t)})"
             for m, t, h in models]
    return Group(line, Text("top models: " + ", ".join(shown)))


# --- running -----------------------------------------------------------------------------------

def console() -> Console:
    """stdout; when it is not a terminal no colours, and 120 columns unless COLUMNS says."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=120)


def run_once(source: Source, interval: float, as_json: bool) -> Frame:
    """One frame whose rates are over ``interval`` seconds (two scrapes; 0: none)."""
    if interval > 0:
        source.prime()
        if source.last is not None:
            time.sleep(interval)
    frame = source.frame()
    if as_json:
        print(json.dumps(frame.as_json()))
    else:
        console().print(render(frame))
    return frame


class Keys:
    """Keys from stdin without blocking: cbreak mode while it is a terminal, restored on exit
    (also on Ctrl-C and exceptions); when stdin is no terminal, keys are not read."""

    def __init__(self) -> None:
        self.fd: int | None = None  # where keys are read from; None: not read
        self.tty_fd: int | None = None
        self.saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        try:
            if sys.stdin is not None and sys.stdin.isatty():
                fd = sys.stdin.fileno()
                self.saved = termios.tcgetattr(fd)
                self.tty_fd = fd
                tty.setcbreak(fd, termios.TCSANOW)
                self.fd = fd
        except (OSError, termios.error, ValueError):
            self.fd = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tty_fd is not None and self.saved is not None:
            try:
                termios.tcsetattr(self.tty_fd, termios.TCSADRAIN, self.saved)
            except (OSError, termios.error):
                pass

    def wait(self, timeout: float) -> str:
        """Keys typed within ``timeout`` seconds ('' when none)."""
        timeout = max(0.0, timeout)
        if self.fd is None:
            time.sleep(timeout)
            return ""
        if not select.select([self.fd], [], [], timeout)[0]:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # the terminal went away: no more keys, only the refresh
            self.fd = None
        return data.decode(errors="replace")


def run_live(source: Source, interval: float) -> int:
    """Refresh every ``interval`` seconds until `q` (exit 0) or Ctrl-C (exit 0)."""
    out = console()
    try:
        with ExitStack() as stack:
            keys = stack.enter_context(Keys())  # the first frame's rates: n/a (measuring)
            live = stack.enter_context(Live(console=out, screen=True, auto_refresh=False,
                                            redirect_stdout=False, redirect_stderr=False))
            deadline = time.monotonic()
            while True:
                if time.monotonic() >= deadline:
                    live.update(render(source.frame(), live=True, interval=interval),
                                refresh=True)
                    deadline = max(deadline + interval, time.monotonic() + interval / 10)
                if any(k in "qQ" for k in keys.wait(deadline - time.monotonic())):
                    return 0
    except KeyboardInterrupt:
        return 0
