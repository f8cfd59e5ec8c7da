"""A throwaway PostgreSQL cluster in a temp dir: for the storage tests and bench_storage.py.

Started with ``pg_ctl`` on a free port, listening on 127.0.0.1 only, its unix socket in its own
temp dir; host connections need a password (SCRAM). initdb refuses to run as root: as root every
server binary runs as user ``postgres`` (runuser) on a temp dir chowned to it.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile

PG_PASSWORD = "s3cret-Pg-pw-9f2b"  # checked for in errors and logs: it must never show up
PG_USER = "optimizer"


def pg_bindir() -> str | None:
    """The newest /usr/lib/postgresql/N/bin that has initdb, or None."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    found.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    """One PostgreSQL cluster in its own temp dir, run as user postgres when we are root."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        # Short path: the unix socket path must fit in 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="pgt-", dir="/tmp")
        self.data = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "server.log")
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.dir, 0o755)
        self.databases = itertools.count(1)

    def run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.as_user, os.path.join(self.bindir, tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.dir)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}\n{self.server_log()}")
        return done

    def server_log(self, chars: int = 3000) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return "--- server log (tail) ---\n" + f.read()[-chars:]
        except OSError:
            return ""

    def init(self) -> None:
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write("not-used-superuser\n")
        if self.as_user:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self.run("initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust",
                 "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
                 f"--pwfile={pwfile}")
        os.unlink(pwfile)

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.dir} -c fsync=off "
                   "-c full_page_writes=off -c max_connections=100")
        self.run("pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60",
                 "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        # -l again: else the new postmaster would write to our pipes (and run() wait on them).
        self.run("pg_ctl", "-D", self.data, "-l", self.logfile, "-m", mode, "-w", "-t", "60",
                 "restart")

    def running(self) -> bool:
        cmd = [*self.as_user, os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "status"]
        return subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL).returncode == 0

    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def destroy(self) -> None:
        """Stop (immediate; SIGKILL if that fails) and delete everything."""
        pid = self.postmaster_pid()
        if pid is not None:
            try:
                self.stop("immediate")  # -w: returns once the server is gone
            except (RuntimeError, subprocess.TimeoutExpired):
                _kill_server(pid)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- connections ------------------------------------------------------------------------

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """Superuser over the unix socket (trust): for setting up, never for the backend."""
        return f"host={self.dir} port={self.port} user=postgres dbname={dbname}"

    def admin(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(self.admin_conninfo(dbname), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def create_role(self) -> None:
        self.admin(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'")

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t{next(self.databases)}"
        self.admin(f"CREATE DATABASE {name} OWNER {PG_USER}")
        return name

    def dsn(self, dbname: str) -> str:
        """A URL with the password in it, over TCP on 127.0.0.1."""
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{dbname}"


def _kill_server(pid: int) -> None:
    """SIGKILL a postmaster and its children (its process group, unless it is ours)."""
    try:
        group = os.getpgid(pid)
        if group != os.getpgrp():
            os.killpg(group, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def make_cluster(bindir: str) -> PgCluster:
    cluster = PgCluster(bindir)
    try:
        cluster.init()
        cluster.start()
        cluster.create_role()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
