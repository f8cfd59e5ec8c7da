"""Reload: optimizerctl reload, SIGHUP and watch_config apply only what changed."""
from __future__ import annotations

import copy
import os
import signal

import pytest

from conftest import alive, stub, wait_until

pytestmark = pytest.mark.timeout(90)


def three_stubs() -> dict:
    return {"base": stub(), "live": stub({"reload": "live"}, depends_on=["base"]),
            "rigid": stub({"reload": "restart"}, depends_on=["base"])}


def reloads_ok(d) -> int:
    return d.status()["supervisor"]["reloads"]["ok"]


def test_reload_without_change_touches_nothing(make_daemon):
    d = make_daemon(services=three_stubs()).start()
    pids, before = d.pids(), d.status()["supervisor"]
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "nothing changed" in r.stdout and before["config_hash"] in r.stdout
    assert d.pids() == pids
    after = d.status()["supervisor"]
    assert after["config_hash"] == before["config_hash"]
    assert after["reloads"] == {"ok": 1, "error": 0}
    assert all(s["restarts"] == 0 for s in d.services().values())


def test_live_reload_keeps_the_pid_and_touches_no_other_service(make_daemon):
    d = make_daemon(services=three_stubs()).start()
    pids = d.pids()
    old_hash = d.status()["supervisor"]["config_hash"]
    d.doc["services"]["live"]["settings"]["generation"] = 2
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "reloaded: live" in r.stdout and "restarted:" not in r.stdout
    assert d.pids() == pids
    doc = d.status("live")
    assert doc["supervisor"]["config_hash"] != old_hash
    live = doc["services"][0]
    # The worker applied the new settings: its heartbeats now report them.
    wait_until(lambda: d.service("live")["status"].get("settings", {}).get("generation") == 2,
               5, message="the live reload did not reach the worker")
    assert [h["to"] for h in live["history"]] == ["starting", "ready"]


def test_reload_that_needs_a_restart_restarts_that_service_only(make_daemon):
    d = make_daemon(services=three_stubs()).start()
    pids = d.pids()
    d.doc["services"]["rigid"]["settings"]["generation"] = 2
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "restarted: rigid" in r.stdout and "reloaded:" not in r.stdout
    after = d.pids()
    assert after["rigid"] not in (None, pids["rigid"])
    assert {k: v for k, v in after.items() if k != "rigid"} == \
        {k: v for k, v in pids.items() if k != "rigid"}
    rigid = d.services()["rigid"]
    assert rigid["state"] == "ready"  # the reply came after it was ready again
    wait_until(lambda: not alive(pids["rigid"]), 5)
    assert d.service("rigid")["status"]["settings"]["generation"] == 2


def test_changed_entrypoint_restarts_without_asking(make_daemon):
    d = make_daemon(services=three_stubs()).start()
    pids = d.pids()
    d.doc["services"]["live"]["entrypoint"] = "probe_worker:ProbeWorker"
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "restarted: live" in r.stdout
    after = d.pids()
    assert after["live"] != pids["live"] and after["base"] == pids["base"]
    assert after["rigid"] == pids["rigid"]


def test_adding_and_removing_services(make_daemon, no_process_left):
    d = make_daemon(services=three_stubs()).start()
    pids = d.pids()
    doc = copy.deepcopy(d.doc)
    del doc["services"]["rigid"]
    doc["services"]["newcomer"] = stub(depends_on=["live"])
    d.write_config(doc)
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "added: newcomer" in r.stdout and "removed: rigid" in r.stdout
    svc = d.services()
    assert "rigid" not in svc
    assert svc["newcomer"]["state"] == "ready"
    assert {n: svc[n]["pid"] for n in ("base", "live")} == \
        {n: pids[n] for n in ("base", "live")}
    no_process_left([pids["rigid"]])
    r = d.ctl("status", "rigid")
    assert r.returncode == 2 and "no service 'rigid'" in r.stderr


def test_removing_a_dependency_and_its_dependent_stops_dependent_first(make_daemon):
    d = make_daemon(services=three_stubs() | {"extra": stub()}).start()
    doc = copy.deepcopy(d.doc)
    doc["services"] = {"extra": stub()}
    d.write_config(doc)
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert list(d.services()) == ["extra"]
    out = d.output().splitlines()
    first_stop = {n: next(i for i, line in enumerate(out) if f" {n}: ready -> stopping" in line)
                  for n in ("base", "live", "rigid")}
    stopped = {n: next(i for i, line in enumerate(out) if f" {n}: stopping -> stopped" in line)
               for n in ("live", "rigid")}
    assert first_stop["base"] > max(stopped.values())


