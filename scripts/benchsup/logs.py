"""Timestamps read from a daemon's log as it grows: optimizerd's --json-logs and supervisord's
text log (both in milliseconds, both on the wall clock)."""
from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Callable
from typing import Any


def utc_iso_to_epoch(ts: str) -> float:
    """'2026-11-25T17:53:24.550Z' (truncated to the ms) -> epoch s, at the middle of that ms."""
    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + \
        int(ts[20:23]) / 1000 + 0.0005


def local_comma_to_epoch(ts: str) -> float:
    """supervisord's '2026-11-25 17:53:24,550' (local time, truncated to the ms) -> epoch s."""
    return time.mktime(time.strptime(ts[:19], "%Y-%m-%d %H:%M:%S")) + int(ts[20:23]) / 1000 \
        + 0.0005


class LineTail:
    """Reads a log file as it grows; ``parse`` turns a line into a record or None."""

    def __init__(self, path: str, parse: Callable[[str], Any]):
        self.path, self.parse = path, parse
        self.f = None
        self.buf = b""
        self.records: list[Any] = []
        self.pos = 0  # records before pos were consumed by wait_for

    def read(self) -> None:
        if self.f is None:
            try:
                self.f = open(self.path, "rb")  # noqa: SIM115 - kept open while tailing
            except FileNotFoundError:
                return
        chunk = self.f.read()
        if not chunk:
            return
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            rec = self.parse(line.decode(errors="replace"))
            if rec is not None:
                self.records.append(rec)

    def skip(self) -> None:
        self.read()
        self.pos = len(self.records)

    def wait_for(self, pred: Callable[[Any], bool], timeout: float, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.read()
            while self.pos < len(self.records):
                rec = self.records[self.pos]
                self.pos += 1
                if pred(rec):
                    return rec
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: no {what or 'matching line'} within {timeout} s")
            time.sleep(0.005)


def parse_json_log(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if "ts" in rec and "msg" in rec:
        rec["t"] = utc_iso_to_epoch(rec["ts"])
        return rec
    return None


SUPD_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (.*)$")


def parse_supervisord_log(line: str) -> dict | None:
    mt = SUPD_LINE.match(line)
    if not mt:
        return None
    return {"t": local_comma_to_epoch(mt.group(1)), "level": mt.group(2), "msg": mt.group(3)}
