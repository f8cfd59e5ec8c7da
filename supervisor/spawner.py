"""Starting worker processes from a fork server.

The fork server is a fresh interpreter (exec'ed, so it inherits no ZeroMQ context, thread or
event loop of ours) that imports the heavy modules once and then forks a clean child per request
in a few milliseconds. Workers are therefore the supervisor's grandchildren: the supervisor
learns each pid at once, watches each exit through the sentinel fd the fork server writes the
exit code to, and the fork server exits when the supervisor does, taking every worker with it
(PR_SET_PDEATHSIG in the worker).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import multiprocess
from multiprocess import forkserver
from multiprocess.connection import Connection

from ipc.launch import WORKER_RUNNER, launch

log = logging.getLogger("optimizerd.spawner")


@dataclass
class SpawnedProcess:
    process: Any  # multiprocess Process
    pid: int
    sentinel: int  # readable once the process has exited
    stdout: int    # read ends of the process's stdout and stderr pipes
    stderr: int

    def exit_code(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        return self.process.exitcode


def forget_main_module() -> None:
    """Spare every worker a re-run of optimizerd's own script.

    multiprocess re-executes the parent's ``__main__`` (found by its __file__ or __spec__) in
    each child, so that functions defined there can be unpickled; ours defines none, and the
    re-run (importing click and the config loader, compiling them where no .pyc is written)
    cost each worker start 15-20 ms. Preloading "__main__" in the fork server does not help:
    multiprocess never hands the fork server the script's path.
    """
    main = sys.modules["__main__"]
    main.__spec__ = None
    if hasattr(main, "__file__"):
        del main.__file__


class Spawner:
    def __init__(self, preload: list[str]):
        forget_main_module()
        self.ctx = multiprocess.get_context("forkserver")
        self.ctx.set_forkserver_preload(["ipc.launch", *preload])

    def warm_up(self) -> None:
        """Start the fork server now, so that its imports overlap with our own start-up."""
        forkserver.ensure_running()

    def spawn(self, name: str, spec: bytes) -> SpawnedProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        try:
            process = self.ctx.Process(
                target=launch, name=name, daemon=False,
                args=(WORKER_RUNNER, spec, Connection(out_w, readable=False),
                      Connection(err_w, readable=False)))
            process.start()  # the Connections close our write ends once handed over
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        return SpawnedProcess(process, process.pid, process.sentinel, out_r, err_r)

    def close(self) -> None:
        """Stop the fork server and its resource tracker and reap them, so none outlives us.

        multiprocess has no public call for this; ``_stop`` closes the server's 'alive' pipe
        and waits for it, exactly what its own atexit path does.
        """
        from multiprocess import resource_tracker

        for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
            try:
                helper._stop()
            except (OSError, ChildProcessError) as exc:
                log.warning("stopping %s: %s", type(helper).__name__, exc)
