"""Background jobs of the storage worker, end to end: a real optimizerd, admin calls over its
control socket (as the REST API makes them), LevelDB unless said otherwise.

A job that must still be running when the test acts on it is a backup of a store seeded with
SLOW_KEYS keys before the daemon starts (about a second of copying); the tests wait for states,
never for time.
"""
from __future__ import annotations

import json
import os
import subprocess
import re
import shutil
import signal
from collections.abc import Callable
from typing import Any

import msgspec
import plyvel
import pytest

from ipc import storage as s
from tests.conftest import wait_until
from workers.storage.jobs import MAX_RECORDS, Job
from workers.storage.leveldb_backend import kv_key
from tests.storage.pg_cluster import PG_PASSWORD
from workers.storage.pg_dump import pg_dump_binary
from workers.storage_client import SyncStorageClient

SLOW_KEYS = 1_000_000
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")


def call(d: Any, command: str, **args: Any) -> Any:
    reply = d.request("call", {"service": "storage", "command": command, "args": args})
    assert reply.ok, f"{command} {args}: {reply.error}"
    return reply.result


def refused(d: Any, command: str, **args: Any) -> str:
    reply = d.request("call", {"service": "storage", "command": command, "args": args})
    assert not reply.ok, f"{command} {args} succeeded: {reply.result}"
    return reply.error.message


