"""Scheduler: places `requested` executions on live workers and dispatches them.

Intake places new requests as it records them when there is room; the scheduler places the rest:
what found no room then, what was put back in line, what woke up. It is woken by intake (in
process) and by PostgreSQL notifications (a worker registered, capacity was freed), with a slow
fallback timer as a safety net. Each pass locks a batch of requested rows (`FOR UPDATE SKIP
LOCKED`, so replicas never place the same row), records `scheduled` with the worker and attempt+1,
commits, and only then hands the dispatches over (`executor.dispatching`), in the background
while the next pass runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from common.db import connect_one
from common.logging import get_logger
from common.queries import WAKE_CHANNEL
from common.queries import executions as q
from executor import dispatching
from executor.placement import place
from executor.rescheduling import reschedule_or_fail
from executor.resilience import riding_out_outages

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.scheduler")


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == "worker":
            ctx.catalogue.invalidate()
        # Freed capacity only matters when the last pass left work behind.
        if payload != "capacity" or ctx.backlog:
            ctx.wake.set()

    listener = await connect_one(ctx.settings.database.url)
    await listener.add_listener(WAKE_CHANNEL, on_notify)
    log.info("scheduler_started")
    fallback_s = ctx.settings.executor.scheduler_fallback_interval_s
    try:
        while not stop_event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(ctx.wake.wait(), stop_event.wait()), timeout=fallback_s)
            if stop_event.is_set():
                break
            ctx.wake.clear()
            async with riding_out_outages("schedule", stop_event):
                while not stop_event.is_set():
                    more, ctx.backlog = await _pass(ctx, stop_event)
                    if not more:
                        break
            if listener.is_closed():
                # The database restarted: listen again, and look for work missed meanwhile.
                listener = await connect_one(ctx.settings.database.url, max_wait_s=300)
                await listener.add_listener(WAKE_CHANNEL, on_notify)
                ctx.wake.set()
    finally:
        with contextlib.suppress(Exception):
            await listener.close()
        log.info("scheduler_stopped")


async def _first(*aws: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _connected_or_stopping(ctx: ExecutorContext, stop_event: asyncio.Event) -> bool:
    """Wait for the broker connection; False if the executor is stopping first."""
    if ctx.amqp.connected.is_set():
        return True
    log.warning("dispatch_waiting_for_broker")
    await _first(ctx.amqp.connected.wait(), stop_event.wait())
    return ctx.amqp.connected.is_set()


async def _pass(ctx: ExecutorContext, stop_event: asyncio.Event) -> tuple[bool, bool]:
    """One placement pass; returns (another pass may find more, work was left unplaced)."""
    cfg = ctx.settings.executor
    async with ctx.pool.acquire() as conn, conn.transaction():
        room = await dispatching.room(ctx, conn)
        if not room.by_action:
            return False, True
        rows = await conn.fetch(
            q.SELECT_REQUESTED_FOR_UPDATE, cfg.schedule_batch_size, list(room.by_action), list(room.by_action.values())
        )
        plan = place(
            [(r["id"], r["action_ref"], r["previous_worker"]) for r in rows], room.candidates, cfg.dispatch_pipeline,
            room.caps,
        )
        if not plan:
            return False, bool(rows)
        by_id = {r["id"]: r for r in rows}
        scheduled = await conn.fetch(
            q.MARK_SCHEDULED, list(plan), list(plan.values()), [by_id[i]["attempt"] for i in plan]
        )
    # While the broker is away, hold on rather than spend dispatches that cannot arrive; a stopping
    # executor puts them back in line, at no cost to them, for a replica or its successor.
    if not await _connected_or_stopping(ctx, stop_event):
        for s in scheduled:
            await reschedule_or_fail(
                ctx.pool, s, max_schedule_attempts=cfg.max_schedule_attempts,
                reason="the executor stopped before dispatching it", kind="executor_stopped", error={}, counts=False,
            )
        return False, False
    # The broker's confirm of a persistent dispatch can take as long as its disk: the next pass
    # does not wait for it. What a handover could not send, it puts back in line itself.
    dispatching.hand_over(ctx, [dispatching.placed(r) for r in scheduled])
    # Work is left behind when some could not be placed, or when the room there was is all taken
    # (more may be waiting as `requested`): then freed capacity must wake the next pass.
    fetched = Counter(r["action_ref"] for r in rows)
    room_taken = any(fetched[a] >= min(free, cfg.schedule_batch_size) for a, free in room.by_action.items())
    log.debug("scheduler_pass", rows=len(rows), placed=len(plan), room_taken=room_taken)
    return len(rows) == cfg.schedule_batch_size, len(plan) < len(rows) or room_taken
