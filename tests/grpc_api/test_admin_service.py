"""AdminService over a real daemon: the same operations as REST /v1/admin (what one transport
changes, the other sees), the admin role everywhere, the errors' codes, the audit trail of gRPC
calls and the system-event stream."""
from __future__ import annotations


import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protos.llm_optimizer.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from tests.conftest import wait_until

JOB = admin_pb2.JobState
FINISHED = (JOB.JOB_STATE_SUCCEEDED, JOB.JOB_STATE_FAILED, JOB.JOB_STATE_CANCELLED,
            JOB.JOB_STATE_INTERRUPTED)


@pytest.fixture(scope="module")
def admin(grpc_daemon):
    with grpc_daemon.channel() as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)




def fails(call, request, code: grpc.StatusCode, metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, metadata=metadata, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def violation(err: grpc.RpcError) -> str:
    """The field the BadRequest detail names."""
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            found = error_details_pb2.BadRequest()
            detail.Unpack(found)
            return found.field_violations[0].field
    raise AssertionError(f"no BadRequest in {err}")


def finished_job(admin, grpc_daemon, job_id: str) -> admin_pb2.Job:
    return wait_until(lambda: (lambda job: job if job.state in FINISHED else None)(
        admin.GetJob(admin_pb2.GetJobRequest(id=job_id), metadata=grpc_daemon.auth())),
        timeout=60, interval=0.2, message=f"job {job_id} to finish")


UNARY = [("GetSystemStats", admin_pb2.GetSystemStatsRequest()),
         ("GetStorageStats", admin_pb2.GetStorageStatsRequest()),
         ("RunStorageMaintenance", admin_pb2.RunStorageMaintenanceRequest(
             operation=admin_pb2.RunStorageMaintenanceRequest.OPERATION_COMPACT)),
         ("ListFeatureFlags", admin_pb2.ListFeatureFlagsRequest()),
         ("GetFeatureFlag", admin_pb2.GetFeatureFlagRequest(name="proposals")),
         ("SetFeatureFlag", admin_pb2.SetFeatureFlagRequest(name="proposals", enabled=True)),
         ("StartJob", admin_pb2.StartJobRequest(kind="compact")),
         ("ListJobs", admin_pb2.ListJobsRequest()),
         ("GetJob", admin_pb2.GetJobRequest(id="j.0000000000000000")),
         ("CancelJob", admin_pb2.CancelJobRequest(id="j.0000000000000000")),
         ("ListApiKeys", admin_pb2.ListApiKeysRequest()),
         ("CreateApiKey", admin_pb2.CreateApiKeyRequest(name="x", role=common_pb2.ROLE_ADMIN)),
         ("RevokeApiKey", admin_pb2.RevokeApiKeyRequest(id="zzzzzzzzzzzz")),
         ("ListAuditRecords", admin_pb2.ListAuditRecordsRequest())]


@pytest.mark.parametrize("name,request_", UNARY, ids=[name for name, _ in UNARY])
def test_an_operator_is_refused_every_admin_rpc(grpc_daemon, admin, name, request_):
    fails(getattr(admin, name), request_, grpc.StatusCode.PERMISSION_DENIED,
          grpc_daemon.auth("operator"))


def test_an_operator_is_refused_system_events(grpc_daemon, admin):
    stream = admin.SubscribeSystemEvents(admin_pb2.SubscribeSystemEventsRequest(),
                                         metadata=grpc_daemon.auth("operator"), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_system_and_storage_stats(grpc_daemon, admin):
    stats = admin.GetSystemStats(admin_pb2.GetSystemStatsRequest(), metadata=grpc_daemon.auth())
    status, doc = grpc_daemon.rest("GET", "/v1/admin/stats", key=grpc_daemon.keys["admin"])
    assert status == 200
    assert stats.supervisor_pid == doc["supervisor"]["pid"] > 0
    assert stats.config_hash == doc["supervisor"]["config_hash"] and stats.ready
    assert stats.start_time.seconds == int(doc["supervisor"]["started_at"])
    assert {s.name for s in stats.services} == {s["name"] for s in doc["services"]} >= {
        "storage", "collector", "processor", "rest_api", "grpc_api"}
    grpc_api = next(s for s in stats.services if s.name == "grpc_api")
    assert grpc_api.state == "ready" and grpc_api.HasField("pid")
    assert grpc_api.uptime.ToNanoseconds() > 0 and grpc_api.HasField("heartbeat_age")
    assert stats.document["supervisor"]["config_hash"] == stats.config_hash

    storage = admin.GetStorageStats(admin_pb2.GetStorageStatsRequest(),
                                    metadata=grpc_daemon.auth())
    assert storage.details["backend"] == "leveldb"
    assert "rest-audit" in storage.logs  # the admin key's creation was audited


def test_feature_flags_are_the_rest_apis(grpc_daemon, admin):
    auth, key = grpc_daemon.auth(), grpc_daemon.keys["admin"]
    flags = admin.ListFeatureFlags(admin_pb2.ListFeatureFlagsRequest(), metadata=auth).flags
    names = [flag.name for flag in flags]
    assert names == sorted(names) and {"proposals", "rollouts", "strategy.caching"} <= set(names)
    assert names == sorted(f["name"] for f in grpc_daemon.rest("GET", "/v1/admin/flags",
                                                               key=key)[1])

    flag = admin.SetFeatureFlag(admin_pb2.SetFeatureFlagRequest(name="strategy.caching",
                                                                enabled=False), metadata=auth)
    assert not flag.enabled and flag.updated_by == "grpc-admin" and flag.HasField("update_time")
    seen = {f["name"]: f for f in grpc_daemon.rest("GET", "/v1/admin/flags", key=key)[1]}
    assert seen["strategy.caching"]["enabled"] is False
    assert seen["strategy.caching"]["updated_by"] == "grpc-admin"
    got = admin.GetFeatureFlag(admin_pb2.GetFeatureFlagRequest(name="strategy.caching"),
                               metadata=auth)
    assert got == flag
    assert admin.SetFeatureFlag(admin_pb2.SetFeatureFlagRequest(
        name="strategy.caching", enabled=True), metadata=auth).enabled

    err = fails(admin.GetFeatureFlag, admin_pb2.GetFeatureFlagRequest(name="no.such"),
                grpc.StatusCode.NOT_FOUND, auth)
    assert "no.such" in err.details()
    err = fails(admin.SetFeatureFlag, admin_pb2.SetFeatureFlagRequest(name="no.such"),
                grpc.StatusCode.NOT_FOUND, auth)
    assert "flags are:" in err.details()

    records, token = [], ""
    while True:
        page = admin.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(
            page_size=50, page_token=token), metadata=auth)
        if not page.records:
            break
        records += page.records
        token = page.next_page_token
    mine = [r for r in records if r.path == "/llm_optimizer.v1.AdminService/SetFeatureFlag"
            and r.subject == "grpc-admin"]
    assert [r.status for r in mine] == [200, 200, 404]
    assert all(r.method == "GRPC" for r in mine)
    assert all(r.role == "admin" and r.via == "api_key" and r.request_id and r.time.seconds
               for r in mine)
    assert [r.offset for r in records] == sorted(r.offset for r in records)
    status, page = grpc_daemon.rest("GET", "/v1/admin/audit?limit=500", key=key)
    assert status == 200 and any(r["path"] == mine[0].path for r in page["items"])


def test_jobs_run_list_cancel_and_stream(grpc_daemon, admin):
    auth = grpc_daemon.auth()
    job = admin.StartJob(admin_pb2.StartJobRequest(kind="compact"), metadata=auth)
    assert job.state in (JOB.JOB_STATE_QUEUED, JOB.JOB_STATE_RUNNING)
    assert job.by == "grpc-admin" and job.id.startswith("j.") and job.HasField("create_time")
    done = finished_job(admin, grpc_daemon, job.id)
    assert done.state == JOB.JOB_STATE_SUCCEEDED and done.HasField("result")
    assert done.finish_time.ToNanoseconds() >= done.start_time.ToNanoseconds() > 0
    status, same = grpc_daemon.rest("GET", f"/v1/admin/jobs/{job.id}", "admin")
    assert status == 200 and same["state"] == "succeeded" and same["by"] == "grpc-admin"

    listed = admin.ListJobs(admin_pb2.ListJobsRequest(page_size=5), metadata=auth)
    assert listed.jobs[0].id == job.id and len(listed.jobs) <= 5 and not listed.next_page_token
    running = admin.ListJobs(admin_pb2.ListJobsRequest(states=[JOB.JOB_STATE_RUNNING]),
                             metadata=auth)
    assert job.id not in {j.id for j in running.jobs}
    succeeded = admin.ListJobs(admin_pb2.ListJobsRequest(states=[JOB.JOB_STATE_SUCCEEDED],
                                                         kind="compact"), metadata=auth)
    assert job.id in {j.id for j in succeeded.jobs}
    err = fails(admin.ListJobs, admin_pb2.ListJobsRequest(page_token="x"),
                grpc.StatusCode.INVALID_ARGUMENT, auth)
    assert violation(err) == "page_token"

    err = fails(admin.CancelJob, admin_pb2.CancelJobRequest(id=job.id),
                grpc.StatusCode.FAILED_PRECONDITION, auth)
    assert "not queued or running" in err.details()
    fails(admin.GetJob, admin_pb2.GetJobRequest(id="j.0000000000000000"),
          grpc.StatusCode.NOT_FOUND, auth)
    err = fails(admin.StartJob, admin_pb2.StartJobRequest(kind="defrag"),
                grpc.StatusCode.INVALID_ARGUMENT, auth)
    assert violation(err) == "kind"
    args = admin_pb2.StartJobRequest(kind="backup")
    args.args.update({"path": "relative/dir"})
    err = fails(admin.StartJob, args, grpc.StatusCode.INVALID_ARGUMENT, auth)
    assert violation(err) == "args"
    err = fails(admin.RunStorageMaintenance, admin_pb2.RunStorageMaintenanceRequest(),
                grpc.StatusCode.INVALID_ARGUMENT, auth)
    assert violation(err) == "operation"

    # A maintenance job, followed on the system-event stream.
    events = admin.SubscribeSystemEvents(admin_pb2.SubscribeSystemEventsRequest(types=["job"]),
                                         metadata=auth, timeout=60)
    # the stream is up, with its request id sent at once; its first poll follows
    assert any(key == "x-request-id" and value for key, value in events.initial_metadata())
    job = admin.RunStorageMaintenance(admin_pb2.RunStorageMaintenanceRequest(
        operation=admin_pb2.RunStorageMaintenanceRequest.OPERATION_COMPACT), metadata=auth)
    assert job.kind == "compact"
    try:
        for event in events:
            assert event.type == "job" and event.service == "storage"
            if event.details["job"]["id"] == job.id and event.details["to"] == "succeeded":
                break
    finally:
        events.cancel()
    assert finished_job(admin, grpc_daemon, job.id).state == JOB.JOB_STATE_SUCCEEDED


def test_api_keys_made_over_grpc_work_over_rest_until_revoked(grpc_daemon, admin):
    auth = grpc_daemon.auth()
    made = admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(name="robot",
                                                            role=common_pb2.ROLE_OPERATOR),
                              metadata=auth)
    assert made.key.startswith(f"llmo_{made.api_key.id}_")
    assert made.api_key.role == common_pb2.ROLE_OPERATOR and not made.api_key.revoked
    assert grpc_daemon.rest("GET", "/v1/config/export", key=made.key)[0] == 200
    keys = admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=auth).keys
    assert made.api_key in keys
    assert made.key not in str(keys)

    revoked = admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id=made.api_key.id),
                                 metadata=auth)
    assert revoked.revoked and revoked.id == made.api_key.id
    wait_until(lambda: grpc_daemon.rest("GET", "/v1/config/export", key=made.key)[0] == 401,
               timeout=20, interval=0.2, message="the REST API to refuse the revoked key")
    fails(admin.RevokeApiKey, admin_pb2.RevokeApiKeyRequest(id="zzzzzzzzzzzz"),
          grpc.StatusCode.NOT_FOUND, auth)
    err = fails(admin.CreateApiKey, admin_pb2.CreateApiKeyRequest(name="norole"),
                grpc.StatusCode.INVALID_ARGUMENT, auth)
    assert violation(err) == "role"


