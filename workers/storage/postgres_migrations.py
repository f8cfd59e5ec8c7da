"""Versioned schema migrations of the PostgreSQL backend (files in migrations/NNNN_name.sql).

Applied at start in one transaction under an advisory lock, recorded in schema_migrations;
idempotent; a database migrated by a newer release is refused rather than touched.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

log = logging.getLogger("workers.storage.postgres")
MIGRATION_LOCK = 0x6C6C6D6F70745F31  # pg_advisory_xact_lock key: "llmopt_1"
MIGRATION_LOCK_TIMEOUT_MS = 20_000
MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer version of the optimizer: refuse to touch it."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migration files shipped in workers/storage/migrations, numbered 1..N in order."""
    folder = resources.files("workers.storage").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("storage migrations must be numbered 0001.. without gaps or "
                           f"duplicates; found {[m.version for m in found]}")
    return found


async def migrate(conn: psycopg.AsyncConnection, migrations: list[Migration]) -> int:
    """Apply the migrations the database lacks; returns its schema version."""
    newest = migrations[-1].version if migrations else 0
    async with conn.transaction():
        # Waiting longer for another migrating worker (or a lock a migration needs) fails
        # as Unavailable, and the worker tries again later.
        await conn.execute(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT_MS}ms'")
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        cur = await conn.execute("SELECT version FROM schema_migrations")
        have = {row[0] for row in await cur.fetchall()}
        if have and max(have) > newest:
            raise SchemaTooNew(
                f"the PostgreSQL database is at schema version {max(have)}, newer than the "
                f"newest this optimizer knows ({newest}): it was migrated by a newer "
                "release. Upgrade the optimizer, or point postgres_dsn at another database.")
        for migration in migrations:
            if migration.version in have:
                continue
            log.info("applying storage migration %04d_%s", migration.version,
                     migration.name)
            await conn.execute(migration.sql.encode(), prepare=False)
            await conn.execute("INSERT INTO schema_migrations (version, name) "
                               "VALUES (%s, %s)", [migration.version, migration.name])
            have.add(migration.version)
    return max(have) if have else 0
