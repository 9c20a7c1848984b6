"""Scheduler: places `requested` executions on live workers and dispatches them.

Woken by intake (in process) and by PostgreSQL notifications (a worker registered, capacity was
freed), with a slow fallback timer as a safety net. Each pass locks a batch of requested rows
(`FOR UPDATE SKIP LOCKED`, so replicas never place the same row), records `scheduled` with the
worker and attempt+1, commits, and only then publishes the dispatches: a worker can never see a
dispatch its claim would not match. A returned (unroutable) dispatch is rescheduled. A pass does
not wait for the broker's confirms of its dispatches: they are published in the background while
the next pass runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import aiormq.exceptions
import asyncpg

from common.amqp import Names, persistent_json
from common.db import Executor, connect_one
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import WAKE_CHANNEL
from common.queries import executions as q
from common.queries import workers as wq
from common.retry import TRANSIENT_ERRORS
from common.schemas import MAX_DISPATCHES_PER_MESSAGE, Dispatch, DispatchBatch
from executor.placement import Candidate, concurrency_room, limited_room, place, room_by_action, served_actions
from executor.rescheduling import reschedule_or_fail
from executor.resilience import describe, riding_out_outages

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.scheduler")

#: What rescheduling an undeliverable dispatch may run into: the database away, or refusing.
_DB_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, asyncpg.PostgresError)
#: How long a stopping scheduler waits for the dispatches it is still publishing.
HANDOVER_TIMEOUT_S = 10.0


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    state = {"blocked": True}

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == "worker":
            ctx.catalogue.invalidate()
        # Freed capacity only matters when the last pass left work behind.
        if payload != "capacity" or state["blocked"]:
            ctx.wake.set()

    # Dispatches being published while the next pass runs.
    handovers: set[asyncio.Task[None]] = set()
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
                    more, state["blocked"] = await _pass(ctx, stop_event, handovers)
                    if not more:
                        break
            if listener.is_closed():
                # The database restarted: listen again, and look for work missed meanwhile.
                listener = await connect_one(ctx.settings.database.url, max_wait_s=300)
                await listener.add_listener(WAKE_CHANNEL, on_notify)
                ctx.wake.set()
    finally:
        # Let the dispatches under way be sent: a stopping executor hands over what it placed.
        if handovers:
            await asyncio.wait(handovers, timeout=HANDOVER_TIMEOUT_S)
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


async def _pass(
    ctx: ExecutorContext, stop_event: asyncio.Event, handovers: set[asyncio.Task[None]]
) -> tuple[bool, bool]:
    """One placement pass; returns (another pass may find more, work was left unplaced)."""
    cfg = ctx.settings.executor
    async with ctx.pool.acquire() as conn, conn.transaction():
        candidates = [
            Candidate(r["name"], frozenset(r["actions"]), r["max_concurrent_tasks"], r["outstanding"])
            for r in await conn.fetch(wq.ELIGIBLE, cfg.heartbeat_staleness_multiplier)
        ]
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
    if scheduled:
        # The broker's confirm of a persistent dispatch can take as long as its disk: the next pass
        # does not wait for it. What a handover could not send, it puts back in line itself.
        task = asyncio.create_task(_hand_over(ctx, scheduled))
        handovers.add(task)
        task.add_done_callback(lambda done: _handed_over(done, handovers))
    # Work is left behind when some could not be placed, or when the room there was is all taken
    # (more may be waiting as `requested`): then freed capacity must wake the next pass.
    fetched = Counter(r["action_ref"] for r in rows)
    room_taken = any(fetched[a] >= min(free, cfg.schedule_batch_size) for a, free in room.items())
    log.debug("scheduler_pass", rows=len(rows), placed=len(plan), room_taken=room_taken, waits_for_room=waits_for_room)
    return len(rows) == cfg.schedule_batch_size, len(plan) < len(rows) or room_taken or waits_for_room


def _handed_over(task: asyncio.Task[None], handovers: set[asyncio.Task[None]]) -> None:
    """Forget a finished handover; log what it did not expect (its executions stay `scheduled`,
    and the scheduled-timeout monitor moves them on)."""
    handovers.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("dispatch_handover_failed", error=describe(exc))


async def _hand_over(ctx: ExecutorContext, scheduled: list[asyncpg.Record]) -> None:
    """Publish one pass's dispatches, a message per worker, and announce what could not be
    dispatched and failed for it."""
    by_worker: dict[str, list[asyncpg.Record]] = {}
    for s in scheduled:
        by_worker.setdefault(s["worker"], []).append(s)
    try:
        outcomes = await asyncio.gather(
            *(
                _dispatch(ctx, worker, rows[i : i + MAX_DISPATCHES_PER_MESSAGE])
                for worker, rows in by_worker.items()
                for i in range(0, len(rows), MAX_DISPATCHES_PER_MESSAGE)
            )
        )
    except _DB_ERRORS as exc:
        # The database went away while rescheduling what could not be sent: those executions stay
        # `scheduled`, and the scheduled-timeout monitor moves them on.
        log.warning("dispatch_handover_failed", error=describe(exc), executions=len(scheduled))
        return
    await publish_terminal(ctx.exchanges.notifications, [row for rows in outcomes for row in rows])


async def _concurrency_caps(ctx: ExecutorContext, conn: Executor, room: dict[str, int]) -> dict[str, int]:
    """How many more of each limited action this pass may place: its limit (YAML
    `executor.max_concurrency`, else the action's `max_concurrency`) less what is dispatched or
    running. The count is taken under a lock per limited action, held until this pass commits, so
    that two executors never both fill the same room."""
    specs = await ctx.catalogue.resolve(room)
    limits = {
        a: limit for a in room
        if (limit := ctx.settings.executor.max_concurrency.get(a, specs[a].max_concurrency if a in specs else None))
        is not None
    }
    if not limits:
        return {}
    await conn.execute(q.LOCK_CONCURRENCY, sorted(limits))
    active = {r["action_ref"]: r["n"] for r in await conn.fetch(q.ACTIVE_BY_ACTION, list(limits))}
    return concurrency_room(limits, active)


async def _dispatch(ctx: ExecutorContext, worker: str, scheduled: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """Publish one worker's dispatches from this pass as one message; if it cannot be handed over,
    reschedule each of them (returns the rows that this failed instead)."""
    batch = DispatchBatch(dispatches=[Dispatch(execution_id=s["id"], attempt=s["attempt"]) for s in scheduled])
    first = scheduled[0]
    try:
        await ctx.exchanges.dispatch.publish(
            persistent_json(batch.model_dump_json().encode(), message_id=f"{first['id']}:{first['attempt']}"),
            routing_key=Names.worker_routing_key(worker),
            mandatory=True,
        )
    except aiormq.exceptions.PublishError:
        reason, kind, counts = "dispatch returned: the worker's queue does not exist", "dispatch_returned", True
    except Exception as exc:  # noqa: BLE001 - any failure to hand over means: not dispatched
        # The broker went away mid-publish; not the executions' fault, so it costs no dispatch.
        reason, kind, counts = f"dispatch failed: {exc}", "broker_unavailable", False
    else:
        for s in scheduled:
            log.info("execution_scheduled", execution_id=str(s["id"]), worker=worker, attempt=s["attempt"])
        return []
    # Safe even if the dispatch did arrive: the worker's claim is fenced by the attempt we move past.
    schedule_attempts = ctx.settings.executor.max_schedule_attempts
    failed = []
    for s in scheduled:
        log.warning("dispatch_failed", reason=reason, execution_id=str(s["id"]), worker=worker, attempt=s["attempt"])
        _, row = await reschedule_or_fail(
            ctx.pool,
            {"id": s["id"], "attempt": s["attempt"], "schedule_attempts": s["schedule_attempts"]},
            max_schedule_attempts=schedule_attempts,
            reason=reason,
            kind=kind,
            counts=counts,
            error={
                "error": f"no worker could be reached after {schedule_attempts} dispatches: {reason}",
                "failed_by": "scheduler",
                "attempts": schedule_attempts,
            },
        )
        if row is not None:
            failed.append(row)
    ctx.wake.set()
    return failed