@pytest.mark.parametrize("breakage,code_word", [
    ("[supervisor\nbroken = \n", "invalid TOML"),
    (None, "supervisor.max_restarts"),
])
def test_an_invalid_file_exits_2_and_changes_nothing(make_daemon, breakage, code_word):
    d = make_daemon(services=three_stubs()).start()
    pids, before = d.pids(), d.status()["supervisor"]
    if breakage is None:
        doc = copy.deepcopy(d.doc)
        doc["supervisor"]["max_restarts"] = -1
        doc["services"]["added"] = stub()  # must not be started either
        d.write_config(doc)
    else:
        d.write_config(text=breakage)
    r = d.ctl("reload")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert code_word in r.stderr and "still running on the previous config" in r.stderr
    assert d.pids() == pids
    after = d.status()["supervisor"]
    assert after["config_hash"] == before["config_hash"]
    assert after["reloads"]["error"] == 1 and after["state"] == "running"
    # Fixed again: the next reload works.
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0 and "nothing changed" in r.stdout


def test_sighup_reloads_like_optimizerctl(make_daemon):
    d = make_daemon(services=three_stubs()).start()
    pids = d.pids()
    os.kill(d.pid, signal.SIGHUP)
    d.wait_status(lambda doc: doc["supervisor"]["reloads"]["ok"] == 1, 10, "SIGHUP reload")
    assert d.pids() == pids
    doc = copy.deepcopy(d.doc)
    doc["services"]["by_hup"] = stub()
    doc["services"]["rigid"]["settings"]["generation"] = 3
    d.write_config(doc)
    os.kill(d.pid, signal.SIGHUP)
    d.wait_status(lambda doc: doc["supervisor"]["reloads"]["ok"] == 2, 10, "second reload")
    svc = d.services()
    assert svc["by_hup"]["state"] == "ready"
    assert svc["rigid"]["pid"] != pids["rigid"]
    assert svc["base"]["pid"] == pids["base"] and svc["live"]["pid"] == pids["live"]
    d.write_config(text="not = [valid")
    os.kill(d.pid, signal.SIGHUP)
    d.wait_status(lambda doc: doc["supervisor"]["reloads"]["error"] == 1, 10, "bad SIGHUP")
    assert d.running() and d.services()["by_hup"]["state"] == "ready"
    assert "refused" in d.output()


def test_supervisor_side_keys_apply_without_touching_workers(make_daemon):
    d = make_daemon(services=three_stubs()).start()
    pids = d.pids()
    d.doc["services"]["live"]["max_restarts"] = 1
    d.doc["services"]["base"]["processes"] = 2
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    svc = d.wait_status(lambda doc: len(doc["services"]) == 4 and doc["supervisor"]["ready"])
    svc = d.services(svc)
    assert svc["base#1"]["state"] == "ready"
    assert {n: svc[n]["pid"] for n in ("base", "live", "rigid")} == pids
    # And back to one process: the second instance stops, the first stays.
    d.doc["services"]["base"]["processes"] = 1
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    d.wait_status(lambda doc: len(doc["services"]) == 3, 10, "base#1 removed")
    assert d.pids() == pids


@pytest.mark.timeout(60)
def test_watch_config_reloads_when_the_file_changes(make_daemon):
    d = make_daemon(services={"base": stub()}, supervisor={"watch_config": True}).start()
    pid = d.pids()["base"]
    old_hash = d.status()["supervisor"]["config_hash"]
    doc = copy.deepcopy(d.doc)
    doc["services"]["watched"] = stub()
    d.write_config(doc)  # written by rename, as editors do
    status = d.wait_status(lambda doc: any(s["name"] == "watched" and s["state"] == "ready"
                                           for s in doc["services"]), 10, "watched added")
    assert status["supervisor"]["config_hash"] != old_hash
    assert d.pids()["base"] == pid
    assert "config file changed" in d.output()
    # Written in place too (close_write), and an unrelated file in the directory is ignored.
    with open(os.path.join(os.path.dirname(d.config_path), "unrelated.txt"), "w") as f:
        f.write("x")
    del doc["services"]["watched"]
    with open(d.config_path, "w") as f:
        import tomli_w
        f.write(tomli_w.dumps(doc))
    d.wait_status(lambda doc: [s["name"] for s in doc["services"]] == ["base"], 10,
                  "watched removed")
    assert d.status()["supervisor"]["reloads"]["ok"] == 2


def test_log_level_change_applies_to_supervisor_and_workers_live(make_daemon):
    d = make_daemon(services={"a": stub(), "b": stub()}).start()
    pids = d.pids()
    d.doc.setdefault("observability", {})["log_level"] = "debug"
    d.write_config()
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert "reloaded: a, b" in r.stdout  # a global setting: every worker applies it
    assert d.pids() == pids
    mark = len(d.output())
    r = d.ctl("restart", "a")
    assert r.returncode == 0
    new = d.pids()["a"]
    wait_until(lambda: f"DEBUG   supervisor[{d.pid}] a: pid {new}" in d.output()[mark:], 5)
    wait_until(lambda: f"DEBUG   a[{new}] ready" in d.output()[mark:], 5)
