"""What a freshly forked worker process does to itself before any service code runs."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import setproctitle

PR_SET_PDEATHSIG = 1
log = logging.getLogger("workers.process")


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when our parent (the fork server) goes away.

    The fork server exits as soon as the supervisor does, so a SIGKILLed supervisor leaves no
    worker behind. If the parent is already gone (we were reparented), exit now.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1 or os.getppid() != parent:
        os._exit(1)


def release_fork_server_fds() -> None:
    """Close the fork server's 'alive' pipe and the resource tracker's pipe that multiprocess
    hands to every child.

    Holding the 'alive' write end would keep the fork server waiting for an EOF that never
    comes once the supervisor is gone, and with it every worker: exactly the orphans that
    PR_SET_PDEATHSIG is meant to prevent.
    """
    from multiprocess import forkserver, resource_tracker

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    tracker = resource_tracker._resource_tracker
    if tracker._fd is not None:
        os.close(tracker._fd)
        tracker._fd = None


def adopt_output(stdout_fd: int, stderr_fd: int) -> None:
    """Send fds 1 and 2 to the supervisor's pipes, so no output of ours is ever lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.close(stdout_fd)
    os.close(stderr_fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


def prepare_worker_process(title: str, stdout_fd: int, stderr_fd: int) -> None:
    adopt_output(stdout_fd, stderr_fd)
    release_fork_server_fds()
    die_with_parent()
    setproctitle.setproctitle(f"optimizerd: {title}")
    # Ctrl-C in a terminal reaches the whole process group; only the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
