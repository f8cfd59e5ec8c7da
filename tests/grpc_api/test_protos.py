"""The gRPC API's contract: the generated modules match the protos, and every service, RPC and
legacy message field the API promises is in the descriptors with the right streaming kind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from protos.llm_optimizer.v1 import (admin_pb2, config_pb2, health_pb2, integrations_pb2,
                                     metrics_pb2, optimization_pb2)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "llm_optimizer.v1"
UNARY, SERVER, CLIENT, BIDI = "unary", "server", "client", "bidi"

# service -> module, {method: streaming kind}
SERVICES = {
    "OptimizationService": (optimization_pb2, {
        "CreateOptimization": UNARY, "GetOptimization": UNARY, "ListOptimizations": UNARY,
        "DeployOptimization": UNARY, "RollbackOptimization": UNARY,
        "CancelOptimization": UNARY, "ValidateOptimization": UNARY,
        "SubscribeOptimizationEvents": SERVER, "BatchCreateOptimizations": CLIENT,
        "OptimizationSession": BIDI}),
    "ConfigService": (config_pb2, {
        "CreateConfig": UNARY, "GetConfig": UNARY, "ListConfigs": UNARY,
        "UpdateConfig": UNARY, "DeleteConfig": UNARY, "ListConfigVersions": UNARY,
        "DiffConfigVersions": UNARY, "RollbackConfig": UNARY, "ImportConfigs": UNARY,
        "ExportConfigs": UNARY, "WatchConfig": SERVER, "BatchUpdateConfig": CLIENT}),
    "MetricsService": (metrics_pb2, {
        "QueryMetrics": UNARY, "GetAnalytics": UNARY, "ExportMetrics": UNARY,
        "SubscribeMetrics": SERVER, "SubscribeCost": SERVER, "SubscribeAlerts": SERVER,
        "RecordMetrics": CLIENT}),
    "IntegrationService": (integrations_pb2, {
        "CreateIntegration": UNARY, "GetIntegration": UNARY, "ListIntegrations": UNARY,
        "UpdateIntegration": UNARY, "DeleteIntegration": UNARY, "TestIntegration": UNARY,
        "GetIntegrationHealth": UNARY, "SubscribeIntegrationEvents": SERVER}),
    "HealthService": (health_pb2, {
        "Health": UNARY, "Readiness": UNARY, "Liveness": UNARY, "Watch": SERVER}),
    "AdminService": (admin_pb2, {
        "GetSystemStats": UNARY, "GetStorageStats": UNARY, "RunStorageMaintenance": UNARY,
        "ListFeatureFlags": UNARY, "GetFeatureFlag": UNARY, "SetFeatureFlag": UNARY,
        "StartJob": UNARY, "ListJobs": UNARY, "GetJob": UNARY, "CancelJob": UNARY,
        "SubscribeSystemEvents": SERVER}),
}


def kind(method) -> str:
    return {(False, False): UNARY, (False, True): SERVER, (True, False): CLIENT,
            (True, True): BIDI}[(method.client_streaming, method.server_streaming)]


def test_generated_modules_are_not_stale():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_methods_and_streaming_kinds(service):
    module, methods = SERVICES[service]
    descriptor = module.DESCRIPTOR.services_by_name[service]
    assert descriptor.full_name == f"{PACKAGE}.{service}"
    assert module.DESCRIPTOR.name == f"llm_optimizer/v1/{Path(module.__file__).stem[:-4]}.proto"
    got = {m.name: kind(m) for m in descriptor.methods}
    for name, want in methods.items():
        assert name in got, f"{service}.{name} is missing"
        assert got[name] == want, f"{service}.{name} is {got[name]}, expected {want}"


def test_standard_health_service_is_available():
    from grpc_health.v1 import health_pb2 as std_health

    methods = {m.name: kind(m) for m in
               std_health.DESCRIPTOR.services_by_name["Health"].methods}
    assert methods["Check"] == UNARY and methods["Watch"] == SERVER


def test_generated_stubs_import_without_a_path_trick():
    from protos.llm_optimizer.v1 import optimization_pb2_grpc

    assert hasattr(optimization_pb2_grpc, "OptimizationServiceStub")
    assert hasattr(optimization_pb2_grpc, "add_OptimizationServiceServicer_to_server")


def test_create_optimization_request_keeps_the_legacy_fields():
    fields = optimization_pb2.CreateOptimizationRequest.DESCRIPTOR.fields_by_name
    assert fields["strategy"].enum_type.full_name == f"{PACKAGE}.OptimizationStrategy"
    assert "OPTIMIZATION_STRATEGY_COST_PERFORMANCE_SCORING" in \
        optimization_pb2.OptimizationStrategy.keys()
    assert fields["target_services"].is_repeated
    assert fields["target_services"].type == FieldDescriptor.TYPE_STRING
    assert fields["changes"].is_repeated
    assert fields["changes"].message_type.full_name == f"{PACKAGE}.ConfigurationChange"
    change = fields["changes"].message_type.fields_by_name
    for name in ("parameter", "old_value", "new_value", "change_type"):
        assert name in change, name
    assert change["change_type"].enum_type is not None
    assert fields["rationale"].type == FieldDescriptor.TYPE_STRING
    impact = fields["expected_impact"].message_type.fields_by_name
    for name in ("cost_reduction_pct", "quality_delta_pct", "latency_delta_pct", "confidence"):
        assert impact[name].type == FieldDescriptor.TYPE_DOUBLE, name
    assert "constraints" in fields
    assert fields["auto_deploy"].type == FieldDescriptor.TYPE_BOOL


def test_session_messages():
    request = optimization_pb2.SessionRequest.DESCRIPTOR
    response = optimization_pb2.SessionResponse.DESCRIPTOR
    assert {f.name for f in request.oneofs_by_name["kind"].fields} == {"query", "feedback"}
    assert {"suggestion", "complete"} <= {f.name for f in response.oneofs_by_name["kind"].fields}
    assert "SUGGESTION_SOURCE_ANTHROPIC" in optimization_pb2.SuggestionSource.keys()


def test_admin_feature_flags_and_jobs():
    flag = admin_pb2.FeatureFlag.DESCRIPTOR.fields_by_name
    assert set(flag) == {"name", "enabled", "description", "updated_by", "update_time"}
    job = admin_pb2.Job.DESCRIPTOR.fields_by_name
    assert set(job) == {"id", "kind", "args", "by", "state", "message", "result",
                        "create_time", "start_time", "finish_time"}
    assert job["args"].message_type.full_name == "google.protobuf.Struct"
    states = {name.removeprefix("JOB_STATE_") for name in admin_pb2.JobState.keys()}
    assert states == {"UNSPECIFIED", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED",
                      "INTERRUPTED"}


def test_every_enum_starts_with_unspecified():
    def enums(container):
        yield from container.enum_types_by_name.values()
        for message in container.message_types_by_name.values():
            yield from enums_of_message(message)

    def enums_of_message(message):
        yield from message.enum_types
        for nested in message.nested_types:
            yield from enums_of_message(nested)

    for module in (admin_pb2, config_pb2, health_pb2, integrations_pb2, metrics_pb2,
                   optimization_pb2):
        for enum in enums(module.DESCRIPTOR):
            zero = enum.values_by_number[0].name
            assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name}: {zero}"
