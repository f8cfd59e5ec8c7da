"""`optimizerctl top` against a running optimizerd: one frame (`--once`, text and JSON) with every
service and non-zero ingest and spend figures; exit 1 when the daemon is down; and the live view
driven in tmux (the table refreshes after a SIGKILLed collector restarts, `q` and Ctrl-C exit 0
and give the terminal back)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from supervisor import top
from tests.conftest import Daemon, free_port, http_get, post_events, stub, wait_until

pytestmark = pytest.mark.timeout(120)

T0 = 1_795_600_800  # 2026-11-25T10:00:00Z: event time, seconds
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60}
SERVICES = ("storage", "collector", "processor")
MODELS = ("gpt-4o", "gpt-4o-mini")
# Posting flat out on a loaded machine can hold a worker's loop for a while: no restarts for that.
LENIENT = {"heartbeat_timeout": 6.0}


def event_time(i: int) -> float:
    """Call i's event time: the first 600 one a second from T0, then 20 a second (kept in the
    past: the collector refuses events from the future)."""
    return float(T0 + i) if i < 600 else T0 + 600 + (i - 600) * 0.05


def events(first: int, n: int) -> list[dict]:
    """Calls ``first`` .. ``first + n - 1``."""
    return [{"event_id": f"top-{i}", "time": event_time(i), "service": "support-bot",
             "model": MODELS[i % 2], "input_tokens": 400 + i % 300, "output_tokens": 80,
             "latency_ms": 350.0, "status": "ok"} for i in range(first, first + n)]


def post(d: Daemon, batch: list[dict]) -> None:
    post_events(f"http://{d.doc['collector']['listen']}/v1/events", batch)


def spend_total(d: Daemon) -> float:
    code, body = http_get(d.admin_url("/metrics"))
    assert code == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith("processor_llm_cost_usd_total{"))


class Poster:
    """Keeps posting batches (event time moving on) from a thread until stopped."""

    def __init__(self, d: Daemon, first: int):
        self.d, self.next, self.posted = d, first, 0
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                post(self.d, events(self.next, 20))
                self.next += 20
                self.posted += 20
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Poster:
        self.thread.start()
        wait_until(lambda: self.posted or self.errors, 10, message="no batch posted")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.errors, self.errors


@pytest.fixture
def daemon(make_daemon):
    d = make_daemon(builtins=list(SERVICES), extra={"processor": PROCESSOR},
                    supervisor=LENIENT).start()
    post(d, events(0, 600))  # ten minutes of event time: windows close, spend appears
    wait_until(lambda: spend_total(d) > 0, 30, message="no spend in /metrics")
    return d


def row(text: str, service: str) -> list[str] | None:
    """The table row of ``service`` split in cells, or None."""
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == service:
            return cells
    return None


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_once_shows_every_service_and_the_rates(daemon):
    before = daemon.services()
    with Poster(daemon, 600) as poster:  # posting all through the measuring interval
        result = daemon.ctl("top", "--once", "--interval", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    after = daemon.services()
    sup = daemon.status()["supervisor"]
    assert f"optimizerd pid {daemon.pid}" in out and sup["config_hash"] in out
    for name in SERVICES:
        cells = row(out, name)
        assert cells, f"no row for {name}:\n{out}"
        # SERVICE STATE PID UPTIME RESTARTS HB-AGE HEALTH CPU% RSS
        assert cells[1] == "ready" and cells[6] == "ok", out
        assert cells[2] in (str(before[name]["pid"]), str(after[name]["pid"])), out
        assert before[name]["restarts"] <= int(cells[4]) <= after[name]["restarts"], out
    ingest = re.search(r"ingest ([\d,.]+) events/s \(([\d,]+) total\)", out)
    assert ingest, out
    assert number(ingest.group(1)) > 0 and number(ingest.group(2)) >= 600, out
    spend = re.search(r"spend \$([\d,.]+)/h \(\$([\d,.]+) total\)", out)
    assert spend and number(spend.group(2)) > 0, out
    assert re.search(r"top models: gpt-4o(-mini)? \$", out), out
    assert re.search(r"over \d+\.\d s", out) and "q to quit" not in out

    with Poster(daemon, poster.next):
        result = daemon.ctl("top", "--once", "--json", "--interval", "1")
    assert result.returncode == 0, result.stderr
    frame = json.loads(result.stdout)
    assert [s["name"] for s in frame["services"]] == list(SERVICES)
    assert all(s["state"] == "ready" and s["pid"] for s in frame["services"])
    assert frame["events_per_s"] > 0 and frame["spend_usd_total"] > 0
    assert frame["interval_s"] >= 1.0
    assert {m["model"] for m in frame["top_models"]} == set(MODELS)
    assert frame["metrics_url"] == f"http://127.0.0.1:{daemon.admin_port}/metrics"
    assert frame["errors"] == {}

    # Metrics not readable: the processes are still shown, the rates say why they are n/a.
    nowhere = f"127.0.0.1:{free_port()}"
    result = daemon.ctl("top", "--once", "--interval", "0", "--admin", nowhere)
    assert result.returncode == 0, result.stderr
    assert row(result.stdout, "collector") and "rates n/a" in result.stdout
    assert f"http://{nowhere}/metrics" in result.stdout.replace("\n", "")


def test_counters_and_rates():
    text = """# HELP collector_events_accepted_total Events written to the event log.
