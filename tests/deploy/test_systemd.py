"""The systemd deployment, checked by systemd itself: etc/systemd/optimizerd.service with
scripts/install-systemd.sh and scripts/uninstall-systemd.sh.

- ``systemd-analyze verify`` and ``systemd-analyze security --offline`` on the unit;
  ``shellcheck`` and the usage paths of both scripts.
- A real boot: ``systemd-nspawn --directory=/ --volatile=yes --boot`` starts this machine's own
  systemd as PID 1 of a container whose root is a tmpfs and whose /usr is the host's, read-only
  (so nothing the install does reaches the host). Bind mounts bring in the checkout (read-only),
  a wheelhouse built here for /usr/bin/python3 (the container has no network), the checker
  below and a results directory; /usr/local is an overlay with a throwaway upper layer, so the
  installer can create its symlinks there. The container boots straight into the checker
  (``systemd.unit=optimizerd-check.service``, AllowIsolate), which: writes a small config
  (storage, collector, rest_api, grpc_api), runs install-systemd.sh (user, venv, files, unit,
  daemon-reload, enable --now), exercises the service, runs the uninstaller, installs once more
  from a copy of the checkout on the shipped etc/optimizer.toml, and powers off. A
  drop-in the checker writes sets WatchdogSec=6, so that the watchdog case takes seconds. This
  test then asserts on what the checker recorded.

Needs root, systemd-nspawn (apt: systemd-container), shellcheck, /usr/bin/python3 with venv
(apt: python3-venv) and pip access to the project's dependencies (to build the wheelhouse).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .tools import tool

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "systemd" / "optimizerd.service"
INSTALL = ROOT / "scripts" / "install-systemd.sh"
UNINSTALL = ROOT / "scripts" / "uninstall-systemd.sh"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.timeout(900)


# --- static checks -------------------------------------------------------------------------------

def test_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    """`verify` checks that every Exec*= binary exists and is executable. /usr/local/bin/optimizerd
    is created by the installer, not on a test machine, so the unit is verified as a temp copy
    whose ExecStart/ExecReload point at the optimizerd/optimizerctl installed in the environment
    running the tests; everything else is the shipped text."""
    analyze = tool("systemd-analyze", "apt-get install systemd")
    optimizerd = shutil.which("optimizerd") or os.path.join(os.path.dirname(sys.executable),
                                                            "optimizerd")
    assert os.access(optimizerd, os.X_OK), f"optimizerd is not installed: {optimizerd}"
    bindir = os.path.dirname(optimizerd)
    text = UNIT.read_text()
    assert "/usr/local/bin/optimizerd start" in text
    unit = tmp_path / "optimizerd.service"
    unit.write_text(text.replace("/usr/local/bin/", bindir + "/"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "optimizerd.service" not in result.stderr, result.stderr
    # The shipped path itself, as the installer lays it out: only the missing binaries complain.
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True)
    complaints = [line for line in result.stderr.splitlines() if "optimizerd.service" in line]
    assert all("/usr/local/bin/optimizer" in line and "is not executable" in line
               for line in complaints), result.stderr


def test_unit_security_exposure_is_low(tmp_path) -> None:
    """systemd's own rating of the sandbox: "OK" (below 4.0 out of 10)."""
    analyze = tool("systemd-analyze", "apt-get install systemd")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for optimizerd\.service: ([0-9.]+)",
                      result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < 4.0, result.stdout


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=["install", "uninstall"])
def test_scripts_usage(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr
    result = subprocess.run([str(script), "--no-such-option"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: unknown argument: --no-such-option" in result.stderr


# --- the real boot -------------------------------------------------------------------------------

# A small config: the unit's Environment= sets runtime_dir and data_dir.
CONFIG = """\
[supervisor]
heartbeat_interval = 0.5
[processor]
enabled = false
[integrations]
enabled = false
[rest_api]
depends_on = ["storage"]
[grpc_api]
depends_on = ["storage"]
"""

CHECK_UNIT = """\
[Unit]
Description=optimizerd deployment check
# The container boots straight into this unit (systemd.unit=): only it and what it pulls in run.
AllowIsolate=yes
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /srv/check/check.py
StandardOutput=journal+console
"""

# Only for the test: the watchdog fires within seconds instead of 30.
DROP_IN = """\
[Service]
WatchdogSec=6
"""

# Runs inside the container as root, with /usr/bin/python3; every step is recorded at once in
# /srv/results/results.json, so that a step that hangs still leaves the earlier ones.
CHECKER = r'''
import json
import os
import shutil
import signal
import subprocess
import time
import traceback
import urllib.request

RESULTS = "/srv/results"
UNIT = "optimizerd.service"
CONF = "/etc/llm-optimizer/optimizer.toml"
WHEELS = "/srv/wheels"
CTL_ENV = dict(os.environ, LLM_OPTIMIZER__SUPERVISOR__RUNTIME_DIR="/run/llm-optimizer",
               LLM_OPTIMIZER__SUPERVISOR__DATA_DIR="/var/lib/llm-optimizer")
PIP_ENV = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=WHEELS,
               PIP_DISABLE_PIP_VERSION_CHECK="1")
out = {"steps": {}}


def note(step, **data):
    out["steps"][step] = data
    with open(f"{RESULTS}/results.json.tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(f"{RESULTS}/results.json.tmp", f"{RESULTS}/results.json")


def run(*cmd, env=None, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def show():
    text = run("systemctl", "show", UNIT, "-p", "ActiveState,SubState,Result,NRestarts,"
               "StatusText,MainPID,WatchdogUSec,MemoryDenyWriteExecute")["stdout"]
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def status():
    r = run("optimizerctl", "-c", CONF, "status", "--json", env=CTL_ENV, timeout=30)
    try:
        return json.loads(r["stdout"])
    except ValueError:
        return None


def wait(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def service(doc, name):
    return next((s for s in (doc or {}).get("services", []) if s["name"] == name), None)


def all_ready():
    doc = status()
    return doc and doc["services"] and all(s["state"] == "ready" for s in doc["services"]) and doc


def http(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception as exc:
        return repr(exc)


def journal():
    return run("journalctl", "-b", "-u", UNIT, "--no-pager", "-o", "cat")["stdout"]


def main():
    # An edited config in place before the install: the installer must keep it.
    with open("/srv/check/optimizer.toml") as f:
        config = f.read()
    os.makedirs("/etc/llm-optimizer", exist_ok=True)
    with open(CONF, "w") as f:
        f.write(config)
    # The test's drop-in (WatchdogSec=6), as an admin would add one; --purge removes it.
    os.makedirs("/etc/systemd/system/optimizerd.service.d", exist_ok=True)
    with open("/srv/check/watchdog.conf") as src, \
            open("/etc/systemd/system/optimizerd.service.d/test.conf", "w") as dst:
        dst.write(src.read())
    wheel = next(w for w in sorted(os.listdir(WHEELS)) if w.startswith("llm_auto_optimizer-"))
    install = ("/srv/checkout/scripts/install-systemd.sh", "--wheel", f"{WHEELS}/{wheel}")
    note("install", **run(*install, env=PIP_ENV), show=show())
    if out["steps"]["install"]["rc"] != 0:
        return
    started = show()
    pid = int(started["MainPID"])
    with open(f"/proc/{pid}/status") as f:
        proc = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    note("started", show=started, status=wait(all_ready, 30), journal=journal(),
         proc={k: proc.get(k) for k in ("Uid", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd")})

    # Serving under the sandbox: REST, admin, gRPC (grpcio) health.
    grpc = run("/opt/llm-optimizer/bin/python", "-c",
               "import grpc\nfrom grpc_health.v1 import health_pb2, health_pb2_grpc\n"
               "ch = grpc.insecure_channel('127.0.0.1:50051')\n"
               "r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),"
               " timeout=10)\nprint(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))",
               timeout=60)
    note("serving", rest=http("http://127.0.0.1:8080/health"),
         ready=http("http://127.0.0.1:9090/ready"), grpc=grpc)

    # Again, as an upgrade: the edited config stays, the daemon is restarted onto the package.
    again = run(*install, env=PIP_ENV)
    with open(CONF) as f:
        kept = f.read() == config
    files = {}
    for path in ("/etc/llm-optimizer/optimizer.env", "/var/lib/llm-optimizer",
                 "/usr/local/bin/optimizerd", "/usr/local/bin/optimizerctl"):
        st = os.lstat(path)
        files[path] = {"mode": oct(st.st_mode & 0o7777), "uid": st.st_uid, "gid": st.st_gid,
                       "link": os.readlink(path) if os.path.islink(path) else None}
    with open("/etc/llm-optimizer/optimizer.env") as f:
        env_lines = [line for line in f.read().splitlines() if line.strip()]
    note("reinstall", **again, config_kept=kept, files=files, env_lines=env_lines,
         passwd=run("getent", "passwd", "llm-optimizer")["stdout"].strip(),
         uid=run("id", "-u", "llm-optimizer")["stdout"].strip(),
         show=show(), status=wait(all_ready, 30))

    pid = int(show()["MainPID"])
    reload = run("systemctl", "reload", UNIT, timeout=90)
    note("reload", **reload, show=show())

    before = service(wait(all_ready, 30), "collector")
    killed = run("pkill", "-KILL", "-f", "optimizerd: collector")

    def collector_back():
        doc = status()
        s = service(doc, "collector")
        return s and s["state"] == "ready" and s["pid"] != before["pid"] and doc
    back = wait(collector_back, 30)
    note("kill_collector", pkill=killed, before=before, status=back, show=show(),
         procs=run("pgrep", "-af", "optimizerd: ")["stdout"])

    seen = []
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)

    def watchdog_result():
        s = show()
        state = [s["ActiveState"], s["SubState"], s["Result"]]
        if not seen or seen[-1]["state"] != state:
            seen.append({"state": state, "after_s": round(time.monotonic() - t0, 2),
                         "MainPID": s["MainPID"], "NRestarts": s["NRestarts"]})
        return s["Result"] == "watchdog"
    fired = wait(watchdog_result, 60, 0.05)
    note("sigstop", pid=pid, fired=bool(fired), after_s=round(time.monotonic() - t0, 2),
         seen=seen)

    def restarted():
        s = show()
        return (s["ActiveState"] == "active" and s["SubState"] == "running"
                and s["MainPID"] not in ("0", str(pid)) and s)
    again = wait(restarted, 90)
    note("restarted", show=again or show(), old_pid_gone=not os.path.exists(f"/proc/{pid}"),
         status=wait(all_ready, 30), journal=journal())

    gone = ("/etc/systemd/system/optimizerd.service", "/usr/local/bin/optimizerd",
            "/usr/local/bin/optimizerctl", "/opt/llm-optimizer")
    dropins = "/etc/systemd/system/optimizerd.service.d"
    kept = ("/etc/llm-optimizer/optimizer.toml", "/var/lib/llm-optimizer", dropins)
    r = run("/srv/checkout/scripts/uninstall-systemd.sh", timeout=120)
    note("uninstall", **r, show=show(), gone=[p for p in gone if not os.path.lexists(p)],
         kept=[p for p in kept if os.path.exists(p)],
         processes=run("pgrep", "-af", "optimizerd")["stdout"])
    r = run("/srv/checkout/scripts/uninstall-systemd.sh", "--purge", timeout=120)
    note("purge", **r, left=[p for p in gone + kept if os.path.lexists(p)],
         user=run("getent", "passwd", "llm-optimizer")["rc"])

    # From a checkout (`pip install .`, no --wheel) on the shipped etc/optimizer.toml: all six
    # services under the unit's sandbox. /srv/checkout is read-only and pip builds in-tree.
    src = "/var/tmp/checkout"
    os.makedirs(src)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(f"/srv/checkout/{name}", src)
    for name in ("ipc", "supervisor", "workers", "protos", "etc", "scripts"):
        shutil.copytree(f"/srv/checkout/{name}", f"{src}/{name}", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    r = run(f"{src}/scripts/install-systemd.sh", env=PIP_ENV)
    note("from_checkout", **r, show=show(), status=wait(all_ready, 30),
         uninstall=run(f"{src}/scripts/uninstall-systemd.sh", "--purge", timeout=120))


try:
    main()
except Exception:
    note("error", traceback=traceback.format_exc())
finally:
    note("done")
    with open(f"{RESULTS}/journal.txt", "w") as f:
        f.write(run("journalctl", "-b", "--no-pager")["stdout"])
'''


def build_wheelhouse(dest: Path, work: Path) -> None:
    """Wheels of the project and its dependencies for the container's /usr/bin/python3, built
    from a copy of the source (pip builds in-tree and would leave build/ in the checkout)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is missing: the container runs the distribution's Python")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv, sys; "
                            "sys.exit(sys.version_info < (3, 11))"], capture_output=True)
    if probe.returncode != 0:
        message = f"{SYSTEM_PYTHON} cannot make a 3.11+ venv (apt-get install python3-venv)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("ipc", "supervisor", "workers", "protos"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = work / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--upgrade", "pip"], check=True, timeout=300)
    result = subprocess.run(pip + ["wheel", "-w", str(dest), str(src)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # The build backend, for `pip install .` from a checkout inside the offline container.
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    result = subprocess.run(pip + ["download", "-d", str(dest)] + requires, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def boot(work: Path) -> tuple[dict, str]:
    nspawn = tool("systemd-nspawn", "apt-get install systemd-container")
    if os.geteuid() != 0:
        pytest.fail("systemd-nspawn --boot needs root")
    wheels, check, results = work / "wheels", work / "check", work / "results"
    for d in (check, results):
        d.mkdir()
    build_wheelhouse(wheels, work)
    (check / "check.py").write_text(CHECKER)
    (check / "optimizerd-check.service").write_text(CHECK_UNIT)
    (check / "watchdog.conf").write_text(DROP_IN)
    (check / "optimizer.toml").write_text(CONFIG)
    command = [
        nspawn, "--directory=/", "--volatile=yes", "--private-network", "--register=no",
        "--keep-unit", "--quiet", "--machine=optimizerd-test",
        # /usr is read-only in volatile mode; the installer links into /usr/local/bin.
        "--overlay=/usr/local::/usr/local",
        f"--bind-ro={ROOT}:/srv/checkout",
        f"--bind-ro={wheels}:/srv/wheels",
        f"--bind-ro={check}:/srv/check",
        f"--bind-ro={check}/optimizerd-check.service:"
        "/etc/systemd/system/optimizerd-check.service",
        f"--bind={results}:/srv/results",
        "--boot",
        # A volatile /etc is a first boot: no interactive wizard.
        "systemd.firstboot=no",
        # The host's wait-online waits 2 min for links that --private-network never gives.
        "systemd.mask=systemd-networkd-wait-online.service",
        "systemd.unit=optimizerd-check.service",
    ]
    log = work / "console.log"
    with open(log, "wb") as console:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # nspawn: orderly halt of the container
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    console_text = log.read_text(errors="replace")
    journal = results / "journal.txt"
    if journal.exists():
        console_text += "\n--- container journal ---\n" + journal.read_text(errors="replace")
    path = results / "results.json"
    assert path.exists(), f"the checker recorded nothing; console:\n{console_text[-6000:]}"
    recorded = json.loads(path.read_text())
    assert proc.returncode == 0, f"nspawn exited {proc.returncode}:\n{console_text[-6000:]}"
    return recorded["steps"], console_text


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    steps, console = boot(tmp_path_factory.mktemp("nspawn"))
    assert "error" not in steps, steps["error"]["traceback"] + console[-4000:]
    assert "done" in steps
    return steps, console


def step(booted, name: str) -> dict:
    steps, console = booted
    assert name in steps, f"the checker did not get to {name!r}; console:\n{console[-6000:]}"
    return steps[name]


def test_install_starts_the_service(booted) -> None:
    """(a) install-systemd.sh ends with the unit active/running; Type=notify only gets there
    after READY=1, whose STATUS= line names the services, and the log shows every service ready
    before systemd's "Started"."""
    install = step(booted, "install")
    assert install["rc"] == 0, install["stdout"] + install["stderr"]
    for line in ("group llm-optimizer: created", "user llm-optimizer: created",
                 "venv /opt/llm-optimizer: created", "/usr/local/bin/optimizerd ->",
                 "/etc/llm-optimizer/optimizer.toml: exists, edited: kept",
                 "/etc/llm-optimizer/optimizer.env: template written",
                 "/etc/systemd/system/optimizerd.service: installed",
                 "systemctl daemon-reload", "systemctl start optimizerd.service: active"):
        assert line in install["stdout"], install["stdout"]
    started = step(booted, "started")
    show = started["show"]
    assert (show["ActiveState"], show["SubState"], show["Result"]) == \
        ("active", "running", "success")
    assert show["StatusText"] == "4 services ready"
    assert show["WatchdogUSec"] == "6s" and show["MemoryDenyWriteExecute"] == "yes"
    journal = started["journal"]
    assert journal.index("all 4 services ready") < journal.index("Started optimizerd.service")
    services = {s["name"]: s["state"] for s in started["status"]["services"]}
    assert services == dict.fromkeys(("storage", "collector", "rest_api", "grpc_api"), "ready")


def test_service_runs_sandboxed_and_serves(booted) -> None:
    """The supervisor runs as llm-optimizer without capabilities, with no_new_privs and a
    seccomp filter (MemoryDenyWriteExecute, RestrictAddressFamilies, ...), and still serves."""
    started, reinstall = step(booted, "started"), step(booted, "reinstall")
    uid = reinstall["uid"]
    proc = started["proc"]
    assert proc["Uid"].split() == [uid] * 4
    assert proc["NoNewPrivs"] == "1" and proc["Seccomp"] == "2"
    assert int(proc["CapEff"], 16) == 0 and int(proc["CapBnd"], 16) == 0
    serving = step(booted, "serving")
    assert serving["rest"] == 200 and serving["ready"] == 200, serving
    assert serving["grpc"]["stdout"].strip() == "SERVING", serving["grpc"]


def test_reinstall_keeps_files_and_restarts(booted) -> None:
    again = step(booted, "reinstall")
    assert again["rc"] == 0, again["stdout"] + again["stderr"]
    for line in ("group llm-optimizer: exists", "user llm-optimizer: exists",
                 "venv /opt/llm-optimizer: exists", "optimizer.env: exists, kept",
                 "optimizerd.service: up to date", "systemctl restart optimizerd.service: active"):
        assert line in again["stdout"], again["stdout"]
    assert again["config_kept"]
    uid = int(again["uid"])
    files = again["files"]
    assert files["/etc/llm-optimizer/optimizer.env"] == \
        {"mode": "0o600", "uid": 0, "gid": 0, "link": None}
    assert files["/var/lib/llm-optimizer"]["mode"] == "0o700"
    assert files["/var/lib/llm-optimizer"]["uid"] == uid
    for cmd in ("optimizerd", "optimizerctl"):
        assert files[f"/usr/local/bin/{cmd}"]["link"] == f"/opt/llm-optimizer/bin/{cmd}"
    assert all(line.startswith("#") for line in again["env_lines"]), again["env_lines"]
    assert "/nonexistent:/usr/sbin/nologin" in again["passwd"]
    assert again["show"]["ActiveState"] == "active"
    assert all(s["state"] == "ready" for s in again["status"]["services"])


def test_systemctl_reload_runs_optimizerctl(booted) -> None:
    reload = step(booted, "reload")
    assert reload["rc"] == 0, reload["stderr"]
    assert reload["show"]["ActiveState"] == "active"


def test_killed_worker_is_restarted_by_the_supervisor(booted) -> None:
    """(b) a SIGKILLed worker is the supervisor's business: systemd sees nothing."""
    killed = step(booted, "kill_collector")
    assert killed["pkill"]["rc"] == 0
    assert killed["status"], "the collector did not come back ready"
    collector = next(s for s in killed["status"]["services"] if s["name"] == "collector")
    assert collector["pid"] != killed["before"]["pid"] and collector["restarts"] >= 1
    show = killed["show"]
    assert (show["ActiveState"], show["SubState"], show["NRestarts"]) == \
        ("active", "running", "0")
    assert "optimizerd: collector" in killed["procs"]


def test_stopped_supervisor_is_killed_by_the_watchdog(booted) -> None:
    """(c) SIGSTOP on the supervisor: no WATCHDOG=1 for 6 s, systemd kills the unit with
    Result=watchdog and Restart=on-failure brings it back with every service."""
    stop = step(booted, "sigstop")
    assert stop["fired"], stop["seen"]
    # The last WATCHDOG=1 came up to half a period (3 s) before the SIGSTOP: systemd fires
    # between 3 and 6 s after it (plus its own scheduling).
    assert 2.5 <= stop["after_s"] <= 15.0, stop
    assert stop["seen"][-1]["state"][2] == "watchdog"
    restarted = step(booted, "restarted")
    show = restarted["show"]
    assert (show["ActiveState"], show["SubState"]) == ("active", "running"), show
    assert show["MainPID"] != str(stop["pid"]) and show["NRestarts"] == "1"
    assert restarted["old_pid_gone"]
    assert all(s["state"] == "ready" for s in restarted["status"]["services"])
    assert "Watchdog timeout" in restarted["journal"]
    assert "Failed with result 'watchdog'" in restarted["journal"]


def test_install_from_checkout_runs_every_service(booted) -> None:
    """`pip install .` from a checkout and the shipped etc/optimizer.toml: all six services
    start under the sandbox (MemoryDenyWriteExecute included: the processor loads scipy, the
    APIs grpcio and aiohttp)."""
    installed = step(booted, "from_checkout")
    assert installed["rc"] == 0, installed["stdout"] + installed["stderr"]
    assert "/etc/llm-optimizer/optimizer.toml: installed from etc/optimizer.toml" in \
        installed["stdout"]
    assert installed["show"]["StatusText"] == "6 services ready", installed["show"]
    assert installed["status"], "not every service is ready"
    assert len(installed["status"]["services"]) == 6
    assert installed["uninstall"]["rc"] == 0, installed["uninstall"]["stderr"]


def test_uninstall_keeps_config_and_data_unless_purged(booted) -> None:
    uninstall = step(booted, "uninstall")
    assert uninstall["rc"] == 0, uninstall["stdout"] + uninstall["stderr"]
    assert len(uninstall["gone"]) == 4, uninstall
    assert uninstall["kept"] == ["/etc/llm-optimizer/optimizer.toml", "/var/lib/llm-optimizer",
                                 "/etc/systemd/system/optimizerd.service.d"]
    assert uninstall["show"]["ActiveState"] == "inactive"
    assert "optimizerd:" not in uninstall["processes"]
    purge = step(booted, "purge")
    assert purge["rc"] == 0, purge["stdout"] + purge["stderr"]
    assert purge["left"] == [] and purge["user"] == 2
