"""The Kubernetes manifests (etc/kubernetes) and the Helm chart (etc/helm/llm-optimizer).

Validated with real tools: kubernetes-validate (strict JSON schemas of the Kubernetes API) on
every plain manifest and on the chart as rendered by Helm's own Go SDK (helm-python-sdk binds
libhelm_c, Helm v4's Go packages: the same template engine, Sprig functions and `fail` as the
helm CLI), yamllint on the hand-written YAML, and the project's own config loader on every
optimizer.toml they carry. The probe paths are asked of a real optimizerd run on the plain
ConfigMap (and on the chart's ingest config over a real PostgreSQL), and the migration command
runs against a real PostgreSQL.

Tools: pip install kubernetes-validate yamllint helm-python-sdk. Missing: a skip, or a failure
with CI=true.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from ipc.config import Config, split_listen
from ipc.config_loader import config_from_document
from tests.conftest import Daemon, free_port, http_get, wait_until

from .tools import missing, tool

ROOT = Path(__file__).resolve().parents[2]
PLAIN_DIR = ROOT / "etc" / "kubernetes"
CHART = ROOT / "etc" / "helm" / "llm-optimizer"
PLAIN_FILES = sorted(p for p in PLAIN_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest that
# kubernetes-validate ships schemas for.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
YAMLLINT_CONFIG = ("{extends: default, rules: {line-length: {max: 100}, "
                   "document-start: disable}}")
RELEASE = "llm-optimizer"
ENV_KEY = re.compile(r"LLM_OPTIMIZER__[A-Za-z0-9_.]+")
DEFAULTS = Config()

EXTERNAL = {
    "storage": {"backend": "postgres", "postgres": {"existingSecret": "pg"}},
    "redis": {"enabled": True, "existingSecret": "redis"},
    "kafka": {"bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092",
              "clientOptions": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"},
              "eventLog": {"enabled": True}, "collector": {"enabled": True}},
    "ingest": {"enabled": True, "replicas": 3},
    "ingress": {"http": {"enabled": True, "tlsSecretName": "api-tls"},
                "grpc": {"enabled": True, "tlsSecretName": "grpc-tls"}},
    "envSecret": {"values": {
        "LLM_OPTIMIZER__INTEGRATIONS__SLACK__WEBHOOK_URL": "https://hooks.slack.com/s/x",
        "LLM_OPTIMIZER__EVENT_LOG__KAFKA_CLIENT_OPTIONS__SASL.PASSWORD": "pw"}},
    "config": {"processor": {"decisions": {"auto_deploy": True}},
               "rest_api": {"processes": 2, "cors_origins": ["https://console.example.com"]},
               "supervisor": {"heartbeat_interval": 1}},
}
AUTOSCALED = {**EXTERNAL, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}}


# --- tools ---------------------------------------------------------------------------------

HINT = "pip install kubernetes-validate yamllint helm-python-sdk"


def helm() -> Any:
    try:
        return importlib.import_module("helm_python")
    except ImportError:
        missing(f"helm-python-sdk (Helm's Go SDK as a library) is not installed ({HINT})")


def kubernetes_validate(paths: list[str], version: str) -> None:
    done = subprocess.run([tool("kubernetes-validate", HINT), "--strict", "-k", version,
                           *paths], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"kubernetes-validate {version}:\n{done.stdout}{done.stderr}"
    # Every document was checked: one "passed" line per resource.
    assert done.stdout.count(" passed for resource ") >= len(paths), done.stdout


# --- loading -------------------------------------------------------------------------------

def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def plain() -> list[dict[str, Any]]:
    docs = []
    for path in PLAIN_FILES:
        docs += load_docs(path.read_text())
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: found {len(found)}"
    return found[0]


def render(values: dict[str, Any]) -> dict[str, str]:
    """template path -> rendered text, by Helm's Go SDK, offline."""
    h = helm()
    with h.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=RELEASE, is_install=True)


