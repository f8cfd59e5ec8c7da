"""Backup archives: one ``.tar.gz`` holding everything needed to rebuild a deployment's state.

* ``store/``: the consistent copy of the store: a LevelDB directory, or ``postgres.dump``
  (pg_dump's custom format, for ``pg_restore``);
* ``config/<name>``: the daemon's config file, as it was;
* ``manifest.json``: when, which backend, what the store copy holds, the config's hash.

The archive is written next to its final name and renamed when complete (mode 0600: it holds
the data), so a crash never leaves a truncated archive under that name. Reading one back
refuses members that would land outside the extraction directory (tarfile's ``data``
filter).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from typing import Any

from workers.storage.backend import BadRequest

SUFFIXES = (".tar.gz", ".tgz")
MANIFEST = "manifest.json"


def is_archive(path: str) -> bool:
    return path.endswith(SUFFIXES)


def make(target: str, backup: Callable[[str], dict[str, Any]], backend: str,
         config_file: str | None) -> dict[str, Any]:
    """Copy the store with ``backup`` and pack it with the config into ``target``."""
    if os.path.lexists(target):
        raise BadRequest(f"{target} already exists; a backup never overwrites")
    staging = target + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging, mode=0o700)
    try:
        store = backup(os.path.join(staging, "store"))
        manifest: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": backend,
            "store": {k: v for k, v in store.items() if k not in ("path", "file")}}
        if config_file:
            with open(config_file, "rb") as f:
                raw = f.read()
            os.makedirs(os.path.join(staging, "config"))
            name = os.path.basename(config_file)
            with open(os.path.join(staging, "config", name), "wb") as f:
                f.write(raw)
            manifest["config"] = {"file": name, "source": config_file,
                                  "sha256": hashlib.sha256(raw).hexdigest()}
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        partial = target + ".partial"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw_out, tarfile.open(fileobj=raw_out, mode="w:gz") as tar:
            for member in sorted(os.listdir(staging)):
                tar.add(os.path.join(staging, member), arcname=member)
        os.rename(partial, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.exists(target + ".partial"):
            os.unlink(target + ".partial")
    return {"path": target, "bytes": os.path.getsize(target), **manifest}


def extract(archive: str, into: str) -> dict[str, Any]:
    """Unpack ``archive`` into the new directory ``into``; its manifest."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            os.makedirs(into, mode=0o700)
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise BadRequest(f"{archive} is not a backup archive: {exc}") from None
    try:
        with open(os.path.join(into, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise BadRequest(f"{archive} has no readable {MANIFEST}: not a backup archive") \
            from None
