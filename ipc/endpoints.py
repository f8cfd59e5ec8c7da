"""Where the processes meet: the runtime directory, its sockets, and the data directory."""
from __future__ import annotations

import os

from ipc.config import Config

CONTROL_SOCKET = "control.sock"
WORKERS_SOCKET = "workers.sock"
PID_FILE = "optimizerd.pid"
METRICS_DIR = "metrics"
APP_DIR = "llm-optimizer"
IPC_PATH_MAX = 107      # bytes of a Unix socket path (sockaddr_un.sun_path less its NUL)
SOCKET_NAME_MAX = 16    # room kept for the name of any socket in the runtime directory


class RuntimeDirError(OSError):
    """The runtime directory cannot be made private to this user."""


def runtime_dir(config: Config) -> str:
    if config.supervisor.runtime_dir:
        return os.path.abspath(config.supervisor.runtime_dir)
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], APP_DIR)
    if os.geteuid() == 0:
        return os.path.join("/run", APP_DIR)
    return os.path.join("/tmp", f"{APP_DIR}-{os.geteuid()}")


def data_dir(config: Config) -> str:
    if config.supervisor.data_dir:
        return os.path.abspath(config.supervisor.data_dir)
    if os.geteuid() == 0:
        return os.path.join("/var/lib", APP_DIR)
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, APP_DIR)


def socket_path(runtime: str, name: str) -> str:
    return os.path.join(runtime, name)


def endpoint(runtime: str, name: str) -> str:
    """The ZeroMQ address of a socket in the runtime directory."""
    return "ipc://" + socket_path(runtime, name)


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and parents) and make sure it is ours alone: owner us, mode 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise RuntimeDirError(f"{path} belongs to uid {st.st_uid}, not to this user "
                              f"({os.geteuid()}); choose another supervisor.runtime_dir")
    if st.st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
