"""Fixtures of the storage tests: throwaway PostgreSQL clusters (``pg_*``).

``pg_cluster`` is one cluster for the whole session (initdb once, ~1-2 s); ``pg_dsn`` gives each
test a database of its own in it. ``pg_new_cluster()`` makes further clusters for tests that
stop or restart the server. A cluster is started with ``pg_ctl`` on a free port, listening on
127.0.0.1 only, its unix socket in its own temp dir; host connections need a password (SCRAM),
so the DSNs handed out carry one (and tests can check that it never leaks). initdb refuses to
run as root: as root every server binary runs as user ``postgres`` (runuser) on a temp dir
chowned to it. Everything is stopped and deleted at teardown.

Without the binaries (``/usr/lib/postgresql/*/bin/initdb``), PostgreSQL tests are skipped,
or fail when ``CI=true``: ``scripts/test.sh`` installs PostgreSQL there.
"""
from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator

import pytest

from .pg_cluster import PgCluster, make_cluster, pg_bindir


def pg_missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL must be installed, see scripts/test.sh)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_bin() -> str:
    bindir = pg_bindir()
    if bindir is None:
        pg_missing("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pg_missing("running as root, and there is no user postgres to run initdb as")
    return bindir


@pytest.fixture(scope="session")
def pg_clusters(pg_bin: str) -> Iterator[list[PgCluster]]:
    """Every cluster made in this session, destroyed at its end."""
    made: list[PgCluster] = []
    yield made
    for cluster in made:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_cluster(pg_bin: str, pg_clusters: list[PgCluster]) -> PgCluster:
    """The session's shared cluster. Tests must not stop it: use pg_new_cluster for that."""
    cluster = make_cluster(pg_bin)
    pg_clusters.append(cluster)
    return cluster


@pytest.fixture
def pg_new_cluster(pg_bin: str, pg_clusters: list[PgCluster]
                   ) -> Iterator[Callable[[], PgCluster]]:
    """Factory of private clusters (for stopping and restarting), destroyed after the test."""
    mine: list[PgCluster] = []

    def make() -> PgCluster:
        cluster = make_cluster(pg_bin)
        mine.append(cluster)
        return cluster

    yield make
    for cluster in mine:
        cluster.destroy()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """A DSN (with password) of a fresh, empty database of the shared cluster."""
    return pg_cluster.dsn(pg_cluster.create_database())
