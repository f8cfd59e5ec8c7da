"""Prompt fingerprints from span content: a hash that lets the processor count repeated
prompts (the caching opportunity) without the optimizer keeping any prompt text.

Content is looked for where instrumentations put it (first found wins):

- ``gen_ai.input.messages`` (semconv >= 1.37: the chat history, a JSON string or a structured
  value), with ``gen_ai.system_instructions`` when present;
- ``gen_ai.prompt.{i}.role`` / ``gen_ai.prompt.{i}.content`` (OpenLLMetry);
- ``gen_ai.prompt`` (OpenLIT, and semconv < 1.28 on a ``gen_ai.content.prompt`` span event).

The fingerprint is ``p1:`` and 24 hex digits of BLAKE2b over a canonical form: JSON values
re-serialized with sorted keys and no spaces, strings with runs of whitespace collapsed, so
that the same prompt sent by different SDKs or with different indentation hashes the same.
Spans without content (most instrumentations leave it off by default) get no fingerprint.
The same attributes are redacted from anything the collector keeps of a span
(``redact_content``), e.g. a rejected span in the dead-letter log.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

MESSAGES_KEY = "gen_ai.input.messages"
INSTRUCTIONS_KEY = "gen_ai.system_instructions"
PROMPT_KEY = "gen_ai.prompt"
PROMPT_EVENT = "gen_ai.content.prompt"
_INDEXED = re.compile(r"^gen_ai\.prompt\.(\d+)\.(role|content)$")
# Attributes that carry prompt or completion text: never kept.
_CONTENT = re.compile(r"^(gen_ai\.(input|output)\.messages|gen_ai\.system_instructions|"
                      r"gen_ai\.(prompt|completion)(\..*)?)$")
_SPACE = re.compile(r"\s+")
VERSION = "p1:"
REDACTED = "[redacted]"


def _normalized(value: Any) -> Any:
    """Strings with whitespace runs collapsed (JSON text parsed first), all the way down."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("[", "{"):
            try:
                return _normalized(json.loads(stripped))
            except ValueError:
                pass
        return _SPACE.sub(" ", stripped)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalized(v) for k, v in value.items()}
    return value


def _canonical(value: Any) -> str:
    return json.dumps(_normalized(value), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=repr)


def _indexed(attrs: dict[str, Any]) -> list[tuple[int, str, Any]]:
    parts = []
    for key, value in attrs.items():
        if (match := _INDEXED.match(key)) is not None:
            parts.append((int(match.group(1)), match.group(2), value))
    return sorted(parts, key=lambda p: (p[0], p[1]))


def content_of(attrs: dict[str, Any], event_attrs: Iterable[tuple[str, dict[str, Any]]]
               ) -> str | None:
    """The prompt's canonical text, or None when the span carries none."""
    messages = attrs.get(MESSAGES_KEY)
    if messages is not None:
        instructions = attrs.get(INSTRUCTIONS_KEY)
        head = _canonical(instructions) + "\n" if instructions is not None else ""
        return head + _canonical(messages)
    indexed = _indexed(attrs)
    if indexed:
        return _canonical([[i, field, value] for i, field, value in indexed])
    prompt = attrs.get(PROMPT_KEY)
    if prompt is None:
        prompt = next((ea.get(PROMPT_KEY) for name, ea in event_attrs
                       if name == PROMPT_EVENT and ea.get(PROMPT_KEY) is not None), None)
    return None if prompt is None else _canonical(prompt)


def fingerprint(attrs: dict[str, Any], event_attrs: Iterable[tuple[str, dict[str, Any]]] = ()
                ) -> str | None:
    text = content_of(attrs, event_attrs)
    if text is None or not text:
        return None
    return VERSION + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def redact_content(attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` with every prompt or completion text replaced by ``[redacted]``."""
    return {k: (REDACTED if _CONTENT.match(k) else v) for k, v in attrs.items()}
