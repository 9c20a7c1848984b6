"""An execution's event log as a timeline people can read: one line per event. Pure."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any


def _when(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def describe(kind: str, data: Mapping[str, Any]) -> str:
    """What happened, in words, from an event's type and data."""
    step = f"step {data.get('step')} {data.get('name', '')}".rstrip()
    match kind:
        case "execution.scheduled":
            return f"dispatched to {data.get('worker')} (attempt {data.get('attempt')})"
        case "execution.started":
            return f"started on {data.get('worker')} (attempt {data.get('attempt')})"
        case "workflow.started" | "workflow.resumed":
            return f"on {data.get('worker')}"
        case "step.completed":
            tries = data.get("attempts", 1)
            return f"{step} in {data.get('duration_ms')} ms" + (f" after {tries} attempts" if tries and tries > 1 else "")
        case "step.retrying":
            return f"{step}: attempt {data.get('attempt')} in {data.get('delay_s')} s, after: {data.get('error')}"
        case "step.failed":
            return f"{step} after {data.get('attempts')} attempt(s): {data.get('error')}"
        case "sleep.started":
            return f"step {data.get('step')} sleep {data.get('seconds')} s"
        case "sleep.completed":
            return f"step {data.get('step')} sleep over"
        case "child.started":
            return f"step {data.get('step')} started child {data.get('child')} ({data.get('action_ref')})"
        case "child.completed" | "child.failed":
            return f"step {data.get('step')} child " + ("completed" if kind == "child.completed" else f"failed: {data.get('error')}")
        case "signal.waiting":
            return f"step {data.get('step')} waits for signal {data.get('signal')!r}"
        case "signal.received" | "signal.timed_out":
            verb = "received" if kind == "signal.received" else "timed out waiting for"
            return f"step {data.get('step')} {verb} signal {data.get('signal')!r}"
        case "signal.sent":
            return f"signal {data.get('name')!r} sent" + (" (woke the run)" if data.get("woke") else "")
        case "workflow.interrupted":
            then = "recoverable" if data.get("recoverable") else "not recoverable"
            return (f"{data.get('reason')} on {data.get('worker_id')}: {data.get('error')} ({then}, "
                    f"recovery attempt {data.get('recovery_attempt')}, after event {data.get('last_event_sequence')})")
        case "execution.recovering":
            return f"recovery attempt {data.get('recovery_attempt')}: back in line"
        case "workflow.suspended":
            waits = data.get("child") or (f"signal {data.get('signal')!r}" if data.get("signal") else None)
            until = f" until {data.get('wake_at')}" if data.get("wake_at") else ""
            return f"{data.get('status')}" + (f" for {waits}" if waits else "") + until
        case "execution.woken":
            return f"back in line ({data.get('reason')})"
        case "execution.rescheduled":
            return str(data.get("reason", ""))
        case "execution.retried":
            return f"retried: {data.get('steps_kept')} completed steps kept, {len(data.get('steps_reset') or [])} to run again"
    if "error" in data:
        return str(data["error"])
    return json.dumps(dict(data), default=str) if data else ""


def timeline(events: list[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(seq, +seconds since the first event, type, description) per event."""
    start = _when(events[0].get("created_at")) if events else None
    rows = []
    for ev in events:
        at = _when(ev.get("created_at"))
        offset = f"+{(at - start).total_seconds():.3f}s" if at and start else ""
        rows.append((str(ev.get("seq")), offset, str(ev.get("type")), describe(str(ev.get("type")), ev.get("data") or {})))
    return rows
