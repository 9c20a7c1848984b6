"""Placing and dispatching, as the scheduler's passes and intake both do it.

`room` reads what there is room for now: the live workers with what each has outstanding, and
each limited action's concurrency room (under a lock per limited action, held until the caller's
transaction commits, so that two executors never both fill the same room); `place_new` places
intake's new requests with it. Once the placement has committed, `hand_over` publishes the
dispatches in the background, one message per worker: a worker can never see a dispatch its claim
would not match, and the caller does not wait for the broker's confirms. What cannot be handed over is put back in line (or failed, once its dispatches run out).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, cast

import aiormq.exceptions
import asyncpg

from common.amqp import Names, persistent_json
from common.db import Executor
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.queries import workers as wq
from common.retry import TRANSIENT_ERRORS
from common.schemas import MAX_DISPATCHES_PER_MESSAGE, Dispatch, DispatchBatch, RecordedRequest
from executor.placement import Candidate, concurrency_room, limited_room, place, room_by_action
from executor.rescheduling import reschedule_or_fail
from executor.resilience import describe

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.dispatching")

#: What rescheduling an undeliverable dispatch may run into: the database away, or refusing.
_DB_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, asyncpg.PostgresError)
#: How long a stopping executor waits for the dispatches it is still publishing.
HANDOVER_TIMEOUT_S = 10.0

class Placed(TypedDict):
    """A placed execution, as the hand-over reads it."""

    id: uuid.UUID
    attempt: int
    worker: str
    schedule_attempts: int


def placed(row: asyncpg.Record | RecordedRequest) -> Placed:
    """What the hand-over needs of a row placed by a pass or by intake."""
    worker = row["worker"]
    assert worker is not None, "only a placed execution is handed over"
    return Placed(id=row["id"], attempt=row["attempt"], worker=worker, schedule_attempts=row["schedule_attempts"])


@dataclass
class Room:
    """What may be placed now, as read inside the placing transaction."""

    candidates: list[Candidate]
    by_action: dict[str, int]  # actions with room, and how much (an upper bound; `place` decides)
    caps: dict[str, int]  # limited actions: how many more their limits allow


async def room(ctx: ExecutorContext, conn: Executor) -> Room:
    """The live workers and the room for each action, concurrency limits applied."""
    cfg = ctx.settings.executor
    candidates = [
        Candidate(r["name"], frozenset(r["actions"]), r["max_concurrent_tasks"], r["outstanding"])
        for r in await conn.fetch(wq.ELIGIBLE, cfg.heartbeat_staleness_multiplier)
    ]
    by_action = room_by_action(candidates, cfg.dispatch_pipeline)
    caps = await _concurrency_caps(ctx, conn, by_action) if by_action else {}
    return Room(candidates, limited_room(by_action, caps), caps)


async def _concurrency_caps(ctx: ExecutorContext, conn: Executor, room: dict[str, int]) -> dict[str, int]:
    """How many more of each limited action may be placed: its limit (YAML
    `executor.max_concurrency`, else the action's `max_concurrency`) less what is dispatched or
    running. The count is taken under a lock per limited action, held until the caller commits."""
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


async def place_new(ctx: ExecutorContext, conn: Executor, new: Sequence[tuple[uuid.UUID, str]]) -> dict[uuid.UUID, str]:
    """Where each new request ``(id, action_ref)`` goes now, if anywhere: as a scheduling pass
    would place it, except that an action with executions already waiting to be placed keeps its
    order (its new requests wait behind them, for the next pass)."""
    now = await room(ctx, conn)
    actions = {action_ref for _, action_ref in new if action_ref in now.by_action}
    if not actions:
        return {}
    waiting = {r["ref"] for r in await conn.fetch(q.ACTIONS_WAITING, list(actions))}
    plan = place(
        [(execution_id, action_ref, None) for execution_id, action_ref in new if action_ref in actions - waiting],
        now.candidates, ctx.settings.executor.dispatch_pipeline, now.caps,
    )
    return {cast(uuid.UUID, execution_id): worker for execution_id, worker in plan.items()}


def hand_over(ctx: ExecutorContext, scheduled: Sequence[Placed]) -> None:
    """Publish committed placements in the background; a stopping executor waits for them
    (`finish_handovers`)."""
    if not scheduled:
        return
    task = asyncio.create_task(_hand_over(ctx, list(scheduled)))
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


async def _hand_over(ctx: ExecutorContext, scheduled: list[Placed]) -> None:
    """Publish the dispatches, a message per worker, and announce what could not be dispatched
    and failed for it."""
    by_worker: dict[str, list[Placed]] = {}
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


async def _dispatch(ctx: ExecutorContext, worker: str, scheduled: list[Placed]) -> list[asyncpg.Record]:
    """Publish one worker's dispatches as one message; if it cannot be handed over, reschedule
    each of them (returns the rows that this failed instead)."""
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

