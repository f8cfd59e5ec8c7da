"""One log line format for every process: text or JSON, always with service name and pid.

Workers write JSON lines to their stderr pipe; the supervisor turns each line back into a
LogRecord (``record_from_child_line``) and formats it with its own handler, so the choice of text
or JSON output is made in one place.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
_RESERVED = {"ts", "level", "service", "pid", "logger", "msg", "exc"}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created % 1 * 1000):03d}Z"


class StructuredFormatter(logging.Formatter):
    """Formats records as text or JSON; ``record.fields`` (a dict) adds key=value pairs."""

    def __init__(self, service: str, json_lines: bool):
        super().__init__()
        self.service, self.json_lines = service, json_lines

    def format(self, record: logging.LogRecord) -> str:
        service = getattr(record, "service", self.service)
        pid = getattr(record, "child_pid", record.process)
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        message = record.getMessage()
        exc = self.formatException(record.exc_info) if record.exc_info else \
            getattr(record, "child_exc", "")
        if self.json_lines:
            doc = {"ts": _timestamp(record.created), "level": record.levelname.lower(),
                   "service": service, "pid": pid, "logger": record.name, "msg": message}
            doc.update({k: v for k, v in fields.items() if k not in _RESERVED})
            if exc:
                doc["exc"] = exc
            return json.dumps(doc, default=str)
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        stamp = _timestamp(record.created)
        line = f"{stamp} {record.levelname:<7} {service}[{pid}] {message}{extra}"
        return line + ("\n" + exc if exc else "")


def configure_logging(service: str, level: str, json_lines: bool, stream: Any = None) -> None:
    """Route the root logger to ``stream`` (stderr) through a StructuredFormatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(service, json_lines))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])


def record_from_child_line(line: str, service: str, pid: int, stream: str) -> logging.LogRecord:
    """A LogRecord for one line a worker wrote: its JSON log line, or any other output."""
    doc: dict[str, Any] | None = None
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
    if not isinstance(doc, dict) or "msg" not in doc:
        level = logging.WARNING if stream == "stderr" else logging.INFO
        record = logging.LogRecord("optimizerd.output", level, "", 0, line, None, None)
        record.fields = {"stream": stream}
    else:
        level = LEVELS.get(str(doc.get("level")), logging.INFO)
        record = logging.LogRecord(str(doc.get("logger", "worker")), level, "", 0,
                                   str(doc["msg"]), None, None)
        record.fields = {k: v for k, v in doc.items() if k not in _RESERVED}
        if doc.get("exc"):
            record.child_exc = str(doc["exc"])
    record.service, record.child_pid = service, pid
    return record


def ensure_line_buffered_stderr() -> None:
    """Workers' stderr is a pipe; make every log line reach the supervisor at once."""
    try:
        sys.stderr.reconfigure(line_buffering=True)
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        os.environ["PYTHONUNBUFFERED"] = "1"