collector_events_accepted_total{source="json"} 30.0
collector_events_accepted_total{source="otlp"} 10.0
processor_llm_cost_usd_total{model="gpt-4o",service="a"} 1.5
processor_llm_cost_usd_total{model="gpt-4o",service="b \\"x\\""} 0.5
processor_llm_cost_usd_total{model="mini",service="a"} 0.25
processor_llm_cost_usd_created{model="mini",service="a"} 1.7e9
rest_api_requests_total{method="GET",route="/v1/x",status="200"} 4
"""
    a = top.Sample.from_text(text, at=10.0)
    assert (a.events, a.requests, a.cost_by_model) == (40, 4, {"gpt-4o": 2.0, "mini": 0.25})
    b = top.Sample(at=12.0, events=50, requests=2, cost_by_model={"gpt-4o": 2.5, "mini": 0.25})
    r = top.Rates.between(a, b)
    assert r.events_per_s == 5 and r.spend_per_h == pytest.approx(900)
    assert r.requests_per_s == 1  # went down from 4 to 2: a reset, counted from zero
    assert r.spend_per_h_by_model == {"gpt-4o": pytest.approx(900), "mini": 0}
    assert top.Rates.between(b, b) is None
    assert top.admin_url("0.0.0.0:9090") == "http://127.0.0.1:9090/metrics"
    assert top.admin_url("[::1]:9090") == "http://[::1]:9090/metrics"


def test_daemon_not_running_exits_1_and_usage_errors_2(make_daemon):
    d = make_daemon(services={"a": stub()}).start()
    assert d.ctl("stop").returncode == 0
    result = d.ctl("top", "--once")
    assert result.returncode == 1 and result.stdout == ""
    assert "optimizerd is not reachable" in result.stderr and "--runtime-dir" in result.stderr
    # Live mode needs a terminal (here stdout is a pipe); --json only with --once.
    result = d.ctl("top")
    assert result.returncode == 2 and "use `optimizerctl top --once`" in result.stderr
    result = d.ctl("top", "--json")
    assert result.returncode == 2 and "--json needs --once" in result.stderr


# --- the live view in tmux -----------------------------------------------------------------------

class Tmux:
    """A private tmux server (its own socket) running one command in a 160x40 pane."""

    def __init__(self, d: Daemon):
        self.d = d
        self.socket = str(d.dir / "tmux.sock")

    def tmux(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-S", self.socket, *args], env=self.d.env,
                              capture_output=True, text=True, timeout=10)

    def start(self, name: str) -> dict[str, Path]:
        """Run `optimizerctl top` in session ``name`` through a wrapper that records its exit
        status, its stderr and the terminal's modes after it."""
        files = {k: self.d.dir / f"{name}.{k}" for k in ("rc", "err", "stty", "sh")}
        files["sh"].write_text(
            "trap : INT\n"  # the shell outlives a Ctrl-C that top handles; top gets it
            f"optimizerctl --runtime-dir {self.d.runtime} top 2>{files['err']}\n"
            f"echo $? >{files['rc']}.tmp\n"
            f"stty -a >{files['stty']}\n"
            f"mv {files['rc']}.tmp {files['rc']}\n")
        started = self.tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "40",
                            f"sh {files['sh']}")
        assert started.returncode == 0, started.stderr
        return files

    def pane(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", name).stdout

    def gone(self, name: str) -> bool:
        return self.tmux("has-session", "-t", name).returncode != 0

    def close(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def tmux(make_daemon):
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is not installed (add it to scripts/test.sh's apt packages)")
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    d = make_daemon(builtins=list(SERVICES), extra={"processor": PROCESSOR},
                    supervisor=LENIENT).start()
    t = Tmux(d)
    try:
        yield t
    finally:
        t.close()


def table_ready(t: Tmux, name: str) -> str | None:
    text = t.pane(name)
    rows = [row(text, s) for s in SERVICES]
    if all(r and r[1] == "ready" for r in rows) and "q to quit" in text:
        return text
    return None


def exited_cleanly(files: dict[str, Path]) -> None:
    assert files["rc"].read_text().strip() == "0"
    assert files["err"].read_text() == ""  # no traceback
    modes = files["stty"].read_text().split()
    assert "icanon" in modes and "echo" in modes, modes  # cbreak mode undone


def test_live_view_in_tmux_refreshes_and_quits(tmux):
    d = tmux.d
    files = tmux.start("top")
    first = wait_until(lambda: table_ready(tmux, "top"), 20,
                       message=lambda: f"no table in the pane:\n{tmux.pane('top')}")
    assert "ingest" in first and "config " + d.status()["supervisor"]["config_hash"] in first
    collector = d.services()["collector"]
    old, restarts = collector["pid"], collector["restarts"]
    assert row(first, "collector")[2] == str(old), first

    os.kill(old, signal.SIGKILL)

    def restarted() -> list[str] | None:
        cells = row(tmux.pane("top"), "collector")
        return cells if cells and cells[1] == "ready" and int(cells[4]) > restarts else None

    cells = wait_until(restarted, 30, message=lambda: f"pane:\n{tmux.pane('top')}")
    assert cells[2] != str(old) and cells[2] == str(d.services()["collector"]["pid"])
    # after the first frame ("measuring") the rates are over the time since the last refresh
    wait_until(lambda: re.search(r"events/s .* over \d+\.\d s", tmux.pane("top")), 10,
               message=lambda: f"pane:\n{tmux.pane('top')}")

    assert tmux.tmux("send-keys", "-t", "top", "q").returncode == 0
    wait_until(lambda: tmux.gone("top") and files["rc"].exists(), 15,
               message=lambda: f"top still running:\n{tmux.pane('top')}")
    exited_cleanly(files)


def test_live_view_ctrl_c_exits_0_without_traceback(tmux):
    files = tmux.start("top2")
    wait_until(lambda: table_ready(tmux, "top2"), 20,
               message=lambda: f"no table in the pane:\n{tmux.pane('top2')}")
    assert tmux.tmux("send-keys", "-t", "top2", "C-c").returncode == 0
    wait_until(lambda: tmux.gone("top2") and files["rc"].exists(), 15,
               message=lambda: f"top still running:\n{tmux.pane('top2')}")
    exited_cleanly(files)
