"""A backup of the PostgreSQL store with PostgreSQL's own pg_dump: a consistent snapshot of the
running database in the custom format (``pg_restore`` reads it back), written to
``<target>/postgres.dump``.

The password never appears on pg_dump's command line (where ``ps`` shows it): it goes in the
``PGPASSWORD`` environment variable of the child, and the rest of the DSN in ``--dbname``. The
newest pg_dump installed is used (``/usr/lib/postgresql/*/bin``), else the one on PATH: an
older pg_dump refuses a newer server.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from workers.storage.backend import BadRequest, StorageFailure

DUMP_FILE = "postgres.dump"


def pg_dump_binary() -> str:
    def version(path: str) -> float:
        try:
            return float(path.split("/postgresql/")[1].split("/")[0])
        except (IndexError, ValueError):
            return 0.0

    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"), key=version)
    found = installed[-1] if installed else shutil.which("pg_dump")
    if found is None:
        raise BadRequest("pg_dump is not installed (Debian: apt-get install postgresql-client)")
    return found


def dump(dsn: str, target: str, clean: Callable[[str], str]) -> dict[str, Any]:
    """pg_dump of ``dsn`` into the new directory ``target``; ``clean`` takes secrets out of
    error texts."""
    if os.path.lexists(target):
        raise BadRequest(f"{target} already exists")
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = str(password)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial, mode=0o700)
    path = os.path.join(partial, DUMP_FILE)
    try:
        done = subprocess.run([pg_dump_binary(), "--format=custom", "--no-owner",
                               f"--file={path}", f"--dbname={make_conninfo(**params)}"],
                              env=env, capture_output=True, text=True, timeout=3600,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StorageFailure(f"pg_dump failed: {clean(done.stderr.strip())}")
        size = os.path.getsize(path)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"path": target, "format": "pg_dump", "bytes": size,
            "file": os.path.join(target, DUMP_FILE)}
