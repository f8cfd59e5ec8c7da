"""End to end: scripts/simulate.py against a running optimizerd, checked against its ground
truth (cheaper model promoted, caching proposed with savings within 20%, latency regression
reported, bad canary rolled back, nothing proposed for the control service)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(400)


def test_simulated_traffic_meets_the_ground_truth(make_daemon, tmp_path):
    d = make_daemon(builtins=["storage", "collector", "processor"], extra={"processor": {
        "allowed_lateness_s": 5, "checkpoint_interval_s": 2.0,
        "decisions": {"auto_deploy": True},
        "canary": {"promote_min_samples": 600}}}).start()
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"),
                          "-c", d.config_path, "--minutes", "40", "--json", str(report)],
                         capture_output=True, text=True, timeout=360, env=d.env)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    checks = json.loads(report.read_text())["checks"]
    failed = [c for c in checks if not c["ok"]]
    assert not failed, json.dumps(failed, indent=1) + run.stdout[-2000:]
    assert run.returncode == 0
