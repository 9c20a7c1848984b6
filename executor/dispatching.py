"""Placing executions on live workers and handing the dispatches over, for the two callers that
place: the scheduler (a backlog of `requested` rows) and intake (the requests it is recording,
recorded `scheduled` in the same statement, when nothing older waits).

What is placed is recorded `scheduled` (worker, attempt+1) and committed before any dispatch is
published, so a worker never sees a dispatch its claim would not match. Publishing does not hold
up the caller: the broker's confirm of a persistent dispatch can take as long as its disk, so each
hand-over runs in the background (`ExecutorContext.handovers`), and a stopping executor waits for
them. What a hand-over cannot send, it puts back in line itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import aiormq.exceptions
import asyncpg

from common.actions import ActionSpec
from common.amqp import Names, transient_json
from common.db import Executor
from common.errors import describe
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.queries import workers as wq
from common.retry import DATABASE_ERRORS
from common.schemas import MAX_DISPATCHES_PER_MESSAGE, Dispatch, DispatchBatch
from executor.placement import Candidate, concurrency_limits, place
from executor.requests import NewExecution
from executor.rescheduling import reschedule_or_fail

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.dispatching")

#: How long a stopping executor waits for the dispatches it is still publishing.
HANDOVER_TIMEOUT_S = 10.0


async def live_candidates(ctx: ExecutorContext, conn: Executor) -> list[Candidate]:
    """The live workers, with what each serves and how much it already holds."""
    return _candidates(await conn.fetch(wq.ELIGIBLE, ctx.settings.executor.heartbeat_staleness_multiplier))


def _candidates(rows: list[asyncpg.Record]) -> list[Candidate]:
    return [Candidate(r["name"], frozenset(r["actions"]), r["max_concurrent_tasks"], r["outstanding"]) for r in rows]


async def mark_scheduled(
    conn: Executor, plan: Mapping[Hashable, str], attempts: Mapping[Hashable, int]
) -> list[asyncpg.Record]:
    """Record a placement (execution id -> worker), fenced on each row's current attempt."""
    return await conn.fetch(q.MARK_SCHEDULED, list(plan), list(plan.values()), [attempts[i] for i in plan])


async def place_new(
    ctx: ExecutorContext, executions: Sequence[NewExecution], specs: Mapping[str, ActionSpec]
) -> tuple[dict[uuid.UUID, str], bool]:
    """Where to place requests intake is about to record (they are recorded `scheduled` there, in
    the same statement: `INSERT_REQUESTS`): those due now (not delayed) whose action has no
    concurrency limit (the scheduler counts those under its locks) and no executions waiting to be
    placed (they go behind those), on live workers with room. Returns the placement, and whether
    any of the others it could place were not (those are recorded `requested`, for the
    scheduler). The caller holds `ExecutorContext.placing`."""
    limited = concurrency_limits(
        {e.action_ref for e in executions if e.action_ref}, ctx.settings.executor.max_concurrency,
        {a: spec.max_concurrency for a, spec in specs.items()},
    )
    placeable = [
        e for e in executions
        if e.status == "requested" and e.not_before is None and e.action_ref and e.action_ref not in limited
    ]
    if not placeable:
        return {}, False
    actions = sorted({e.action_ref for e in placeable if e.action_ref})
    rows = await ctx.hot_pool.fetch(q.ELIGIBLE_WITH_WAITING, ctx.settings.executor.heartbeat_staleness_multiplier, actions)
    waiting = set(rows[0]["waiting"]) if rows else set()
    placeable = [e for e in placeable if e.action_ref not in waiting]
    plan = place([(e.id, e.action_ref or "", None) for e in placeable], _candidates(rows), ctx.settings.executor.dispatch_pipeline)
    return cast(dict[uuid.UUID, str], plan), len(plan) < len(placeable)


def hand_over(ctx: ExecutorContext, scheduled: list[asyncpg.Record]) -> None:
    """Publish these committed placements in the background."""
    if not scheduled:
        return
    task = asyncio.create_task(_hand_over(ctx, scheduled))
    ctx.handovers.add(task)
    task.add_done_callback(lambda done: _handed_over(done, ctx.handovers))


async def finish_handovers(ctx: ExecutorContext) -> None:
    """Let the dispatches under way be sent: a stopping executor hands over what it placed."""
    if ctx.handovers:
        await asyncio.wait(set(ctx.handovers), timeout=HANDOVER_TIMEOUT_S)


def _handed_over(task: asyncio.Task[None], handovers: set[asyncio.Task[None]]) -> None:
    """Forget a finished handover; log what it did not expect (its executions stay `scheduled`,
    and the scheduled-timeout monitor moves them on)."""
    handovers.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("dispatch_handover_failed", error=describe(exc))


async def _hand_over(ctx: ExecutorContext, scheduled: list[asyncpg.Record]) -> None:
    """Publish one placement's dispatches, a message per worker, and announce what could not be
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
    except DATABASE_ERRORS as exc:
        # The database went away while rescheduling what could not be sent: those executions stay
        # `scheduled`, and the scheduled-timeout monitor moves them on.
        log.warning("dispatch_handover_failed", error=describe(exc), executions=len(scheduled))
        return
    await publish_terminal(ctx.exchanges.notifications, [row for rows in outcomes for row in rows])


async def _dispatch(ctx: ExecutorContext, worker: str, scheduled: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """Publish one worker's dispatches from this placement as one message; if it cannot be handed
    over, reschedule each of them (returns the rows that this failed instead)."""
    batch = DispatchBatch(dispatches=[Dispatch(execution_id=s["id"], attempt=s["attempt"]) for s in scheduled])
    first = scheduled[0]
    try:
        await ctx.exchanges.dispatch.publish(
            # Transient: the row is the record and the message only its wake-up call. A broker
            # restart that drops it is made good by the worker, which hands back what is still
            # `scheduled` on it once its connection is back (`worker.claiming.hand_back_unclaimed`).
            transient_json(batch.model_dump_json().encode(), message_id=f"{first['id']}:{first['attempt']}"),
            routing_key=Names.worker_routing_key(worker),
            mandatory=True,
        )
    except aiormq.exceptions.PublishError:
        reason, kind, counts = "dispatch returned: the worker's queue does not exist", "dispatch_returned", True
    except Exception as exc:  # noqa: BLE001 - any failure to hand over means: not dispatched
        # The broker went away mid-publish; not the executions' fault, so it costs no dispatch.
        reason, kind, counts = f"dispatch failed: {describe(exc)}", "broker_unavailable", False
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
    ctx.backlog = True
    ctx.wake.set()
    return failed
