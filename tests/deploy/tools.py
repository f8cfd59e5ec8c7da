"""The real tools the deployment tests run: found beside this interpreter (the venv's console
scripts) or on PATH. A missing tool fails the test with CI=true (the test command installs
them all) and skips it otherwise, with the install hint."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest


def missing(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str, hint: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which(name)
    if found is None:
        missing(f"{name} is not installed ({hint})")
    return found
