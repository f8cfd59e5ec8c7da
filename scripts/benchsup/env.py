"""Which programs we run, with which environment and ports, on what machine, from what code."""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys

import psutil

BIN = os.path.dirname(sys.executable)


def console_script(name: str) -> str:
    """The real console script next to this interpreter, not a pyenv shim (the shim alone costs
    about 50 ms per call on this machine; `status` measures that separately)."""
    direct = os.path.join(BIN, name)
    return direct if os.access(direct, os.X_OK) else (shutil.which(name) or name)


OPTIMIZERD = console_script("optimizerd")
OPTIMIZERCTL = console_script("optimizerctl")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """Our environment without anything that would steer the daemons elsewhere."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LLM_OPTIMIZER", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}


def tool_env() -> dict[str, str]:
    """For supervisord and circusd: also without PYTHONPATH, which may point at this project,
    whose `supervisor` package would shadow supervisord's own."""
    return {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({model}), {psutil.virtual_memory().total / (1 << 30):.0f} GiB"
            f", Linux {platform.release()}, Python {platform.python_version()}")


def source() -> tuple[str, str, bool]:
    """(directory of the code under test, its git commit, whether tracked files are modified)."""
    import supervisor
    src = os.path.dirname(os.path.dirname(os.path.abspath(supervisor.__file__)))
    commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return src, commit, bool(dirty)
