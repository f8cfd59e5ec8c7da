"""Reading, overriding and validating the config file.

``load_config`` is the single way in: TOML (or YAML for .yaml/.yml), then environment overrides
``LLM_OPTIMIZER__SECTION__KEY=value``, then schema and cross-key checks. Every failure is a
``ConfigError`` that names the key path, what was expected and the value found.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from ipc.config import (BUILTIN_SERVICES, LISTEN_PATTERN, Config, ExtraServiceSection,
                        ObservabilitySection, PriceOverride, ProcessorSection,
                        is_valid_service_name, split_listen)
from ipc.dependencies import DependencyCycleError, start_order
from ipc.endpoints import IPC_PATH_MAX, SOCKET_NAME_MAX, runtime_dir, socket_path

ENV_PREFIX = "LLM_OPTIMIZER__"
_MISSING = object()


class ConfigError(Exception):
    """An invalid configuration: ``key`` is the dotted key path (or file) at fault."""

    def __init__(self, key: str, problem: str, value: Any = _MISSING, source: str = ""):
        self.key, self.problem, self.value, self.source = key, problem, value, source
        text = f"{key}: {problem}" if key else problem
        if value is not _MISSING:
            text += f" (found {value!r})"
        if source:
            text += f" [{source}]"
        super().__init__(text)


def read_document(path: str) -> dict[str, Any]:
    """The raw mapping in a TOML or YAML file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file: {exc.strerror}", source=path) from exc
    if path.endswith((".yaml", ".yml")):
        import yaml  # only paid for by YAML users

        try:
            doc = yaml.safe_load(raw) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("", f"invalid YAML: {exc}", source=path) from exc
    else:
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("", f"invalid TOML: {exc}", source=path) from exc
    if not isinstance(doc, dict):
        raise ConfigError("", "expected a table of sections at the top level", source=path)
    return doc


def parse_env_value(text: str) -> Any:
    """An override's value as a TOML value when it is one (5, 0.5, true, ["a"]), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env_overrides(doc: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Set doc[section][...][key] from LLM_OPTIMIZER__SECTION__...__KEY; returns key -> variable."""
    applied = {}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX):].split("__")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(var, "expected LLM_OPTIMIZER__SECTION__KEY=value")
        table = doc
        for i, part in enumerate(parts[:-1]):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(".".join(parts[:i + 1]), "is not a table, cannot override a key "
                                  "inside it", source=var)
        table[parts[-1]] = parse_env_value(text)
        applied[".".join(parts)] = var
    return applied


def lookup(doc: Any, path: list[str | int]) -> Any:
    for part in path:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return doc


_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\['([^']*)'\]")


def _choices(path: list[str | int]) -> list[Any]:
    """The allowed values of the Literal-typed key at ``path`` of Config, else []."""
    annotation: Any = Config
    for part in path:
        while typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            annotation = typing.get_type_hints(annotation, include_extras=True).get(part)
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return list(typing.get_args(annotation)) if typing.get_origin(annotation) is Literal else []


def _decode_error(exc: msgspec.ValidationError, doc: dict[str, Any],
                  env_keys: dict[str, str], prefix: list[str | int] | None = None
                  ) -> ConfigError:
    """Turn msgspec's 'Expected `int`, got `str` - at `$.a.b`' into key path, problem, value.

    ``prefix`` is the path of the value that was validated on its own (msgspec leaves the keys
    of a mapping out of its paths, so a [services.NAME] table is validated by itself)."""
    message = str(exc)
    match = _MSGSPEC_PATH.search(message)
    path: list[str | int] = list(prefix or [])
    if match:
        message = message[:match.start()]
        for m in _PATH_PART.finditer(match.group("path")):
            path.append(m.group(1) if m.group(1) is not None else
                        int(m.group(2)) if m.group(2) is not None else m.group(3))
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        path.append(unknown.group(1))
        key = ".".join(str(p) for p in path)
        return ConfigError(key, "unknown key (see `optimizerd print-default-config`)",
                           source=env_keys.get(key, ""))
    key = ".".join(str(p) for p in path)
    problem = message[0].lower() + message[1:] if message else "invalid value"
    if repr(LISTEN_PATTERN) in problem:  # msgspec shows the pattern as a repr
        problem = 'expected "host:port", e.g. "127.0.0.1:8080"'
    elif problem.startswith("invalid enum value") and _choices(path):
        problem = "expected one of " + ", ".join(repr(c) for c in _choices(path))
    return ConfigError(key, problem.replace("`", ""), lookup(doc, path),
                       source=env_keys.get(key, ""))


def check_processor(section: ProcessorSection) -> None:
    """Window lengths that fit together, and canary stages that end in a full rollout."""
    if section.sliding_window_s % section.sliding_step_s:
        raise ConfigError("processor.sliding_window_s", "must be a multiple of "
                          f"processor.sliding_step_s ({section.sliding_step_s})",
                          section.sliding_window_s)
    if section.analysis_interval_s % section.tumbling_window_s:
        raise ConfigError("processor.analysis_interval_s", "must be a multiple of "
                          f"processor.tumbling_window_s ({section.tumbling_window_s})",
                          section.analysis_interval_s)
    stages = section.canary.stages
    if not stages or stages[-1] != 100 or any(b <= a for a, b in itertools.pairwise(stages)):
        raise ConfigError("processor.canary.stages", "must rise strictly and end at 100 "
                          "(percent of traffic)", stages)


