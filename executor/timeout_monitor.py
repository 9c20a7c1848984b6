"""Scheduled-timeout monitor: an execution dispatched but not started within `scheduled_timeout`
is rescheduled to another worker, up to `max_schedule_attempts`, then failed (DESIGN section 4).

Only a worker that is not taking work costs the execution a dispatch: one that is alive and merely
busy (every slot taken) was never at fault, so its waiting work goes back in line for free."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from common import metrics
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from executor.rescheduling import reschedule_or_fail
from executor.resilience import periodic

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.timeout_monitor")

BATCH = 500


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def scheduled_timeout_error(timeout_s: float, age_s: float) -> dict[str, Any]:
    """The error object DESIGN section 4 specifies, field for field."""
    timeout = _number(timeout_s)
    age = int(age_s)
    return {
        "error": f"Execution timeout: worker did not pick up task within {timeout} seconds (scheduled for {age} seconds)",
        "failed_by": "execution_timeout_monitor",
        "timeout_seconds": timeout,
        "age_seconds": age,
        "original_status": "scheduled",
    }


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    cfg = ctx.settings.executor

    async def step() -> None:
        while await check(ctx) == BATCH:
            pass

    await periodic(
        log, "timeout_monitor", stop_event, enabled=cfg.enable_timeout_monitor, every_s=cfg.timeout_check_interval_s,
        step=step, what="timeout_check", scheduled_timeout_s=cfg.scheduled_timeout_s,
        interval_s=cfg.timeout_check_interval_s,
    )


async def check(ctx: ExecutorContext) -> int:
    cfg = ctx.settings.executor
    failed = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            q.SELECT_SCHEDULED_TIMED_OUT, cfg.scheduled_timeout_s, BATCH, cfg.heartbeat_staleness_multiplier
        )
        for row in rows:
            error = scheduled_timeout_error(cfg.scheduled_timeout_s, row["age_s"])
            metrics.TIMEOUTS.labels("scheduled").inc()
            log.warning(
                "scheduled_timeout", execution_id=str(row["id"]), attempt=row["attempt"], worker=row["worker"],
                age_s=round(row["age_s"], 3), worker_busy=row["worker_busy"],
            )
            _, done = await reschedule_or_fail(
                conn,
                row,
                max_schedule_attempts=cfg.max_schedule_attempts,
                reason=f"not started by {row['worker']} within {_number(cfg.scheduled_timeout_s)} s",
                kind="scheduled_timeout",
                error=error,
                counts=not row["worker_busy"],
            )
            if done is not None:
                failed.append(done)
    await publish_terminal(ctx.exchanges.notifications, failed)
    if len(failed) < len(rows):
        ctx.wake.set()
    return len(rows)
