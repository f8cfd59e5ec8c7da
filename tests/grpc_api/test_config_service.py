"""ConfigService over a running optimizerd: the same answers as the REST API for the same
service, conflicts, invalid content with its field path, roles, the change stream and batches
that apply all or nothing."""
from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format

from protos.llm_optimizer.v1 import config_pb2, config_pb2_grpc
from tests.conftest import wait_until

from .conftest import failure, violations

pytestmark = pytest.mark.timeout(180)
C = config_pb2




def rest_shows(d, path: str, expected: Any) -> None:
    """The REST answer equals ``expected`` once its per-process response cache (1 s) has
    expired: writes made through the gRPC process show there within the TTL."""
    last: list[Any] = []

    def same() -> bool:
        last[:] = [d.rest("GET", path)]
        return last[0] == (200, expected)

    wait_until(same, timeout=5, message=lambda: f"GET {path}: {last} != {expected}")


def as_rest(config: config_pb2.LLMConfig) -> dict[str, Any]:
    """An LLMConfig message as the REST API's LLMConfig JSON."""
    data = json_format.MessageToDict(config.content, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    for variant in data["variants"]:
        variant.setdefault("overrides", {})
    return {"service": config.service, "version": config.version, "reason": config.reason,
            "updated_ns": config.update_time.seconds * 10**9 + config.update_time.nanos, **data}


def content(model: str, **sections: Any) -> config_pb2.ConfigContent:
    message = C.ConfigContent(model=model)
    for name, value in sections.items():
        if name == "variants":
            message.variants.extend(json_format.ParseDict(v, C.Variant()) for v in value)
        else:
            getattr(message, name).update(value)
    return message






@pytest.fixture(scope="module")
def stub(grpc_daemon):
    return config_pb2_grpc.ConfigServiceStub(grpc_daemon.channel())


def test_round_trip_matches_rest(grpc_daemon, stub):
    d, op, viewer = grpc_daemon, grpc_daemon.auth("operator"), grpc_daemon.auth("viewer")
    err = failure(stub.GetConfig, C.GetConfigRequest(service="rt-svc"), metadata=viewer)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    made = stub.CreateConfig(C.CreateConfigRequest(
        service="rt-svc", config=content("gpt-4o", parameters={"temperature": 0.2,
                                                                "max_tokens": 512})),
        metadata=op)
    assert (made.version, made.reason) == (1, "set through the gRPC API")
    status, body = d.rest("GET", "/v1/config/rt-svc")
    assert status == 200 and body == as_rest(made)
    assert body["parameters"]["max_tokens"] == 512 and isinstance(
        body["parameters"]["max_tokens"], int)
    err = failure(stub.CreateConfig, C.CreateConfigRequest(service="rt-svc",
                                                           config=content("x")), metadata=op)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION

    # a masked update keeps what the mask leaves out
    second = stub.UpdateConfig(C.UpdateConfigRequest(
        service="rt-svc", expected_version=1, reason="cache on",
        config=content("ignored", cache={"enabled": True}),
        update_mask=field_mask_pb2.FieldMask(paths=["cache"])), metadata=op)
    assert (second.version, second.content.model, second.reason) == (2, "gpt-4o", "cache on")
    assert dict(second.content.parameters)["temperature"] == 0.2
    third = stub.UpdateConfig(C.UpdateConfigRequest(
        service="rt-svc", expected_version=2, config=content(
            "gpt-4o-mini", variants=[{"name": "canary", "weight_bp": 5000,
                                      "overrides": {"model": "m2"}}])), metadata=op)
    assert third.version == 3 and not third.content.parameters.fields  # whole content
    rest_shows(d, "/v1/config/rt-svc", as_rest(third))
    assert stub.GetConfig(C.GetConfigRequest(service="rt-svc"), metadata=viewer) == third
    old = stub.GetConfig(C.GetConfigRequest(service="rt-svc", version=2), metadata=viewer)
    assert as_rest(old) == d.rest("GET", "/v1/config/rt-svc/versions/2")[1]

    # versions, paged newest first, as REST pages them
    seen, token = [], ""
    while True:
        page = stub.ListConfigVersions(C.ListConfigVersionsRequest(
            service="rt-svc", page_size=2, page_token=token), metadata=viewer)
        seen += [as_rest(c) for c in page.configs]
        token = page.next_page_token
        if not token:
            break
    assert [c["version"] for c in seen] == [3, 2, 1]
    rest_shows(d, "/v1/config/rt-svc/versions?limit=5", {"items": seen, "next_cursor": None})

    diff = stub.DiffConfigVersions(C.DiffConfigVersionsRequest(
        service="rt-svc", from_version=1, to_version=3), metadata=viewer)
    as_json = [{"path": e.path, "old": json_format.MessageToDict(e.old_value),
                "new": json_format.MessageToDict(e.new_value)} for e in diff.entries]
    assert as_json == d.rest("GET", "/v1/config/rt-svc/diff?from=1&to=3")[1]
    assert {"path": "model", "old": "gpt-4o", "new": "gpt-4o-mini"} in as_json

    resolved = stub.ResolveConfig(C.ResolveConfigRequest(service="rt-svc", key="user-1"),
                                  metadata=viewer)
    rest_shows(d, "/v1/config/rt-svc/resolve?key=user-1", {
        "service": resolved.service, "version": resolved.version, "variant": resolved.variant,
        "config": json_format.MessageToDict(resolved.config)})

    back = stub.RollbackConfig(C.RollbackConfigRequest(service="rt-svc", version=1),
                               metadata=op)
    assert (back.version, back.reason, back.content.model) == (4, "rolled back to version 1",
                                                               "gpt-4o")
    rest_shows(d, "/v1/config/rt-svc", as_rest(back))

    listed = stub.ListConfigs(C.ListConfigsRequest(), metadata=viewer)
    assert as_rest(next(c for c in listed.configs if c.service == "rt-svc")) == as_rest(back)
    exported = stub.ExportConfigs(C.ExportConfigsRequest(services=["rt-svc"]), metadata=viewer)
    status, body = d.rest("GET", "/v1/config/export")
    mine = [c for c in body["configs"] if c["service"] == "rt-svc"]
    assert [as_rest(C.LLMConfig(service=c.service, content=c.config))
            for c in exported.configs] == [
        {**c, "version": 0, "reason": "", "updated_ns": 0} for c in mine]


def test_conflict_invalid_content_roles_and_unimplemented(grpc_daemon, stub):
    op, viewer = grpc_daemon.auth("operator"), grpc_daemon.auth("viewer")
    stub.CreateConfig(C.CreateConfigRequest(service="bad-svc", config=content("m")),
                      metadata=op)
    stub.UpdateConfig(C.UpdateConfigRequest(service="bad-svc", expected_version=1,
                                            config=content("m2")), metadata=op)
    err = failure(stub.UpdateConfig, C.UpdateConfigRequest(
        service="bad-svc", expected_version=1, config=content("late")), metadata=op)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "version 2" in err.details()
    err = failure(stub.UpdateConfig, C.UpdateConfigRequest(
        service="bad-svc", expected_version=2,
        config=content("m", parameters={"temperature": -0.5})), metadata=op)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == ["config.parameters.temperature"]
    err = failure(stub.UpdateConfig, C.UpdateConfigRequest(
        service="bad-svc", expected_version=2, config=content("m"),
        update_mask=field_mask_pb2.FieldMask(paths=["cache", "nope"])), metadata=op)
    assert violations(err) == ["update_mask.paths[1]"]
    err = failure(stub.UpdateConfig, C.UpdateConfigRequest(
        service="bad-svc", expected_version=2, config=content("m")), metadata=viewer)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    err = failure(stub.GetConfig, C.GetConfigRequest(service="bad svc"), metadata=viewer)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and violations(err) == ["service"]
    err = failure(stub.DeleteConfig, C.DeleteConfigRequest(service="bad-svc",
                                                           expected_version=2), metadata=op)
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED and "cannot be deleted" in err.details()
    assert stub.GetConfig(C.GetConfigRequest(service="bad-svc"), metadata=viewer).version == 2


def test_watch_sends_current_then_changes(grpc_daemon, stub):
    d, op = grpc_daemon, grpc_daemon.auth("operator")
    stub.CreateConfig(C.CreateConfigRequest(service="watch-svc", config=content("m1")),
                      metadata=op)
    stream = stub.WatchConfig(C.WatchConfigRequest(services=["watch-svc"]),
                              metadata=d.auth("viewer"), timeout=60)
    try:
        first = next(stream)
        assert first.kind == C.ConfigEvent.KIND_CURRENT and first.config.version == 1
        status, body = d.rest("PUT", "/v1/config/watch-svc", "operator",
                            {"expected_version": 1, "config": {"model": "m2"}})
        assert status == 200
        change = next(stream)
        assert (change.kind, change.config.version, change.config.content.model) == (
            C.ConfigEvent.KIND_CHANGED, 2, "m2")
        assert as_rest(change.config) == body and change.by and change.offset > 0
        # a new stream replaying from that offset gets the same change, and no CURRENT
        replay = stub.WatchConfig(C.WatchConfigRequest(services=["watch-svc"],
                                                       since_offset=change.offset),
                                  metadata=d.auth("viewer"), timeout=60)
        try:
            again = next(replay)
            assert (again.kind, again.config.version) == (C.ConfigEvent.KIND_CHANGED, 2)
        finally:
            replay.cancel()
    finally:
        stream.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() is grpc.StatusCode.CANCELLED


def test_batch_update_applies_all_or_none(grpc_daemon, stub):
    d, op = grpc_daemon, grpc_daemon.auth("operator")
    stub.CreateConfig(C.CreateConfigRequest(service="batch-a", config=content("a1")),
                      metadata=op)
    good = [C.UpdateConfigRequest(service="batch-a", expected_version=1, config=content("a2")),
            C.UpdateConfigRequest(service="batch-b", expected_version=0, config=content("b1"))]
    answer = stub.BatchUpdateConfig(iter(good), metadata=op)
    assert [(r.index, r.service, r.config.version, r.unchanged) for r in answer.results] == [
        (0, "batch-a", 2, False), (1, "batch-b", 1, False)]
    rest_shows(d, "/v1/config/batch-b", as_rest(answer.results[1].config))

    same = C.UpdateConfigRequest(service="batch-b", expected_version=1, config=content("b1"))
    answer = stub.BatchUpdateConfig(iter([same]), metadata=op)
    assert answer.results[0].unchanged and answer.results[0].config.version == 1

    bad_content = [
        C.UpdateConfigRequest(service="batch-a", expected_version=2, config=content("a3")),
        C.UpdateConfigRequest(service="batch-c", expected_version=0,
                              config=content("c1", parameters={"top_p": -1}))]
    err = failure(stub.BatchUpdateConfig, iter(bad_content), metadata=op)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == ["updates[1].config.parameters.top_p"]
    stale = [C.UpdateConfigRequest(service="batch-a", expected_version=2, config=content("a3")),
             C.UpdateConfigRequest(service="batch-b", expected_version=7, config=content("b2"))]
    err = failure(stub.BatchUpdateConfig, iter(stale), metadata=op)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "updates[1]" in err.details()
    # nothing of either batch was written
    viewer = d.auth("viewer")
    assert stub.GetConfig(C.GetConfigRequest(service="batch-a"), metadata=viewer).version == 2
    assert stub.GetConfig(C.GetConfigRequest(service="batch-b"), metadata=viewer).version == 1
    err = failure(stub.GetConfig, C.GetConfigRequest(service="batch-c"), metadata=viewer)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    err = failure(stub.BatchUpdateConfig, iter(good[:1]), metadata=viewer)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED


def test_import_and_list_pages(grpc_daemon, stub):
    d, op, viewer = grpc_daemon, grpc_daemon.auth("operator"), grpc_daemon.auth("viewer")
    configs = [C.ServiceConfig(service=f"imp-{i}", config=content(f"m{i}")) for i in range(3)]
    result = stub.ImportConfigs(C.ImportConfigsRequest(configs=configs), metadata=op)
    assert [c.service for c in result.written] == ["imp-0", "imp-1", "imp-2"]
    again = stub.ImportConfigs(C.ImportConfigsRequest(configs=configs), metadata=op)
    assert list(again.unchanged) == ["imp-0", "imp-1", "imp-2"] and not again.written
    bad = C.ServiceConfig(service="imp-9", config=content(""))
    err = failure(stub.ImportConfigs, C.ImportConfigsRequest(configs=[configs[0], bad]),
                  metadata=op)
    assert violations(err) == ["configs[1].model"]
    names, token = [], ""
    while True:
        page = stub.ListConfigs(C.ListConfigsRequest(page_size=2, page_token=token),
                                metadata=viewer)
        assert len(page.configs) <= 2
        names += [c.service for c in page.configs]
        token = page.next_page_token
        if not token:
            break
    exported = d.rest("GET", "/v1/config/export")[1]["configs"]
    assert names == sorted(c["service"] for c in exported) and "imp-9" not in names

