"""Where each notification goes, in what words, and how often a destination may be sent to.

A destination takes the event kinds listed in its ``events`` at or above its
``min_severity`` (a ``test`` notification goes only where it is addressed). Its ``templates``
may reword the text per kind with ``$placeholders``: ``$title``, ``$text``, ``$service``,
``$kind``, ``$severity``, ``$subject_id`` and every field (spaces as underscores, e.g.
``$canary_weight``); an unknown placeholder stays as written. ``rate_limit_per_min`` is a token
bucket per destination: a message over it waits in the outbox, it is never dropped.
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping

import msgspec

from ipc.config import RoutingSection
from workers.integrations.notification import SEVERITY_RANK, Notification
from workers.resilience.ratelimit import RateLimited, TokenBucket

_NOT_WORD = re.compile(r"\W+")


def render(template: str, note: Notification) -> str:
    values = {"title": note.title, "text": note.text, "service": note.service,
              "kind": note.kind, "severity": note.severity, "subject_id": note.subject_id}
    values.update({_NOT_WORD.sub("_", label).strip("_"): value
                   for label, value in note.fields.items()})
    return string.Template(template).safe_substitute(values)


class Router:
    def __init__(self, routes: Mapping[str, RoutingSection]) -> None:
        self.routes = dict(routes)
        self.buckets = {name: TokenBucket(route.rate_limit_per_min / 60.0,
                                          max(1, int(route.rate_limit_per_min)))
                        for name, route in self.routes.items() if route.rate_limit_per_min > 0}

    def targets(self, note: Notification) -> list[str]:
        """The enabled destinations that take ``note``."""
        return [name for name, route in self.routes.items()
                if route.enabled and note.kind != "test" and note.kind in route.events
                and SEVERITY_RANK[note.severity] >= SEVERITY_RANK[route.min_severity]]

    def worded(self, destination: str, note: Notification) -> Notification:
        """``note`` with the destination's template for its kind applied to the text."""
        route = self.routes.get(destination)
        template = route.templates.get(note.kind) if route is not None else None
        if not template:
            return note
        return msgspec.structs.replace(note, text=render(template, note))

    def wait_s(self, destination: str) -> float:
        """0 if a message may go to ``destination`` now (and it is counted), else how long to
        wait for the destination's rate limit."""
        bucket = self.buckets.get(destination)
        if bucket is None:
            return 0.0
        try:
            bucket.acquire(destination)
        except RateLimited as exc:
            return exc.retry_after
        return 0.0
