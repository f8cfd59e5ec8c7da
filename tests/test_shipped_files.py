"""Files shipped in etc/ stay true to the code: the example config and the systemd unit."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ipc.config_render import render_default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "systemd", "optimizerd.service")


def test_example_config_is_the_printed_default() -> None:
    with open(os.path.join(ROOT, "etc", "optimizer.toml")) as f:
        assert f.read() == render_default_config(), \
            "etc/optimizer.toml is stale: optimizerd print-default-config > etc/optimizer.toml"


def unit_directives() -> dict[str, dict[str, list[str]]]:
    """The unit's directives by section; systemd allows a directive more than once."""
    with open(UNIT) as f:
        text = f.read()
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_unit_declares_the_contract() -> None:
    service = unit_directives()["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["KillMode"] == ["mixed"]
    assert service["Restart"] == ["on-failure"]
    assert int(service["WatchdogSec"][0]) > 0
    assert "optimizerctl" in service["ExecReload"][0] and "reload" in service["ExecReload"][0]
    assert "optimizerd start" in service["ExecStart"][0]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                      "RestrictAddressFamilies"):
        assert hardening in service


def test_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing")
        pytest.skip("systemd-analyze not installed")
    bindir = os.path.dirname(shutil.which("optimizerd") or sys.executable)
    with open(UNIT) as f:
        text = f.read().replace("/usr/local/bin/", bindir + "/")
    unit = tmp_path / "optimizerd.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "optimizerd.service" not in result.stderr, result.stderr
