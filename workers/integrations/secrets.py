"""Secrets of the integrations: a value from the environment (``LLM_OPTIMIZER__...`` overrides
reach the config like any key) or from a file named by the ``*_file`` key. They are never logged,
shown in status or answered by the API: ``workers.integrations.http.redact`` takes them out of
error texts, and ``shown`` is what status shows instead."""
from __future__ import annotations

from pathlib import Path


class SecretError(ValueError):
    pass


def read_secret(key_path: str, value: str, file: str) -> str:
    """The secret of ``key_path`` (e.g. ``integrations.jira.api_token``): ``value`` if set,
    else the first line of ``file``; empty when neither is set."""
    if value and file:
        raise SecretError(f"{key_path}: set it or {key_path}_file, not both")
    if not file:
        return value
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretError(f"{key_path}_file = {file!r}: {exc.strerror}") from None
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise SecretError(f"{key_path}_file = {file!r} is empty")
    return secret


def shown(secret: str) -> str:
    """How a secret appears in status and API answers: whether it is set, nothing more."""
    return "set" if secret else "not set"
