"""The annotated default configuration, as printed by ``optimizerd print-default-config``.

Written with tomli-w from the schema itself, one commented key at a time, so that the text can
never drift from what ``check-config`` accepts.
"""
from __future__ import annotations

import typing

import msgspec
import tomli_w

from ipc.config import Config

HEADER = """\
# LLM Auto Optimizer configuration (optimizerd).
# Every key has the default shown; delete what you do not change.
# Any key can be overridden from the environment: LLM_OPTIMIZER__SECTION__KEY=value
# (e.g. LLM_OPTIMIZER__REST_API__LISTEN=0.0.0.0:8080). Secrets belong there or in files.
"""


def _description(annotation: typing.Any) -> str:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, msgspec.Meta) and meta.description:
            return meta.description
    return ""


def _field_docs(cls: type) -> dict[str, str]:
    """Descriptions of a Struct's fields, inherited ones included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        for name, annotation in typing.get_type_hints(klass, include_extras=True).items():
            if _description(annotation):
                docs[name] = _description(annotation)
    return docs


def _render_key(key: str, value: typing.Any) -> str:
    """One ``key = value`` line; a table value is written inline so it stays in its section."""
    if isinstance(value, dict):
        inner = ", ".join(_render_key(k, v) for k, v in value.items())
        return f"{key} = {{ {inner} }}" if inner else f"{key} = {{}}"
    return tomli_w.dumps({key: value}).rstrip("\n")


def _render_section(name: str, section: msgspec.Struct) -> list[str]:
    docs = _field_docs(type(section))
    lines = [f"[{name}]"]
    inherited = []
    tables = []  # nested sections, as [name.key] tables after this section's own keys
    for key in section.__struct_fields__:
        value = getattr(section, key)
        if value is None:  # TOML has no null: an unset override is left out
            inherited.append(key)
            continue
        if isinstance(value, msgspec.Struct):
            tables.append(([f"# {docs[key]}"] if docs.get(key) else [])
                          + _render_section(f"{name}.{key}", value))
            continue
        if docs.get(key):
            lines.append(f"# {docs[key]}")
        lines.append(_render_key(key, value))
    if inherited:
        lines.append("# Unset here, so taken from [supervisor]: " + ", ".join(inherited))
    for table in tables:
        lines += ["", *table]
    return lines


def render_default_config() -> str:
    config = Config()
    parts = [HEADER]
    for name in config.__struct_fields__:
        value = getattr(config, name)
        if isinstance(value, msgspec.Struct):
            parts.append("\n".join(_render_section(name, value)) + "\n")
    parts.append("# " + _field_docs(Config)["services"] + " For example:\n"
                 "# [services.reporter]\n# entrypoint = \"mypackage.reporter:ReporterWorker\"\n"
                 "# depends_on = [\"storage\"]\n# settings = { interval = 60 }\n")
    return "\n".join(parts)
