"""Timers: suspended durable runs go back in line when they are due, and so do delayed
executions (`not_before`: a `--delay`, an `--at`, or an action's retry backoff).

A run that left its worker to wait (`sleeping` on a long `ctx.sleep`, `waiting` on a child or a
signal) records when it is due: its timer, or its deadline, whichever is first. This loop sleeps
until the earliest of those (read from the first entry of a partial index, so its cost is the
number of suspended runs, never history), or until a new suspension is announced on
TIMER_CHANNEL, and puts what is due back in line for the scheduler. A child finishing or a signal
arriving wakes its run at once (a trigger, and the signal query); each pass here also catches a
wake-up that raced the run's own suspension. Safe with several executors (`SKIP LOCKED`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from common.db import connect_one
from common.logging import get_logger
from common.queries import TIMER_CHANNEL
from common.queries import workflows as wq
from executor.resilience import riding_out_outages

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.timers")

BATCH = 500

#: Past the moment a timer is due, so that the pass that wakes then finds it due.
_DUE_MARGIN_S = 0.005


def next_pause_s(fallback_s: float, next_wake_in_s: float | None) -> float:
    """Until the next pass: the fallback interval, or less if a timer is due sooner."""
    if next_wake_in_s is None:
        return fallback_s
    return max(min(fallback_s, next_wake_in_s + _DUE_MARGIN_S), 0.0)


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    fallback_s = ctx.settings.executor.sweep_interval_s
    changed = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, _payload: object) -> None:
        changed.set()

    listener = await connect_one(ctx.settings.database.url)
    await listener.add_listener(TIMER_CHANNEL, on_notify)
    log.info("timers_started", fallback_s=fallback_s)
    try:
        while not stop_event.is_set():
            pause_s = fallback_s
            changed.clear()
            async with riding_out_outages("wake_timers", stop_event):
                while await wake_due(ctx) == BATCH:
                    pass
                pause_s = next_pause_s(fallback_s, await ctx.pool.fetchval(wq.NEXT_WAKE_IN))
                if listener.is_closed():
                    listener = await connect_one(ctx.settings.database.url, max_wait_s=300)
                    await listener.add_listener(TIMER_CHANNEL, on_notify)
                    continue
            waits = [asyncio.ensure_future(stop_event.wait()), asyncio.ensure_future(changed.wait())]
            try:
                await asyncio.wait(waits, timeout=pause_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
    finally:
        with contextlib.suppress(Exception):
            await listener.close()
        log.info("timers_stopped")


async def wake_due(ctx: ExecutorContext) -> int:
    """One batch of due suspended runs back to `requested`, and of due delayed executions into the
    scheduler's line; returns the larger count (BATCH: there may be more)."""
    rows = await ctx.pool.fetch(wq.WAKE_DUE, BATCH)
    for row in rows:
        log.info("execution_woken", execution_id=str(row["id"]), reason=row["reason"])
    released = await ctx.pool.fetch(wq.RELEASE_DELAYED, BATCH)
    for row in released:
        log.info("execution_due", execution_id=str(row["id"]))
    if rows or released:
        ctx.wake.set()
    return max(len(rows), len(released))
