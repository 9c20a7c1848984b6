"""Scheduler: places the backlog of `requested` executions on live workers and dispatches them.

Intake places what it records itself while nothing older waits (`executor.dispatching`); the
scheduler takes the rest: requests no worker had room for, delayed and retried ones that came due,
rescheduled dispatches, actions with a concurrency limit. Woken by intake (in process) and by
PostgreSQL notifications (a worker registered, capacity was freed), with a slow fallback timer as
a safety net. Each pass locks a batch of requested rows (`FOR UPDATE SKIP LOCKED`, so replicas
never place the same row), records `scheduled` with the worker and attempt+1, commits, and only
then hands the dispatches over (in the background, while the next pass runs). A returned
(unroutable) dispatch is rescheduled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from common.best_effort import best_effort
from common.db import Executor, connect_one
from common.logging import get_logger
from common.queries import WAKE_CHANNEL
from common.queries import executions as q
from executor import dispatching
from executor.placement import (
    concurrency_limits,
    concurrency_room,
    limited_room,
    place,
    room_by_action,
    served_actions,
)
from executor.rescheduling import reschedule_or_fail
from executor.resilience import riding_out_outages

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.scheduler")


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == "worker":
            ctx.catalogue.invalidate()
        # Freed capacity only matters when work was left behind.
        if payload != "capacity" or ctx.backlog:
            ctx.wake.set()

    listener = await connect_one(ctx.settings.database.url)
    await listener.add_listener(WAKE_CHANNEL, on_notify)
    log.info("scheduler_started")
    # A first pass at once: what an earlier run left `requested` is placed (or known to wait)
    # before intake places anything ahead of it.
    ctx.wake.set()
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
                    more = await _pass(ctx, stop_event)
                    if not more:
                        break
            if listener.is_closed():
                # The database restarted: listen again, and look for work missed meanwhile.
                listener = await connect_one(ctx.settings.database.url, max_wait_s=300)
                await listener.add_listener(WAKE_CHANNEL, on_notify)
                ctx.wake.set()
    finally:
        await dispatching.finish_handovers(ctx)
        await best_effort("close_wake_listener", listener.close())
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


async def _pass(ctx: ExecutorContext, stop_event: asyncio.Event) -> bool:
    """One placement pass; returns whether another pass may find more. Intake places too: one
    placement at a time, so that neither counts stale room, and what the pass leaves behind is
    known (`ExecutorContext.backlog`) before intake places again."""
    async with ctx.placing:
        more, ctx.backlog = await _place(ctx, stop_event)
    return more


async def _place(ctx: ExecutorContext, stop_event: asyncio.Event) -> tuple[bool, bool]:
    """Returns (another pass may find more, work was left unplaced)."""
    cfg = ctx.settings.executor
    async with ctx.pool.acquire() as conn, conn.transaction():
        candidates = await dispatching.live_candidates(ctx, conn)
        room = room_by_action(candidates, cfg.dispatch_pipeline)
        if not room:
            return False, True
        caps = await _concurrency_caps(ctx, conn, room)
        room = limited_room(room, caps)
        if not room:
            return False, True
        rows = await conn.fetch(q.SELECT_REQUESTED_FOR_UPDATE, cfg.schedule_batch_size, list(room), list(room.values()))
        plan = place(
            [(r["id"], r["action_ref"], r["previous_worker"]) for r in rows], candidates, cfg.dispatch_pipeline, caps
        )
        # Work of an action no live worker has room for waits for freed capacity, which must then
        # wake a pass, even when this one had room for other actions. (For the actions it had room
        # for, what it fetched says so without a query: `room_taken` below. Asking the index for
        # them too would walk the entries of the rows this pass has just placed.)
        without_room = sorted(served_actions(candidates) - room.keys())
        waits_for_room = bool(without_room) and bool(await conn.fetch(q.ACTIONS_WAITING, without_room))
        if not plan:
            return False, bool(rows) or waits_for_room
        scheduled = await dispatching.mark_scheduled(conn, plan, {r["id"]: r["attempt"] for r in rows})
    # While the broker is away, hold on rather than spend dispatches that cannot arrive; a stopping
    # executor puts them back in line, at no cost to them, for a replica or its successor.
    if not await _connected_or_stopping(ctx, stop_event):
        for s in scheduled:
            await reschedule_or_fail(
                ctx.pool, s, max_schedule_attempts=cfg.max_schedule_attempts,
                reason="the executor stopped before dispatching it", kind="executor_stopped", error={}, counts=False,
            )
        return False, False
    dispatching.hand_over(ctx, scheduled)
    # Work is left behind when some could not be placed, or when the room there was is all taken
    # (more may be waiting as `requested`): then freed capacity must wake the next pass.
    fetched = Counter(r["action_ref"] for r in rows)
    room_taken = any(fetched[a] >= min(free, cfg.schedule_batch_size) for a, free in room.items())
    log.debug("scheduler_pass", rows=len(rows), placed=len(plan), room_taken=room_taken, waits_for_room=waits_for_room)
    return len(rows) == cfg.schedule_batch_size, len(plan) < len(rows) or room_taken or waits_for_room


async def _concurrency_caps(ctx: ExecutorContext, conn: Executor, room: dict[str, int]) -> dict[str, int]:
    """How many more of each limited action this pass may place: its limit (YAML
    `executor.max_concurrency`, else the action's `max_concurrency`) less what is dispatched or
    running. The count is taken under a lock per limited action, held until this pass commits, so
    that two executors never both fill the same room."""
    specs = await ctx.catalogue.resolve(room)
    limits = concurrency_limits(
        room, ctx.settings.executor.max_concurrency, {a: spec.max_concurrency for a, spec in specs.items()}
    )
    if not limits:
        return {}
    await conn.execute(q.LOCK_CONCURRENCY, sorted(limits))
    active = {r["action_ref"]: r["n"] for r in await conn.fetch(q.ACTIVE_BY_ACTION, list(limits))}
    return concurrency_room(limits, active)
