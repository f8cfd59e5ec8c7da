"""The first function a fork-server child runs: it imports its runner by name.

The supervisor hands the fork server ``launch`` and a "module:function" string, so that it
starts workers without importing any worker code itself.
"""
from __future__ import annotations

import importlib
from typing import Any

WORKER_RUNNER = "workers.runtime:run_worker"


def launch(runner: str, *args: Any) -> None:
    module_name, _, function_name = runner.partition(":")
    getattr(importlib.import_module(module_name), function_name)(*args)