def test_system_events_report_a_restart(grpc_daemon, admin):
    auth = grpc_daemon.auth()
    fails(lambda request, **kw: next(admin.SubscribeSystemEvents(request, **kw)),
          admin_pb2.SubscribeSystemEventsRequest(types=["weather"]),
          grpc.StatusCode.INVALID_ARGUMENT, auth)
    events = admin.SubscribeSystemEvents(
        admin_pb2.SubscribeSystemEventsRequest(service="collector"), metadata=auth, timeout=90)
    events.initial_metadata()
    before = next(s for s in admin.GetSystemStats(admin_pb2.GetSystemStatsRequest(),
                                                  metadata=auth).services
                  if s.name == "collector")
    assert grpc_daemon.ctl("restart", "collector").returncode == 0
    seen = []
    try:
        for event in events:
            assert event.service == "collector"
            seen.append(event.type)
            if event.type == "service_restart":
                assert event.details["restarts"] == before.restarts + 1
                assert event.severity == common_pb2.SEVERITY_WARNING
                break
    finally:
        events.cancel()
    assert events.code() == grpc.StatusCode.CANCELLED
    # The stream's end left the service as it was.
    assert admin.ListFeatureFlags(admin_pb2.ListFeatureFlagsRequest(), metadata=auth).flags
