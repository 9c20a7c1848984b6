"""Putting a dispatch that did not start back in line, or failing it once attempts run out."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any, Literal

from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.rescheduling")


def next_step(attempt: int, max_schedule_attempts: int) -> Literal["reschedule", "fail"]:
    """After dispatch number ``attempt`` did not start: try again, or give up."""
    return "reschedule" if attempt < max_schedule_attempts else "fail"


async def reschedule_or_fail(
    ctx: ExecutorContext,
    execution_id: uuid.UUID,
    attempt: int,
    *,
    reason: str,
    error: dict[str, Any],
) -> str | None:
    """Compare-and-set from `scheduled` at ``attempt``; returns the new status, or None when the
    execution had already moved on (another replica, or the worker claimed it after all)."""
    fields = {"execution_id": str(execution_id), "attempt": attempt, "reason": reason}
    if next_step(attempt, ctx.settings.executor.max_schedule_attempts) == "reschedule":
        row = await ctx.pool.fetchrow(q.RESCHEDULE, execution_id, attempt, json.dumps({"reason": reason, "attempt": attempt}))
        if row is None:
            return None
        log.info("execution_rescheduled", **fields)
        ctx.wake.set()
        return "requested"
    row = await ctx.pool.fetchrow(q.FAIL, execution_id, "scheduled", attempt, json.dumps(error))
    if row is None:
        return None
    log.warning("execution_failed", error=error.get("error"), **fields)
    await publish_terminal(ctx.pool, ctx.exchanges.notifications, [row])
    return "failed"