def rendered_docs(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(render(values).items()):
        if path.endswith(".yaml"):
            docs += load_docs(text)
    return docs


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


def toml_of(configmap: dict[str, Any]) -> dict[str, Any]:
    return tomllib.loads(configmap["data"]["optimizer.toml"])


def env_keys_in(text: str) -> set[str]:
    return set(ENV_KEY.findall(text))


# --- plain manifests -------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_plain_manifests_pass_kubernetes_validate(version: str) -> None:
    kubernetes_validate([str(p) for p in PLAIN_FILES], version)


def test_yamllint_on_manifests_and_values() -> None:
    paths = [str(PLAIN_DIR), str(CHART / "values.yaml"), str(CHART / "Chart.yaml")]
    done = subprocess.run([tool("yamllint", HINT), "-s", "-d", YAMLLINT_CONFIG, *paths],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kustomization_applies_every_manifest_but_the_postgres_job() -> None:
    kustomization = yaml.safe_load((PLAIN_DIR / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "llm-optimizer"
    expected = {p.name for p in PLAIN_FILES} - {"migrate-job.yaml"}
    assert sorted(kustomization["resources"]) == sorted(expected)
    for doc in plain():
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "llm-optimizer"


def test_plain_deployment_is_one_hardened_replica() -> None:
    docs = plain()
    deploy = find(docs, "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = container(deploy)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["image"] == f"ghcr.io/llm-optimizer/optimizerd:{project_version()}"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in c
    assert c["resources"]["requests"] and c["resources"]["limits"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "persistentVolumeClaim" in volumes[mounts["/var/lib/llm-optimizer"]]
    config = toml_of(find(docs, "ConfigMap"))
    # runtime_dir inside an emptyDir, data_dir on the claim.
    assert "emptyDir" in volumes[mounts[os.path.dirname(config["supervisor"]["runtime_dir"])]]
    assert config["supervisor"]["data_dir"].startswith("/var/lib/llm-optimizer/")
    assert find(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole")]


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_chart_versions_follow_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project_version()


# --- consistency with the config ---------------------------------------------------------------

PORT_KEYS = {  # container port name -> the config key serving it
    "http": ("rest_api", "listen"),
    "grpc": ("grpc_api", "listen"),
    "metrics": ("admin", "listen"),
    "otlp-http": ("collector", "listen"),
    "otlp-grpc": ("collector", "otlp_grpc_listen"),
}


def default_port(section: str, key: str) -> int:
    return split_listen(getattr(getattr(DEFAULTS, section), key))[1]


def check_ports(deploy: dict[str, Any], config: Config) -> None:
    """Container ports are the config's ports (on every interface) and the defaults'."""
    c = container(deploy)
    for port in c["ports"]:
        section, key = PORT_KEYS[port["name"]]
        host, number = split_listen(getattr(getattr(config, section), key))
        assert host == "0.0.0.0", f"{section}.{key} listens on {host}, not reachable"
        assert number == port["containerPort"] == default_port(section, key), port


def check_env_agrees(deploy: dict[str, Any], configmap: dict[str, Any]) -> None:
    """A plain value in the container's env equals the ConfigMap's value of that key."""
    doc = toml_of(configmap)
    for item in container(deploy)["env"]:
        if "value" not in item or not item["name"].startswith("LLM_OPTIMIZER__"):
            continue
        node: Any = doc
        for part in item["name"][len("LLM_OPTIMIZER__"):].lower().split("__"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        assert node == item["value"], f"{item['name']}={item['value']} vs the file's {node!r}"


def sample_env(container_spec: dict[str, Any], secret_keys: set[str]) -> dict[str, str]:
    """The LLM_OPTIMIZER__ environment of a container, secrets given sample values."""
    env = {}
    for item in container_spec.get("env", []):
        if item["name"].startswith("LLM_OPTIMIZER__"):
            env[item["name"]] = item.get("value", sample_value(item["name"]))
    env.update({k: sample_value(k) for k in secret_keys})
    return env


def sample_value(key: str) -> str:
    if key.endswith(("POSTGRES_DSN",)):
        return "postgresql://optimizer:pw@postgres:5432/optimizer"
    if key.endswith(("REDIS_URL", "RATE_LIMIT_STORAGE")):
        return "redis://:pw@redis:6379/0"
    if key.endswith("LISTEN"):
        return "0.0.0.0:8000"
    if key.endswith("_DIR"):
        return "/tmp/llm-optimizer-test"
    if key.endswith("WEBHOOK_URL"):
        return "https://hooks.slack.com/services/T0/B0/x"
    return "secret-value"


def load_with_env(configmap: dict[str, Any], env: dict[str, str]) -> Config:
    return config_from_document(toml_of(configmap), environ=env)


def test_plain_config_and_ports_match_the_config_defaults() -> None:
    docs = plain()
    secret = find(docs, "Secret")
    deploy = find(docs, "Deployment")
    # The Secret's empty placeholders, as they are, and filled in: both load.
    load_with_env(find(docs, "ConfigMap"), dict(secret["stringData"]))
    config = load_with_env(find(docs, "ConfigMap"),
                           sample_env(container(deploy), set(secret["stringData"])))
    check_ports(deploy, config)
    check_env_agrees(deploy, find(docs, "ConfigMap"))
    services = [d for d in docs if d["kind"] == "Service"]
    names = {p["name"]: p["containerPort"] for p in container(deploy)["ports"]}
    for service in services:
        for port in service["spec"]["ports"]:
            assert port["port"] == names[port["targetPort"]], port
    grpc_ports = [p for s in services for p in s["spec"]["ports"] if "grpc" in p["name"]]
    assert grpc_ports and all(p["appProtocol"] == "grpc" for p in grpc_ports)
    grpc_ingress = find(docs, "Ingress", "llm-optimizer-grpc")
    assert grpc_ingress["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    policy = find(docs, "NetworkPolicy")
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert open_ports == set(names.values())
    metrics_rule = next(r for r in policy["spec"]["ingress"] if "from" in r)
    assert [p["port"] for p in metrics_rule["ports"]] == [default_port("admin", "listen")]


def config_key_exists(var: str) -> bool:
    """LLM_OPTIMIZER__A__B__C names a key of the config schema (or an entry of a free-form
    table such as kafka_client_options), and the loader takes it."""
    node: Any = msgspec.to_builtins(DEFAULTS)
    for part in var[len("LLM_OPTIMIZER__"):].lower().split("__"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and not node:
            break  # a free-form table: any entry
        else:
            return False
    config_from_document({}, environ={var: sample_value(var)})
    return True


def test_every_env_key_in_manifests_and_chart_is_a_config_key() -> None:
    keys = set()
    for path in PLAIN_FILES:
        keys |= env_keys_in(path.read_text())
    for path in glob.glob(str(CHART / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            keys |= env_keys_in(Path(path).read_text())
    for values in ({}, EXTERNAL):
        for text in render(values).values():
            keys |= env_keys_in(text)
    assert "LLM_OPTIMIZER__STORAGE__POSTGRES_DSN" in keys
    keys.discard("LLM_OPTIMIZER__SECTION__KEY")  # the pattern itself, in comments
    unknown = sorted(k for k in keys if not config_key_exists(k))
    assert not unknown, f"not config keys: {unknown}"


# --- the chart ---------------------------------------------------------------------------------

def test_helm_lint_finds_nothing() -> None:
    h = helm()
    for values in ({}, EXTERNAL):
        report = h.lint(str(CHART), values, strict=True, namespace=RELEASE)
        assert not report["errors"], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems, problems


@pytest.mark.parametrize("profile", ["default", "external", "autoscaled"])
def test_rendered_chart_passes_kubernetes_validate(profile: str, tmp_path: Path) -> None:
    values = {"default": {}, "external": EXTERNAL, "autoscaled": AUTOSCALED}[profile]
    paths = []
    for name, text in sorted(render(values).items()):
        if name.endswith(".yaml") and load_docs(text):
            path = tmp_path / name.replace("/", "_")
            path.write_text(text)
            paths.append(str(path))
    for version in KUBE_VERSIONS:
        kubernetes_validate(paths, version)


def test_default_chart_produces_the_plain_objects() -> None:
    chart, docs = rendered_docs({}), plain()
    skip = {"Namespace", "Secret", "Job", "Ingress"}  # namespace: Helm's; the others opt-in
    expected = sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] not in skip)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in chart) == expected
    assert toml_of(find(chart, "ConfigMap")) == toml_of(find(docs, "ConfigMap"))
    mine, theirs = container(find(chart, "Deployment")), container(find(docs, "Deployment"))
    for key in ("command", "args", "ports", "startupProbe", "livenessProbe", "readinessProbe",
                "securityContext", "volumeMounts", "resources"):
        assert mine[key] == theirs[key], key
    pod, plain_pod = (find(chart, "Deployment")["spec"]["template"]["spec"],
                      find(docs, "Deployment")["spec"]["template"]["spec"])
    assert pod["securityContext"] == plain_pod["securityContext"]
    assert [v["name"] for v in pod["volumes"]] == [v["name"] for v in plain_pod["volumes"]]
    for kind in ("Service", "PodDisruptionBudget"):
        for doc in [d for d in docs if d["kind"] == kind]:
            assert find(chart, kind, doc["metadata"]["name"])["spec"] == doc["spec"], kind
    # The plain policy also opens PostgreSQL, Redis and Kafka (for a ConfigMap switched to
    # them); the chart opens those only when its values use them.
    policy, plain_policy = find(chart, "NetworkPolicy")["spec"], find(docs, "NetworkPolicy")["spec"]
    assert {**policy, "egress": None} == {**plain_policy, "egress": None}
    assert all(rule in plain_policy["egress"] for rule in policy["egress"])


def test_external_profile_scales_ingest_and_keeps_one_processor() -> None:
    docs = rendered_docs(EXTERNAL)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    primary = find(docs, "Deployment", RELEASE)
    ingest = find(docs, "Deployment", f"{RELEASE}-ingest")
    assert primary["spec"]["replicas"] == 1 and primary["spec"]["strategy"]["type"] == "Recreate"
    assert ingest["spec"]["replicas"] == 3
    for deploy in (primary, ingest):
        volumes = deploy["spec"]["template"]["spec"]["volumes"]
        assert not [v for v in volumes if "persistentVolumeClaim" in v]
        (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
        assert init["name"] == "migrate"
    env = {"LLM_OPTIMIZER__STORAGE__POSTGRES_DSN": sample_value("_POSTGRES_DSN")}
    configs = {}
    for deploy, name in ((primary, f"{RELEASE}-config"), (ingest, f"{RELEASE}-ingest-config")):
        volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == name
        configs[name] = load_with_env(find(docs, "ConfigMap", name),
                                      {**sample_env(container(deploy), set()), **env})
        check_ports(deploy, configs[name])
        check_env_agrees(deploy, find(docs, "ConfigMap", name))
    one, many = configs[f"{RELEASE}-config"], configs[f"{RELEASE}-ingest-config"]
    assert set(one.enabled_services()) == {"storage", "collector", "processor", "rest_api",
                                           "grpc_api", "integrations"}
    assert set(many.enabled_services()) == {"storage", "collector"}
    # One consumer group for every collector, one event log, one database.
    for config in (one, many):
        assert config.collector.kafka.enabled
        assert config.storage.backend == "postgres" and config.event_log.backend == "kafka"
    assert one.collector.kafka == many.collector.kafka
    assert one.collector.kafka.group_id == "llm-optimizer-collector"
    assert one.event_log == many.event_log
    assert one.event_log.kafka_client_options == {"security.protocol": "SASL_SSL",
                                                  "sasl.mechanism": "PLAIN"}
    # values.config is merged in, with its integers still integers.
    assert one.processor.decisions.auto_deploy is True and one.rest_api.processes == 2
    assert one.rest_api.cors_origins == ["https://console.example.com"]
    assert one.rest_api.listen == "0.0.0.0:8080"
    collector = find(docs, "Service", f"{RELEASE}-collector")
    assert "app.kubernetes.io/component" not in collector["spec"]["selector"]
    api = find(docs, "Service", RELEASE)
    assert api["spec"]["selector"]["app.kubernetes.io/component"] == "primary"
    egress = {p["port"] for r in find(docs, "NetworkPolicy")["spec"]["egress"]
              for p in r.get("ports", [])}
    assert {5432, 6379, 9092, 443, 53} <= egress


def test_autoscaling_targets_the_ingest_deployment() -> None:
    docs = rendered_docs(AUTOSCALED)
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"{RELEASE}-ingest"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in find(docs, "Deployment", f"{RELEASE}-ingest")["spec"]
    assert not [d for d in rendered_docs({}) if d["kind"] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize("values, words", [
    ({"replicaCount": 3}, ["replicaCount=3", "embedded", "ReadWriteOnce"]),
    ({**EXTERNAL, "replicaCount": 2}, ["replicaCount=2", "processor", "checkpoint"]),
    ({"ingest": {"enabled": True}}, ["ingest.enabled", "postgres"]),
    ({"autoscaling": {"enabled": True}}, ["autoscaling", "ingest.enabled"]),
    ({"storage": {"backend": "postgres"}}, ["existingSecret"]),
    ({"kafka": {"eventLog": {"enabled": True}}}, ["bootstrapServers"]),
    ({"envSecret": {"values": {"SLACK_URL": "x"}}}, ["SLACK_URL"]),
])
def test_chart_refuses_values_that_cannot_work(values: dict[str, Any], words: list[str]
                                               ) -> None:
    h = helm()
    with pytest.raises(h.HelmError) as refused:
        render(values)
    for word in words:
        assert word in str(refused.value), str(refused.value)


def test_migration_command_is_the_same_everywhere() -> None:
    job = find(plain(), "Job")
    plain_command = container(job)["command"]
    for deploy in [d for d in rendered_docs(EXTERNAL) if d["kind"] == "Deployment"]:
        (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == plain_command


# --- against real processes --------------------------------------------------------------------

def probe_paths(deploy: dict[str, Any]) -> list[tuple[str, str]]:
    c = container(deploy)
    return [(c[p]["httpGet"]["port"], c[p]["httpGet"]["path"])
            for p in ("startupProbe", "livenessProbe", "readinessProbe")]


def run_daemon(toml_text: str, env: dict[str, str]) -> tuple[Daemon, dict[str, int]]:
    """optimizerd on a manifest's config; paths and ports moved to a temp dir and free ports
    on 127.0.0.1 through the environment, the way a pod's env would override them."""
    daemon = Daemon()
    daemon.write_config(text=toml_text)
    ports = {name: free_port() for name in PORT_KEYS}
    ports["metrics"] = daemon.admin_port
    daemon.env.update(env)
    daemon.env.update({"LLM_OPTIMIZER__SUPERVISOR__RUNTIME_DIR": daemon.runtime,
                       "LLM_OPTIMIZER__SUPERVISOR__DATA_DIR": daemon.data})
    for name, (section, key) in PORT_KEYS.items():
        daemon.env[f"LLM_OPTIMIZER__{section.upper()}__{key.upper()}"] = \
            f"127.0.0.1:{ports[name]}"
    return daemon, ports


def check_probes(daemon: Daemon, deploy: dict[str, Any], ports: dict[str, int]) -> None:
    for port, path in probe_paths(deploy):
        url = f"http://127.0.0.1:{ports[port]}{path}"
        wait_until(lambda u=url: http_get(u)[0] == 200, 30,
                   message=lambda u=url: f"{u} answered {http_get(u)}\n{daemon.tail()}")


def test_probes_answer_on_optimizerd_run_with_the_plain_configmap() -> None:
    docs = plain()
    deploy = find(docs, "Deployment")
    daemon, ports = run_daemon(find(docs, "ConfigMap")["data"]["optimizer.toml"],
                               dict(find(docs, "Secret")["stringData"]))
    try:
        daemon.start(timeout=90)
        check_probes(daemon, deploy, ports)
    finally:
        daemon.cleanup()


@pytest.fixture
def pg_database():
    from tests.storage.pg_cluster import make_cluster, pg_bindir

    bindir = pg_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) not installed")
    cluster = make_cluster(bindir)
    try:
        yield cluster, cluster.create_database()
    finally:
        cluster.destroy()


def test_chart_postgres_profile_migrates_and_serves_on_real_postgresql(pg_database,
                                                                      tmp_path: Path) -> None:
    cluster, db = pg_database
    dsn = cluster.dsn(db)
    values = {**EXTERNAL, "kafka": {}, "redis": {}}  # PostgreSQL only: no Kafka here
    docs = rendered_docs(values)
    primary = find(docs, "Deployment", RELEASE)
    (init,) = primary["spec"]["template"]["spec"]["initContainers"]
    config_file = tmp_path / "optimizer.toml"
    config_file.write_text(find(docs, "ConfigMap", f"{RELEASE}-config")["data"]
                           ["optimizer.toml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_OPTIMIZER")}
    env["LLM_OPTIMIZER__STORAGE__POSTGRES_DSN"] = dsn
    python, flag, script, _ = init["command"]
    assert (python, flag) == ("python3", "-c")
    for _ in range(2):  # idempotent
        done = subprocess.run([sys.executable, "-c", script, str(config_file)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "PostgreSQL schema at version 1" in done.stdout
    assert cluster.admin("SELECT version FROM schema_migrations", db) == [(1,)]
    # The same command on the embedded profile refuses: nothing to migrate there.
    embedded = tmp_path / "embedded.toml"
    embedded.write_text(find(plain(), "ConfigMap")["data"]["optimizer.toml"])
    done = subprocess.run([sys.executable, "-c", script, str(embedded)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "nothing to migrate" in done.stderr
    # An ingest pod's config runs (storage over PostgreSQL and the collector alone) and
    # answers its probes.
    ingest = find(docs, "Deployment", f"{RELEASE}-ingest")
    daemon, ports = run_daemon(find(docs, "ConfigMap", f"{RELEASE}-ingest-config")
                               ["data"]["optimizer.toml"],
                               {"LLM_OPTIMIZER__STORAGE__POSTGRES_DSN": dsn})
    try:
        daemon.start(timeout=90)
        check_probes(daemon, ingest, ports)
        names = {s["name"] for s in daemon.status()["services"]}
        assert names == {"storage", "collector"}
    finally:
        daemon.cleanup()
