"""Putting a dispatch that did not start back in line, or failing it once its dispatches run out."""

from __future__ import annotations

import uuid
from typing import Any, Literal, TypedDict

import asyncpg

from common import metrics
from common.db import Executor
from common.logging import get_logger
from common.queries import executions as q

log = get_logger("baton.executor.rescheduling")


class DispatchedRow(TypedDict):
    """What rescheduling reads of a dispatched execution, when the caller has it in hand rather
    than as a row read from `executions`."""

    id: uuid.UUID
    attempt: int
    schedule_attempts: int


def next_step(schedule_attempts: int, max_schedule_attempts: int) -> Literal["reschedule", "fail"]:
    """After dispatch number ``schedule_attempts`` did not start: try again, or give up."""
    return "reschedule" if schedule_attempts < max_schedule_attempts else "fail"


async def reschedule_or_fail(
    conn: Executor,
    row: asyncpg.Record | DispatchedRow,
    *,
    max_schedule_attempts: int,
    reason: str,
    kind: str,
    error: dict[str, Any],
    counts: bool = True,
) -> tuple[str | None, asyncpg.Record | None]:
    """Compare-and-set from `scheduled` at the row's attempt. Returns the new status (None when the
    execution had moved on: another replica, or the worker claimed it after all) and, if it failed,
    the failed row, whose notification the caller publishes once its transaction has committed.

    ``counts=False`` (the broker was away) does not spend one of the execution's dispatches."""
    fields = {"execution_id": str(row["id"]), "attempt": row["attempt"], "reason": reason}
    if not counts or next_step(row["schedule_attempts"], max_schedule_attempts) == "reschedule":
        data = {"reason": reason, "attempt": row["attempt"]}
        if await conn.fetchrow(q.RESCHEDULE, row["id"], row["attempt"], data, counts) is None:
            return None, None
        metrics.RESCHEDULES.labels(kind).inc()
        log.info("execution_rescheduled", kind=kind, **fields)
        return "requested", None
    failed = await conn.fetchrow(q.FAIL, row["id"], "scheduled", row["attempt"], error)
    if failed is None:
        return None, None
    log.warning("execution_failed", error=error.get("error"), kind=kind, **fields)
    return "failed", failed
