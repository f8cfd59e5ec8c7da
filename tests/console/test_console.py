"""The web console (``/ui``) end to end: a running optimizerd with every built-in service, fed
by ``scripts/simulate.py`` (traffic of known ground truth: a promoted cheaper model, a rolled
back canary, a latency regression...), driven in headless Chromium through Playwright.

The browser is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``) driven by
Playwright for Python (``pip install playwright``; ``playwright install`` is never needed).
Without either the module is skipped, except with ``CI=true``, where it fails.

Set ``CONSOLE_SCREENSHOTS=docs/images`` to refresh the README's screenshots.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, post_events, wait_until
from tests.rest_api.test_endpoints import Api, create_key

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CONSOLE_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 768}
TIMEOUT_MS = 30_000
SHIFT_MIN = 30
pytestmark = pytest.mark.timeout(300)

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None


def _missing() -> str | None:
    if sync_playwright is None:
        return "playwright (pip install playwright) is not installed"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def daemon():
    """Six built-in services; 20 minutes of simulated traffic; auto-deploy then switched off
    (by its feature flag) so that new proposals stay open for the role tests."""
    d = Daemon(builtins=True, extra={"processor": {
        "allowed_lateness_s": 5, "checkpoint_interval_s": 2.0,
        "decisions": {"auto_deploy": True, "every_intervals": 1},
        "canary": {"promote_min_samples": 600}}})
    try:
        d.start(timeout=60)
        d.base = f"http://{d.doc['rest_api']['listen']}"
        d.api = Api(d.base)
        d.collector = f"http://{d.doc['collector']['listen']}/v1/events"
        d.keys = {role: create_key(d, role) for role in ("viewer", "operator", "admin")}
        report = Path(d.dir) / "simulation.json"
        # The simulator's traffic ends SHIFT_MIN minutes ago (its clock is moved back), so
        # that a later test still has event time to send a new service's calls in (the
        # collector takes events at most 5 minutes ahead of now).
        args = ["-c", d.config_path, "--minutes", "20", "--experiment-at", "4",
                "--regression-at", "10", "--json", str(report)]
        shifted = (f"import runpy, sys, time; real = time.time_ns; "
                   f"time.time_ns = lambda: real() - {SHIFT_MIN * 60 * 10**9}; "
                   f"sys.argv = {[str(ROOT / 'scripts' / 'simulate.py'), *args]!r}; "
                   f"runpy.run_path(sys.argv[0], run_name='__main__')")
        run = subprocess.run([sys.executable, "-c", shifted], capture_output=True, text=True,
                             timeout=240, env=d.env)
        assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
        d.simulation = json.loads(report.read_text())
        status, _, flag = d.api("PUT", "/v1/admin/flags/auto_deploy", key=d.keys["admin"],
                                body={"enabled": False})
        assert status == 200 and flag["enabled"] is False
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def open_page(browser, daemon, tmp_path):
    """open_page(role, hash) -> a signed-in page at 1366x768; no console error allowed."""
    contexts, errors = [], []

    def open_(role: str, where: str = "#/overview"):
        context = browser.new_context(viewport=VIEWPORT)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                and "status of 401" not in m.text else None)  # a refused key is a test
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{daemon.base}/ui{where}")
        page.get_by_label("API key or token").fill(daemon.keys[role])
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_contain_text(role)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, errors  # CSP violations and script errors show here


def shoot(page, name: str, tmp_path: Path) -> None:
    target = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    if not target.is_absolute():
        target = ROOT / target
    target.mkdir(parents=True, exist_ok=True)
    # not "networkidle": the event stream stays open
    page.wait_for_function("() => !document.querySelector('[aria-busy]') && "
                           "document.querySelector('#view > div')")
    page.screenshot(path=str(target / f"{name}.png"), full_page=True)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


# --- serving ------------------------------------------------------------------------------------

def test_page_and_files_are_served_with_csp_caching_and_compression(daemon):
    status, headers, body = get(f"{daemon.base}/ui")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "connect-src 'self'" in csp
    assert headers["Cache-Control"] == "no-cache" and headers["ETag"]
    assert b"<script>" not in body and b"http://" not in body and b"https://" not in body
    assert get(f"{daemon.base}/ui", {"If-None-Match": headers["ETag"]})[0] == 304
    page = body.decode()
    script = page.split('src="', 2)[2].split('"')[0]  # the app, with its version
    assert script.startswith("/ui/static/app.js?v=")
    status, headers, _ = get(daemon.base + script)
    assert status == 200 and headers["Cache-Control"].endswith("immutable")
    assert headers["Content-Type"].startswith("text/javascript")
    status, headers, _ = get(f"{daemon.base}/ui/static/app.js?v=old")
    assert status == 200 and headers["Cache-Control"] == "no-cache"
    status, headers, raw = get(f"{daemon.base}/ui/static/vendor/chart.min.js",
                               {"Accept-Encoding": "br"})
    assert status == 200 and headers["Content-Encoding"] == "br" and len(raw) < 100_000
    status, _, text = get(f"{daemon.base}/ui/static/vendor/chart.js.LICENSE")
    assert status == 200 and b"Chart.js Contributors" in text and b"MIT" in text
    assert get(f"{daemon.base}/ui/static/../server.py")[0] == 404
    assert get(f"{daemon.base}/ui/static/nothing.js")[0] == 404
    assert get(f"{daemon.base}/ui/")[0] == 200  # redirected to /ui


def test_whoami_tells_each_key_its_role(daemon):
    for role in ("viewer", "operator", "admin"):
        status, _, me = daemon.api("GET", "/v1/whoami", key=daemon.keys[role])
        assert status == 200 and me["role"] == role and me["via"] == "api_key"
        assert me["roles"][-1] == role and me["roles"][0] == "viewer"
    assert daemon.api("GET", "/v1/whoami")[0] == 401


# --- the views -----------------------------------------------------------------------------------

def test_overview_lists_six_ready_services_and_draws_spend(open_page, tmp_path):
    page = open_page("admin")
    rows = page.locator("#services-table tbody tr")
    expect(rows).to_have_count(6)
    for name in ("storage", "collector", "processor", "rest_api", "grpc_api", "integrations"):
        expect(page.locator(f'#services-table tr[data-service="{name}"]')).to_contain_text(
            "ready")
    expect(page.locator("#events-rate")).to_have_text(re.compile(r"^[0-9][0-9,.]*/s$"))
    expect(page.locator("#spend-chart")).to_be_visible()
    drawn = chart_value(page, "#spend-chart", "chart.data.datasets.flatMap((d) => d.data)"
                        ".filter((v) => v > 0).length")
    assert drawn > 0
    models = chart_value(page, "#spend-chart", "chart.data.datasets.map((d) => d.label)")
    assert {"gpt-4o", "gpt-4o-mini"} <= set(models)
    page.get_by_role("radio", name="service", exact=True).check()  # stacked by service now
    expect(page.locator("#spend-chart")).to_be_visible()
    wanted = {"support-bot", "faq-bot", "writer"}
    services = chart_value(page, "#spend-chart",  # the redraw by service
                           f"(labels => {sorted(wanted)!r}.every((s) => labels.includes(s)) "
                           "&& labels)(chart.data.datasets.map((d) => d.label))")
    assert wanted <= set(services)
    page.get_by_role("radio", name="model", exact=True).check()
    expect(page.locator("#spend-week")).not_to_have_text("$0.00")  # today: after midnight?
    shoot(page, "overview", tmp_path)


def test_viewer_overview_says_services_need_admin(open_page):
    page = open_page("viewer")
    expect(page.get_by_text("needs the admin role")).to_be_visible()
    expect(page.locator("#services-table")).to_have_count(0)
    expect(page.locator("#spend-chart")).to_be_visible()


def test_canary_page_shows_stages_and_the_verdict(open_page, daemon, tmp_path):
    rollouts = daemon.api("GET", "/v1/rollouts?service=support-bot&phase=promoted",
                          key=daemon.keys["viewer"])[2]["items"]
    assert rollouts, daemon.simulation["rollouts"]
    rollout = rollouts[0]
    page = open_page("viewer", f"#/canary/{rollout['id']}")
    steps = page.locator("#canary-timeline li")
    expect(steps).to_have_count(len(rollout["transitions"]))
    expect(steps.first).to_contain_text("Stage 1 started")
    expect(steps.last).to_contain_text("Promoted")
    verdicts = page.locator("#verdicts-table tbody tr")
    expect(verdicts).to_have_count(len(rollout["transitions"]) - 1)
    expect(verdicts.last).to_contain_text("pass")
    expect(page.locator("#canary-charts canvas")).to_have_count(4)
    canary_points = page.wait_for_function("""() => {
        const charts = [...document.querySelectorAll('#canary-charts canvas')]
            .map((canvas) => Chart.getChart(canvas));
        return charts.every((c) => c !== undefined)
            && charts.map((c) => c.data.datasets[1].data.length);
    }""").json_value()
    assert all(n > 0 for n in canary_points), canary_points
    shoot(page, "canary", tmp_path)
    # the writer's bad canary: rolled back, with the judge's fail
    bad = daemon.api("GET", "/v1/rollouts?service=writer&phase=rolled_back",
                     key=daemon.keys["viewer"])[2]["items"]
    assert bad
    page.get_by_label("Rollout").select_option(bad[0]["id"])
    expect(page.locator("#canary-timeline li").last).to_contain_text("Rolled back")
    expect(page.locator("#verdicts-table tbody tr").last).to_contain_text("fail")


def chart_value(page, selector: str, expression: str):
    """``expression`` of the chart drawn on ``selector``'s canvas, read in one step once the
    chart exists and the value is not empty (0, "" or null): a live update redraws a view, and
    its new canvas gets its chart (and its id) a tick later."""
    return page.wait_for_function(
        f"() => {{ const chart = Chart.getChart(document.querySelector({selector!r}));"
        f" return chart === undefined ? null : {expression}; }}").json_value()


def test_findings_are_marked_on_their_series(open_page, tmp_path):
    page = open_page("viewer", "#/findings")
    expect(page.locator("#findings-table tbody tr")).not_to_have_count(0)
    page.get_by_role("link", name="p95 latency up").first.click()
    expect(page.locator("#finding-title")).to_contain_text("p95 latency up")
    expect(page.locator("#finding-chart")).to_be_visible()
    marks = chart_value(page, "#finding-chart",
                        "chart.options.plugins.markers.marks.map((m) => m.label)")
    assert "detected" in marks
    assert chart_value(page, "#finding-chart", "chart.data.datasets[0].data.length") > 10
    shoot(page, "findings", tmp_path)


def test_config_versions_diff_and_rollback_by_an_admin(open_page, daemon, tmp_path):
    api, admin = daemon.api, daemon.keys["admin"]
    before = api("GET", "/v1/config/writer/versions", key=admin)[2]["items"]
    assert len(before) >= 2
    page = open_page("admin", "#/config/writer")
    expect(page.locator("#versions-table tbody tr")).to_have_count(len(before))
    expect(page.locator("#diff-result table")).to_be_visible()
    page.get_by_label("From version").select_option(str(before[-1]["version"]))
    page.get_by_role("button", name="Show the diff").click()
    expect(page.locator("#diff-result caption")).to_contain_text(
        f"from v{before[-1]['version']}")
    shoot(page, "config", tmp_path)
    target = before[-1]["version"]
    page.get_by_role("button", name=f"Roll back writer to version {target}").click()
    expect(page.locator("#versions-table tbody tr")).to_have_count(len(before) + 1)
    after = api("GET", "/v1/config/writer", key=admin)[2]
    assert after["version"] == before[0]["version"] + 1 and after["model"] == before[-1]["model"]


def test_page_updates_when_a_new_optimization_arrives(open_page, daemon, tmp_path):
    """An open optimizations list gets the new proposal over the SSE stream (the list never
    polls); a viewer then sees no deploy button where an operator does."""
    page = open_page("admin", "#/optimizations")
    expect(page.locator("body[data-live=on]")).to_have_count(1)
    rows = page.locator('#optimizations-table tr[data-service="console-cache"]')
    expect(rows).to_have_count(0)
    shoot(page, "optimizations", tmp_path)
    api, op = daemon.api, daemon.keys["operator"]
    assert api("PUT", "/v1/config/console-cache", key=op,
               body={"expected_version": 0, "config": {"model": "gpt-4o"}})[0] == 201
    start = time.time() - (SHIFT_MIN - 4) * 60  # after the simulated traffic, in the past
    for minute in range(24):
        post_events(daemon.collector,
                    repeated_calls("console-cache", start + 60 * minute, 300, minute))
    wait_until(lambda: api("GET", "/v1/optimizations?service=console-cache",
                           key=op)[2]["items"], 120,
               message=lambda: "no proposal for console-cache: processor "
               + json.dumps(daemon.ctl("call", "processor", "info").stdout[-2000:]))
    expect(rows).not_to_have_count(0, timeout=60_000)  # caching, maybe a cheaper model too
    expect(page.locator(".toast").filter(has_text="New optimization")).not_to_have_count(0)
    found = api("GET", "/v1/optimizations?service=console-cache",
                key=op)[2]["items"][0]
    assert found["status"] == "open"

    viewer = open_page("viewer", f"#/optimizations/{found['id']}")
    expect(viewer.locator("#opt-status")).to_contain_text("open")
    expect(viewer.get_by_text("need the operator role")).to_be_visible()
    expect(viewer.get_by_role("button", name="Deploy")).to_have_count(0)
    expect(viewer.get_by_role("button", name="Cancel")).to_have_count(0)
    operator = open_page("operator", f"#/optimizations/{found['id']}")
    expect(operator.get_by_role("button", name="Deploy")).to_be_visible()
    expect(operator.get_by_role("button", name="Roll back")).to_have_count(0)


def test_admin_rolls_back_a_promoted_optimization(open_page, daemon, tmp_path):
    api, admin = daemon.api, daemon.keys["admin"]
    promoted = api("GET", "/v1/optimizations?service=support-bot&status=promoted",
                   key=admin)[2]["items"]
    assert promoted, daemon.simulation["proposed"]
    opt = promoted[0]
    before = api("GET", "/v1/config/support-bot", key=admin)[2]
    assert before["model"] == "gpt-4o-mini"
    page = open_page("admin", f"#/optimizations/{opt['id']}")
    expect(page.locator("#impact-table")).to_contain_text("Expected vs measured")
    expect(page.get_by_role("heading", name="Rationale")).to_be_visible()
    expect(page.get_by_role("button", name="Deploy")).to_have_count(0)
    shoot(page, "optimization", tmp_path)
    page.get_by_role("button", name="Roll back").click()
    expect(page.locator(".toast").filter(has_text="Roll back: done")).to_have_count(1)
    after = wait_until(lambda: (c := api("GET", "/v1/config/support-bot", key=admin)[2])[
        "version"] > before["version"] and c, 10)
    assert after["model"] != "gpt-4o-mini"
    expect(page.locator("#action-result")).to_have_text("")


def test_keyboard_navigation_and_sign_out(open_page):
    page = open_page("viewer", "#/overview")
    page.locator("#nav a").first.focus()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator('#nav a[aria-current="page"]')).to_have_text("Optimizations")
    expect(page.locator("#optimizations-table")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key or token")).to_be_focused()
    assert page.evaluate("() => sessionStorage.length") == 0
    page.get_by_label("API key or token").fill("llmo_aaaaaaaaaaaa_" + "b" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_have_text("This key or token was refused.")


# --- traffic --------------------------------------------------------------------------------------

def repeated_calls(service: str, start: float, per_minute: int, seed: int) -> list[dict]:
    """A minute of calls to gpt-4o where most prompts repeat: a caching proposal's evidence."""
    import random
    rng = random.Random(seed)
    return [{"event_id": f"{service}-{seed}-{i}", "time": start + i * 60 / per_minute,
             "service": service, "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 100,
             "latency_ms": rng.lognormvariate(6, 0.3),
             "quality": min(1.0, max(0.0, rng.gauss(0.8, 0.05))),
             "prompt_fingerprint": f"fp-{rng.randrange(5)}"} for i in range(per_minute)]

