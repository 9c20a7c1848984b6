"""Timers: suspended durable runs go back in line when they are due, and so do delayed
executions (`not_before`: a `--delay`, an `--at`, or an action's retry backoff).

A run that left its worker to wait (`sleeping` on a long `ctx.sleep`, `waiting` on a child or a
signal) records when it is due: its timer, or its deadline, whichever is first. This loop sleeps
until the earliest of those (read from the first entry of a partial index, so its cost is the
number of suspended runs, never history), or until a new suspension is announced on
TIMER_CHANNEL, and puts what is due back in line for the scheduler. A child finishing or a signal
arriving wakes its run at once (a trigger, and the signal query; the suspension's locks keep them
from racing it); once a fallback interval, a pass here also wakes any waiting run whose child or
signal is there anyway, and says so (that check reads every waiting run, so it does not run on
every notification). Safe with several executors (`SKIP LOCKED`).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from common.logging import get_logger
from common.queries import TIMER_CHANNEL
from common.queries import workflows as wq
from executor.resilience import until_due

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.timers")

BATCH = 500


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    fallback_s = ctx.settings.executor.sweep_interval_s
    log.info("timers_started", fallback_s=fallback_s)

    backstop_at_s = -math.inf

    async def step() -> None:
        nonlocal backstop_at_s
        while await wake_due(ctx, wq.WAKE_DUE) >= BATCH:
            pass
        if time.monotonic() - backstop_at_s >= fallback_s:
            while await wake_due(ctx, wq.WAKE_READY) >= BATCH:
                pass
            backstop_at_s = time.monotonic()

    await until_due(
        url=ctx.settings.database.url, channel=TIMER_CHANNEL, what="wake_timers", stop_event=stop_event,
        fallback_s=fallback_s, step=step, next_due_in_s=lambda: ctx.pool.fetchval(wq.NEXT_WAKE_IN),
    )
    log.info("timers_stopped")


async def wake_due(ctx: ExecutorContext, query: str) -> int:
    """One batch of suspended runs back to `requested` (``query``: those whose timer is due, or
    those whose child or signal is there), and of due delayed executions into the scheduler's line;
    returns the larger count (BATCH: there may be more)."""
    rows = await ctx.pool.fetch(query, BATCH)
    for row in rows:
        if row["reason"] == "ready":  # missed by the trigger or the signal query: never expected
            log.warning("execution_woken_late", execution_id=str(row["id"]), reason=row["reason"])
        else:
            log.info("execution_woken", execution_id=str(row["id"]), reason=row["reason"])
    released = await ctx.pool.fetch(wq.RELEASE_DELAYED, BATCH)
    for row in released:
        log.info("execution_due", execution_id=str(row["id"]))
    if rows or released:
        ctx.wake.set()
    return max(len(rows), len(released))