# The modules workers.tracing imports when tracing is on, and the distributions holding them.
TRACING_MODULES = {"opentelemetry.sdk": "opentelemetry-sdk",
                   "opentelemetry.exporter.otlp.proto.http":
                       "opentelemetry-exporter-otlp-proto-http"}


def check_observability(section: ObservabilitySection) -> None:
    """Tracing on needs its optional packages: refused at start rather than in every worker.

    ``find_spec`` of these names imports only namespace packages: no OpenTelemetry code runs."""
    if not section.otlp_endpoint:
        return
    missing = [dist for module, dist in TRACING_MODULES.items() if not _importable(module)]
    if missing:
        raise ConfigError("observability.otlp_endpoint", "tracing needs " + ", ".join(missing)
                          + " (pip install 'llm-auto-optimizer[tracing]'), or leave it empty",
                          section.otlp_endpoint)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def check_semantics(config: Config) -> None:
    """Checks that span keys: names, references, cycles, ports, timing relations."""
    sup = config.supervisor
    if sup.heartbeat_timeout <= sup.heartbeat_interval:
        raise ConfigError("supervisor.heartbeat_timeout", "must be greater than "
                          f"supervisor.heartbeat_interval ({sup.heartbeat_interval})",
                          sup.heartbeat_timeout)
    runtime = runtime_dir(config)
    if len(socket_path(runtime, "x" * SOCKET_NAME_MAX).encode()) > IPC_PATH_MAX:
        raise ConfigError("supervisor.runtime_dir", "too long to hold sockets: a socket path "
                          f"has at most {IPC_PATH_MAX} bytes", runtime)
    if config.storage.processes != 1:
        raise ConfigError("storage.processes", "must be 1: the storage service is the single "
                          "owner (and writer) of the store", config.storage.processes)
    if config.storage.backend == "postgres" and not config.storage.postgres_dsn:
        raise ConfigError("storage.postgres_dsn", "required with backend = \"postgres\"; set it "
                          "in LLM_OPTIMIZER__STORAGE__POSTGRES_DSN to keep secrets out of the file")
    if sup.backoff_max < sup.backoff_base:
        raise ConfigError("supervisor.backoff_max", "must be at least supervisor.backoff_base "
                          f"({sup.backoff_base})", sup.backoff_max)
    check_processor(config.processor)
    check_observability(config.observability)
    for name in config.services:
        if name in BUILTIN_SERVICES or not is_valid_service_name(name):
            raise ConfigError(f"services.{name}", "service names are lowercase letters, digits "
                              "and _, at most 32, and not one of the built-in services", name)
        if not config.services[name].entrypoint:
            raise ConfigError(f"services.{name}.entrypoint", "required for an extra service")
    sections = config.service_sections()
    enabled = config.enabled_services()
    for name, section in sections.items():
        where = name if name in BUILTIN_SERVICES else f"services.{name}"
        for i, dep in enumerate(section.depends_on):
            if dep not in sections:
                raise ConfigError(f"{where}.depends_on[{i}]", "no such service", dep)
            if section.enabled and dep not in enabled:
                raise ConfigError(f"{where}.depends_on[{i}]", "depends on a disabled service; "
                                  f"enable it or disable {name}", dep)
        for key in ("listen", "otlp_grpc_listen"):
            value = getattr(section, key, None)
            if value is not None and not 0 < split_listen(value)[1] < 65536:
                raise ConfigError(f"{where}.{key}", "port must be 1-65535", value)
    if not 0 < split_listen(config.admin.listen)[1] < 65536:
        raise ConfigError("admin.listen", "port must be 1-65535", config.admin.listen)
    try:
        start_order({n: s.depends_on for n, s in enabled.items()})
    except DependencyCycleError as exc:
        raise ConfigError(f"{exc.cycle[0]}.depends_on", str(exc)) from None


def config_from_document(doc: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    env_keys = apply_env_overrides(doc, os.environ if environ is None else environ)
    services = doc.get("services")
    if isinstance(services, dict):
        for name, table in services.items():
            try:
                msgspec.convert(table, ExtraServiceSection)
            except msgspec.ValidationError as exc:
                raise _decode_error(exc, doc, env_keys, ["services", name]) from None
    prices = lookup(doc, ["collector", "prices"])
    if isinstance(prices, dict):
        for model, table in prices.items():
            try:
                msgspec.convert(table, PriceOverride)
            except msgspec.ValidationError as exc:
                raise _decode_error(exc, doc, env_keys, ["collector", "prices", model]) \
                    from None
    try:
        config = msgspec.convert(doc, Config)
    except msgspec.ValidationError as exc:
        raise _decode_error(exc, doc, env_keys) from None
    check_semantics(config)
    return config


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """The validated Config from ``path`` (None: built-in defaults) and the environment."""
    doc = read_document(path) if path else {}
    try:
        return config_from_document(doc, environ)
    except ConfigError as exc:
        if path and not exc.source:
            exc.source = path
            exc.args = (f"{exc.args[0]} [{path}]",)
        raise


def config_hash(config: Config) -> str:
    """A short stable digest of the effective config, shown by status."""
    return hashlib.sha256(msgspec.json.encode(config, order="sorted")).hexdigest()[:12]