def wait_job(d: Any, job_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    """The job's record once it is in ``state``; fails at once if it ends in another."""
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        job = last["job"] = call(d, "job", id=job_id)
        if job["state"] != state and job["state"] in FINISHED:
            raise AssertionError(f"job ended {job['state']}, not {state}: {job}")
        return job if job["state"] == state else None

    return wait_until(check, timeout, message=lambda: f"last record: {last.get('job')}")


def jobs_status(d: Any) -> dict[str, Any]:
    return d.service("storage")["status"]["jobs"]


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LevelDB whose backup takes about a second: copied in as a daemon's store."""
    path = str(tmp_path_factory.mktemp("slow") / "leveldb")
    db = plyvel.DB(path, create_if_missing=True)
    value = b"v" * 64
    with db.write_batch() as batch:
        for i in range(SLOW_KEYS):
            batch.put(kv_key("test", b"k%08d" % i), value)
    db.close()
    return path


@pytest.fixture
def storage_daemon(make_daemon: Callable[..., Any], slow_store: str) -> Callable[..., Any]:
    def make(slow: bool = False, **storage: Any) -> Any:
        d = make_daemon(builtins=["storage"], extra={"storage": storage} if storage else None)
        if slow:
            shutil.copytree(slow_store, os.path.join(d.data, "leveldb"))
        return d.start()
    return make


def start(d: Any, kind: str, **args: Any) -> dict[str, Any]:
    job = call(d, "job-start", kind=kind, args=args, by="tests")
    assert job["kind"] == kind and job["state"] in ("queued", "running"), job
    return job


def test_each_kind_succeeds_with_its_result(storage_daemon, tmp_path):
    d = storage_daemon(log_retention_records=5)
    client = SyncStorageClient(d.runtime, timeout=5.0)
    try:
        client.call(s.Put(ns="test", key=b"k", value=b"before"))
        client.call(s.LogAppend(log="events", records=[b"%d" % i for i in range(12)]))

        target = str(tmp_path / "copy")
        job = start(d, "backup", path=target)
        assert re.fullmatch(r"j\.[0-9a-f]{16}", job["id"]) and job["by"] == "tests"
        assert job["args"] == {"path": target} and job["created_ms"] > 0
        done = wait_job(d, job["id"], "succeeded")
        assert done["result"]["path"] == target and done["result"]["keys"] >= 3
        assert done["started_ms"] >= done["created_ms"] and done["finished_ms"] >= \
            done["started_ms"]
        assert target in done["message"]
        copy = plyvel.DB(target)
        try:
            assert copy.get(kv_key("test", b"k")) == b"before"
        finally:
            copy.close()
        client.call(s.Put(ns="test", key=b"k", value=b"after"))
        call(d, "restore", path=target)
        assert client.call(s.Get(ns="test", key=b"k")) == b"before"
        assert call(d, "job", id=job["id"])["state"] == "succeeded"  # ours, not the backup's

        default = wait_job(d, start(d, "backup")["id"], "succeeded")["result"]["path"]
        assert re.fullmatch(re.escape(os.path.join(d.data, "backups")) +
                            r"/backup-\d{8}T\d{6}Z(-\d+)?", default), default
        assert os.path.isdir(default)

        compacted = wait_job(d, start(d, "compact")["id"], "succeeded")["result"]
        assert compacted["bytes_before"] > 0 and compacted["bytes_after"] > 0

        retained = wait_job(d, start(d, "retention")["id"], "succeeded")
        assert retained["result"] == {"dropped": 7}
        assert retained["message"] == "dropped 7 event-log records"
        assert client.call(s.LogInfo(log="events")).first_offset == 7
    finally:
        client.close()
    wait_until(lambda: jobs_status(d) == {"running": None, "queued": 0}, 5)
    # The restored backup held the first job's record as "running": ours were written back.
    reply = d.request("restart", {"service": "storage"}, timeout=70)
    assert reply.ok, reply.error
    assert call(d, "job", id=job["id"]) == done


def test_jobs_run_one_at_a_time_in_order(storage_daemon, tmp_path):
    d = storage_daemon(slow=True)
    ids = [start(d, "backup", path=str(tmp_path / "first"))["id"]]
    for kind in ("compact", "retention", "compact", "backup"):
        job = start(d, kind)
        assert job["state"] == "queued", job
        ids.append(job["id"])
    wait_until(lambda: jobs_status(d) == {"running": ids[0], "queued": 4}, 10,
               message=lambda: str(jobs_status(d)))
    done = [wait_job(d, id_, "succeeded", 60) for id_ in ids]
    for before, after in zip(done, done[1:], strict=False):
        assert after["created_ms"] > before["created_ms"]
        assert after["started_ms"] >= before["finished_ms"], (before, after)
    assert [job["id"] for job in call(d, "jobs")] == ids[::-1]  # newest first
    assert [job["id"] for job in call(d, "jobs", limit=2)] == ids[::-1][:2]


def test_cancel_a_queued_and_a_running_job(storage_daemon, tmp_path):
    d = storage_daemon(slow=True)
    target = str(tmp_path / "cancelled")
    running = start(d, "backup", path=target)
    queued = start(d, "compact")
    wait_job(d, running["id"], "running")

    cancelled = call(d, "job-cancel", id=queued["id"])
    assert cancelled["state"] == "cancelled" and cancelled["started_ms"] == 0
    assert cancelled["message"] == "cancelled before it started" and cancelled["finished_ms"]

    answer = call(d, "job-cancel", id=running["id"])
    # A thread cannot be interrupted: the answer comes while it still runs, or just after.
    assert answer["state"] in ("running", "cancelled"), answer
    ended = wait_job(d, running["id"], "cancelled", 60)
    assert "could not be interrupted" in ended["message"], ended
    # The copy ran to its end (with the job records of the moment among its keys).
    assert ended["result"]["path"] == target and ended["result"]["keys"] >= SLOW_KEYS
    assert os.path.isdir(target)
    assert refused(d, "job-cancel", id=running["id"]) == \
        f"job {running['id']!r} is cancelled, not queued or running"
    wait_job(d, start(d, "compact")["id"], "succeeded")  # the runner goes on


def test_bad_requests_are_refused_with_the_field(storage_daemon, tmp_path):
    d = storage_daemon()
    assert refused(d, "job-start", kind="x") == \
        "job kind must be one of backup, compact, retention, not 'x'"
    assert "args.path" in refused(d, "job-start", kind="backup", args={"path": "relative"})
    (tmp_path / "there").mkdir()
    assert "already exists" in refused(d, "job-start", kind="backup",
                                       args={"path": str(tmp_path / "there")})
    assert "unknown field 'x'" in refused(d, "job-start", kind="compact", args={"x": 1})
    assert "unknown field 'path'" in refused(d, "job-start", kind="backup", path="/tmp/p")
    assert "by must be a string" in refused(d, "job-start", kind="compact", by=7)
    assert "limit" in refused(d, "jobs", limit=501)
    assert refused(d, "job", id="j.123") == "no job 'j.123'"
    assert refused(d, "job-cancel", id="j.123").startswith("no job ")
    assert "id must be" in refused(d, "job")
    finished = wait_job(d, start(d, "compact")["id"], "succeeded")
    assert refused(d, "job-cancel", id=finished["id"]) == \
        f"job {finished['id']!r} is succeeded, not queued or running"
    assert call(d, "jobs") == [finished]

    # The documented command line reaches the same command.
    done = d.ctl("call", "storage", "job-start", "--arg", 'kind:="retention"', "--arg",
                 "by=operator")
    assert done.returncode == 0, done.stderr
    assert '"kind": "retention"' in done.stdout and '"by": "operator"' in done.stdout


def test_records_survive_a_restart_and_a_stop_interrupts_what_runs(storage_daemon, tmp_path):
    d = storage_daemon(slow=True)
    finished = wait_job(d, start(d, "compact")["id"], "succeeded")
    running = start(d, "backup", path=str(tmp_path / "b"))
    queued = start(d, "retention")
    wait_job(d, running["id"], "running")
    reply = d.request("restart", {"service": "storage"}, timeout=70)
    assert reply.ok, reply.error
    assert call(d, "job", id=finished["id"]) == finished
    for job, was in ((running, "running"), (queued, "queued")):
        record = call(d, "job", id=job["id"])
        assert record["state"] == "interrupted", record
        assert record["message"] == f"the storage worker stopped while this job was {was}"
    assert [job["id"] for job in call(d, "jobs")] == [queued["id"], running["id"],
                                                      finished["id"]]
    assert jobs_status(d) == {"running": None, "queued": 0}


def test_a_job_cut_short_by_sigkill_is_interrupted(storage_daemon, tmp_path):
    d = storage_daemon(slow=True)
    running = start(d, "backup", path=str(tmp_path / "b"))
    queued = start(d, "compact")
    wait_job(d, running["id"], "running")
    old = d.services()["storage"]["pid"]
    os.kill(old, signal.SIGKILL)
    d.wait_service("storage", lambda x: x["state"] == "ready" and x["pid"] != old, 30)
    for job, was in ((running, "running"), (queued, "queued")):
        record = call(d, "job", id=job["id"])
        assert (record["state"], record["message"]) == \
            ("interrupted", f"the storage worker stopped while this job was {was}"), record
        assert record["finished_ms"] >= record["created_ms"]
    wait_job(d, start(d, "compact")["id"], "succeeded")


def test_only_the_newest_records_are_kept(make_daemon):
    """Records made by an earlier run: the oldest beyond MAX_RECORDS go, at start and at each
    new job, and a running one left behind is interrupted."""
    d = make_daemon(builtins=["storage"])
    os.makedirs(d.data)
    db = plyvel.DB(os.path.join(d.data, "leveldb"), create_if_missing=True)
    with db.write_batch() as batch:
        for n in range(1, MAX_RECORDS + 7):
            state = "running" if n == MAX_RECORDS + 6 else "succeeded"
            job = Job(id=f"j.{n:016x}", kind="compact", args={}, by="earlier", state=state,
                      message="", created_ms=n, started_ms=n, finished_ms=n)
            batch.put(kv_key("jobs", job.id.encode()), msgspec.json.encode(job))
    db.close()
    d.start()
    newest = call(d, "jobs", limit=500)
    assert len(newest) == 500 and newest[0]["id"] == f"j.{MAX_RECORDS + 6:016x}"
    assert newest[0]["state"] == "interrupted"
    assert refused(d, "job", id=f"j.{6:016x}") == f"no job 'j.{6:016x}'"
    job = wait_job(d, start(d, "compact")["id"], "succeeded")
    assert refused(d, "job", id=f"j.{7:016x}").startswith("no job ")
    reply = d.request("restart", {"service": "storage"}, timeout=70)
    assert reply.ok, reply.error
    assert call(d, "jobs", limit=1) == [job]
    assert call(d, "job", id=f"j.{8:016x}")["by"] == "earlier"
    assert refused(d, "job", id=f"j.{7:016x}").startswith("no job ")


def test_compact_and_backup_on_postgres(make_daemon, pg_dsn):
    d = make_daemon(builtins=["storage"], extra={"storage": {"backend": "postgres"}},
                    env={"LLM_OPTIMIZER__STORAGE__POSTGRES_DSN": pg_dsn}).start()
    client = SyncStorageClient(d.runtime, timeout=5.0)
    try:
        client.call(s.LogAppend(log="events", records=[b"x"] * 100))
    finally:
        client.close()
    done = wait_job(d, start(d, "compact")["id"], "succeeded")
    assert done["result"]["tables"][0] == "kv" and "log_records" in done["result"]["tables"]
    backup = wait_job(d, start(d, "backup")["id"], "succeeded")
    result = backup["result"]
    assert result["format"] == "pg_dump" and "pg_dump" in backup["message"]
    listed = subprocess.run([pg_dump_binary().replace("pg_dump", "pg_restore"), "--list",
                             result["file"]], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "log_records" in listed.stdout, listed.stderr
    assert PG_PASSWORD not in json.dumps(backup)
    reply = d.request("restart", {"service": "storage"}, timeout=70)
    assert reply.ok, reply.error
    assert [job["state"] for job in call(d, "jobs")] == ["succeeded", "succeeded"]
