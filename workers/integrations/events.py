"""Which optimizer events become notifications, and what they say.

The processor's ``optimizer-events`` log gives proposals (``proposal_created``), rollout
transitions (``canary_started``, ``promoted``, ``rolled_back``; stage advances stay quiet) and
findings (``anomaly_found``, with the analyzer's severity); config writes are not notified. The
supervisor's status gives services that entered ``failed`` (``service_failed``). Each
notification's key is derived from the record's own id, so reading the same record again (after
a crash) yields the same key, which the outbox and the destinations deduplicate on.
"""
from __future__ import annotations

from typing import Any

from workers.integrations.notification import Notification

ROLLOUT_KINDS = {"started": ("canary_started", "info"), "promoted": ("promoted", "info"),
                 "rolled_back": ("rolled_back", "warning")}


def _pct(value: Any) -> str:
    return f"{float(value):+.1f}%" if isinstance(value, int | float) else "n/a"


def from_record(record: dict[str, Any]) -> Notification | None:
    """The notification of one ``optimizer-events`` record, or None for a quiet one."""
    kind, ident, body = record.get("type"), str(record.get("id", "")), record.get("body")
    if not isinstance(body, dict):
        return None
    time_ns = int(record.get("time_ns") or 0)
    if kind == "proposal":
        impact = body.get("expected_impact") or {}
        return Notification(
            key=f"proposal:{ident}", kind="proposal_created", severity="info",
            title=f"Proposed for {body.get('service')}: {body.get('title', ident)}",
            text=str(body.get("rationale") or body.get("title") or ""),
            service=str(body.get("service", "")), subject_id=ident, time_ns=time_ns,
            fields={"strategy": str(body.get("strategy", "")),
                    "model": str(body.get("model", "")),
                    "cost": _pct(impact.get("cost_pct")),
                    "savings per day": f"${float(impact.get('savings_usd_per_day') or 0):.2f}",
                    "confidence": f"{float(impact.get('confidence') or 0):.0%}"},
            body=body)
    if kind == "rollout" and body.get("kind") in ROLLOUT_KINDS:
        note_kind, severity = ROLLOUT_KINDS[body["kind"]]
        proposal, service = str(body.get("proposal_id", "")), str(body.get("service", ""))
        verb = {"canary_started": "Canary started", "promoted": "Promoted",
                "rolled_back": "Rolled back"}[note_kind]
        return Notification(
            key=f"rollout:{ident}", kind=note_kind, severity=severity,  # type: ignore[arg-type]
            title=f"{verb}: {proposal} on {service}", text=str(body.get("reason", "")),
            service=service, subject_id=proposal, time_ns=time_ns,
            fields={"stage": str(body.get("stage", "")),
                    "canary weight": f"{int(body.get('weight_bp') or 0) / 100:g}%",
                    "config version": str(body.get("config_version", "")),
                    "canary samples": str(body.get("canary_samples", "")),
                    "baseline samples": str(body.get("baseline_samples", ""))},
            body=body)
    if kind == "finding":
        severity = body.get("severity") if body.get("severity") in (
            "info", "warning", "critical") else "warning"
        return Notification(
            key=f"finding:{ident}", kind="anomaly_found", severity=severity,
            title=str(body.get("title") or body.get("kind") or "finding"),
            text=str(body.get("detail", "")), service=str(body.get("service", "")),
            subject_id=ident, time_ns=time_ns,
            fields={"kind": str(body.get("kind", "")), "model": str(body.get("model", "")),
                    **{k: f"{float(v):.4g}" for k, v in
                       list((body.get("evidence") or {}).items())[:6]
                       if isinstance(v, int | float)}},
            body=body)
    return None


def service_failed(service: dict[str, Any]) -> Notification:
    """A daemon service (one entry of the supervisor's status) that the supervisor gave up
    restarting: state ``failed``. Its restart count tells one failure from the next."""
    name, instance = str(service.get("name", "")), int(service.get("instance") or 0)
    restarts = int(service.get("restarts") or 0)
    return Notification(
        key=f"failed:{name}:{instance}:{restarts}", kind="service_failed", severity="critical",
        title=f"optimizerd service {name} failed",
        text=str(service.get("reason") or "the supervisor stopped restarting it") +
        f"; see `optimizerctl status {name}`",
        service=name, subject_id=name,
        fields={"restarts": str(restarts), "last exit": str(service.get("last_exit") or "")},
        body={k: v for k, v in service.items() if isinstance(v, str | int | float | bool)})
