"""A notification: one optimizer event as every destination receives it (Slack, Jira, GitHub,
webhooks), whatever it came from. Destinations format it their own way; ``key`` identifies it
across retries and restarts (the idempotency key sent with every delivery)."""
from __future__ import annotations

import hashlib
from typing import Any, Literal

from msgspec import Struct, field

Kind = Literal["proposal_created", "canary_started", "promoted", "rolled_back",
               "anomaly_found", "service_failed", "test"]
Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
FOLLOW_UPS = frozenset({"promoted", "rolled_back"})  # kinds that comment on the subject's issue


class Notification(Struct, kw_only=True, frozen=True):
    key: str              # stable id of this event: the same event always gets the same key
    kind: Kind
    severity: Severity
    title: str            # one line
    text: str             # a few lines, plain text (templates may change it)
    service: str = ""     # the LLM-using service it is about, if any
    subject_id: str = ""  # the optimization, finding or rollout it is about, if any
    time_ns: int = 0      # when it happened (event time)
    fields: dict[str, str] = field(default_factory=dict)  # label -> value, shown as a table
    body: dict[str, Any] = field(default_factory=dict)    # the source record, for webhooks


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:20]


def note_label(key: str) -> str:
    """The label that makes the issue of one notification findable again (Jira, GitHub): the
    idempotency of issue trackers, which take no idempotency key."""
    return f"llmo-{_hash(key)}"


def subject_label(subject_id: str) -> str:
    """The label shared by the issue of one optimization (or finding) and its follow-ups."""
    return f"llmo-subject-{_hash(subject_id)}"


def issue_labels(configured: list[str], note: Notification) -> list[str]:
    """An issue's labels: the configured ones, ``note``'s own, and its subject's (so that
    follow-ups find it)."""
    labels = [*configured, note_label(note.key)]
    if note.subject_id:
        labels.append(subject_label(note.subject_id))
    return labels
