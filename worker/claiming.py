"""Receiving and claiming. A dispatch message carries the executions one scheduling pass placed
here; each waits in the inbox, its message unacked, until a slot is free; the fenced claim
(`scheduled` -> `running`) then makes it PostgreSQL's. A message is acked once every dispatch it
carried has been claimed (or found stale), and what was claimed is started. What the inbox holds
is what a drain or a stand-down hands back: the messages not yet settled, which the dead-letter
handler takes one dispatch at a time (those already claimed are stale there)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common import amqp, db, metrics
from common.best_effort import best_effort
from common.deadline import within
from common.errors import describe, describe_invalid
from common.queries import executions as q
from common.retry import DATABASE_ERRORS
from common.schemas import Assignment, Dispatch, DispatchBatch
from worker import recording
from worker.state import Delivery, WorkerState


async def on_message(state: WorkerState, message: AbstractIncomingMessage) -> None:
    # (While its pools do not answer, a dispatch waits here to be handed back once the row says
    # `draining`: behind an `active` row, the executor would take a hand-back for a forgery.)
    if state.draining or state.stood_down:
        await best_effort("hand_back_dispatch", message.reject(requeue=False), worker=state.name)
        return
    try:
        batch = DispatchBatch.model_validate_json(message.body)
    except ValidationError as exc:
        state.log.error(
            "dispatch_invalid", error=describe_invalid(exc, root="message"), message_id=amqp.property_text(message.message_id)
        )
        # A dead channel redelivers it; it is rejected again.
        await best_effort("reject_dispatch", message.reject(requeue=False), worker=state.name)
        return
    delivery = Delivery(message, len(batch.dispatches))
    state.inbox.extend((dispatch, delivery) for dispatch in batch.dispatches)
    state.mail.set()


def taking_work(state: WorkerState) -> bool:
    """Whether this worker claims what it is dispatched: not while it drains, while it stands
    down, or while its pools do not answer (`pool_watch`)."""
    return not (state.draining or state.stood_down or state.pools_out)


async def claim_loop(state: WorkerState) -> None:
    while not state.draining:
        await state.resumed.wait()
        await state.slots.acquire()
        while not state.inbox and not state.draining:
            state.mail.clear()
            await state.mail.wait()
        if not taking_work(state):
            state.slots.release()
            continue
        state.claiming = True
        try:
            batch = [state.inbox.popleft()]
            while state.inbox and not state.slots.locked():
                await state.slots.acquire()  # free: returns at once
                batch.append(state.inbox.popleft())
            await _claim(state, batch)
        finally:
            state.claiming = False


async def _claim(state: WorkerState, batch: list[tuple[Dispatch, Delivery]]) -> None:
    # Each attempt named is tried: which one is current is the row's to say, never the messages'
    # (anyone may publish a dispatch naming a later attempt, and the real one must not give way).
    dispatches: dict[tuple[uuid.UUID, int], Dispatch] = {}
    later: list[Dispatch] = []
    for dispatch, _ in batch:
        key = (dispatch.execution_id, dispatch.attempt)
        running_attempt = state.running_attempts.get(dispatch.execution_id)
        if running_attempt is not None and dispatch.attempt > running_attempt:
            # The next attempt (a retry, a wake-up), placed here before this worker let go of the
            # one before (its outcome committed, its task not yet released): it waits for that,
            # its message settled below with the rest (the row, not the message, is what counts:
            # should this process die first, the row is handed back as any unclaimed one is).
            later.append(dispatch)
            continue
        if key in dispatches or running_attempt is not None:  # a redelivery
            state.log.info("dispatch_stale", execution_id=str(dispatch.execution_id), attempt=dispatch.attempt, twin=True)
            continue
        dispatches[key] = dispatch
    ordered = [dispatches[key] for key in sorted(dispatches)]  # one lock order: no deadlocks
    ids, attempts = [d.execution_id for d in ordered], [d.attempt for d in ordered]
    call = asyncio.ensure_future(
        db.until_available(lambda: claim_rows(state.hot_pool, ids, attempts, state.name, state.incarnation), what="claim")
        if ordered else _nothing()
    )
    abandoned = asyncio.ensure_future(state.abandon_claim.wait())
    try:
        await asyncio.wait({call, abandoned}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        abandoned.cancel()
        if not call.done():
            call.cancel()  # unwinds on its own (a query in flight is cancelled on the server) ...
            call.add_done_callback(lambda task: _collect(state, task))  # ... and how it ended is read
    if not call.done() or call.cancelled():
        # A drain stopped waiting: the messages go back to the inbox, which it hands back, and
        # what the claim may have committed unseen it puts back in line (`unclaim_abandoned`).
        state.inbox.extendleft(reversed(batch))
        state.abandoned.extend(zip(ids, attempts, strict=True))
        state.abandoned_calls.add(call)
        for _ in batch:  # claimed again, if at all, after a slot is taken again
            state.slots.release()
        return
    rows = call.result()
    for dispatch in later:
        if dispatch.execution_id in state.running:
            state.deferred.setdefault(dispatch.execution_id, []).append((dispatch, Delivery(None, 1)))
        else:
            # The run before it was let go of while this claim was under way (a cancel, say):
            # deferred now, nothing would ever release it. It goes straight back to the inbox.
            state.inbox.append((dispatch, Delivery(None, 1)))
            state.mail.set()
    # What runs is what PostgreSQL recorded, never what the message says.
    claimed = {
        r["id"]: Assignment(
            execution_id=r["id"], attempt=r["attempt"], action_ref=r["action_ref"],
            parameters=r["parameters"], timeout_s=r["timeout_s"], failed_tries=r["failed_tries"],
            max_retries=r["max_retries"],
        )
        for r in rows
    }
    settled = []
    for _, delivery in batch:
        delivery.pending -= 1
        if delivery.pending == 0 and delivery.message is not None:
            settled.append(delivery.message)
    # Dispatches are claimed in the order they arrived, so messages settle in delivery order too
    # (what `ack_all`'s one cumulative ack per channel relies on).
    await amqp.ack_all(settled)
    for execution_id, attempt in dispatches:
        fields = {"execution_id": str(execution_id), "attempt": attempt}
        assignment = claimed.get(execution_id)
        if assignment is not None and assignment.attempt == attempt and execution_id not in state.running:
            state.log.info("execution_started", action_ref=assignment.action_ref, **fields)
            state.idle.clear()
            state.running[execution_id] = asyncio.create_task(recording.run_one(state, assignment))
            state.running_attempts[execution_id] = attempt
        else:
            state.log.info("dispatch_stale", **fields)
    for _ in range(len(batch) - len(claimed)):
        state.slots.release()


async def _nothing() -> list[asyncpg.Record]:
    return []


def _collect(state: WorkerState, task: asyncio.Future[list[asyncpg.Record]]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        state.log.info("abandoned_claim_ended", error=describe(error))


async def claim_rows(
    pool: asyncpg.Pool, ids: list[uuid.UUID], attempts: list[int], worker: str, incarnation: uuid.UUID
) -> list[asyncpg.Record]:
    """The fenced claim of these dispatches: the rows this process may run, with what to run.
    Idempotent: what an earlier try claimed (its commit unacknowledged) comes back too."""
    rows = await pool.fetch(q.CLAIM, ids, attempts, worker, incarnation)
    if len(rows) == len(ids):
        return rows
    claimed = {r["id"] for r in rows}
    rest = [(i, a) for i, a in zip(ids, attempts, strict=True) if i not in claimed]
    if not rest:  # two attempts of one execution: one matched, the other is stale
        return rows
    return rows + await pool.fetch(q.CLAIMED, [i for i, _ in rest], [a for _, a in rest], worker, incarnation)


def on_reconnected(state: WorkerState, _connection: object) -> None:
    """The broker connection is back, its consumer restored: hand back, in the background, what
    is still `scheduled` here (`hand_back_unclaimed`)."""
    task = asyncio.create_task(
        best_effort("hand_back_unclaimed", hand_back_unclaimed(state, "the worker's broker connection came back"),
                    worker=state.name)
    )
    state.hand_backs.add(task)
    task.add_done_callback(state.hand_backs.discard)


def dispatches_may_be_lost(state: WorkerState) -> bool:
    """Whether a broker restart may drop this worker's dispatches: classic queues keep transient
    messages in memory only, quorum queues keep every message (`executor.dispatching._dispatch`)."""
    return state.settings.message_queue.queue_type == "classic"


#: How long a hand-back waits out the database before leaving the rest to the scheduled-timeout
#: monitor.
HAND_BACK_MAX_WAIT_S = 60.0


async def hand_back_unclaimed(state: WorkerState, why: str) -> None:
    """Put back in line, at no cost, what was dispatched to this worker's name and not yet
    claimed: dispatch messages are transient, so a broker restart (``why``: one that may have
    happened since) may have dropped some; the executor places these again. A dispatch that
    survived then arrives stale, and one being claimed meanwhile is either claimed or handed
    back, never both: each is a compare-and-set from `scheduled`."""
    data = {"reason": f"{why}: dispatches not yet claimed may have been lost"}
    try:
        rows = await db.until_available(
            lambda: state.pool.fetch(q.HAND_BACK_UNCLAIMED, state.name, data),
            what="hand_back_unclaimed",
            max_wait_s=HAND_BACK_MAX_WAIT_S,
        )
    except DATABASE_ERRORS as exc:
        state.log.warning("unclaimed_hand_back_failed", error=describe(exc))
        return
    for row in rows:
        state.log.info(
            "execution_rescheduled", kind="unclaimed_hand_back", execution_id=str(row["id"]), attempt=row["attempt"]
        )
    metrics.RESCHEDULES.labels("unclaimed_hand_back").inc(len(rows))
    state.log.info("unclaimed_handed_back", executions=len(rows), reason=why)


async def hand_back(state: WorkerState) -> int:
    """Reject every dispatch message not yet settled (dead-lettered at once; the executor
    reschedules what in it is still `scheduled` on another worker). Returns the dispatches
    handed back."""
    messages: dict[int, AbstractIncomingMessage] = {}
    handed_back = 0
    for waiting in state.deferred.values():
        state.inbox.extend(waiting)
    state.deferred.clear()
    while state.inbox:
        _, delivery = state.inbox.popleft()
        # No message: a deferred dispatch, settled already; its row, `scheduled` on a worker that no
        # longer takes work, goes back in line by the executor's sweeper.
        if delivery.message is not None:
            messages[id(delivery.message)] = delivery.message
        handed_back += 1
    for message in messages.values():
        await best_effort("hand_back_dispatch", message.reject(requeue=False), worker=state.name)
    if handed_back:
        state.log.info("dispatches_handed_back", count=handed_back, messages=len(messages))
    return handed_back


#: How long a drain waits for the database to put back what an abandoned claim may have taken.
UNCLAIM_MAX_WAIT_S = 2.0


async def unclaim_abandoned(state: WorkerState) -> bool:
    """Put back in line, at no cost, what an abandoned claim committed unseen (fenced on this
    process). If the database is still away, the executor interrupts those runs once this process
    is gone, as it does a lost worker's. Whether it is settled: the claims have ended, and what
    they committed is back in line."""
    # One started here since (claimed again once the database answered) runs: it is not put back.
    state.abandoned[:] = [(i, a) for i, a in state.abandoned if i not in state.running]
    if not state.abandoned:
        return True
    # Until its cancel has reached the server the claim may still commit, after UNCLAIM looked.
    if state.abandoned_calls:
        await asyncio.wait(state.abandoned_calls, timeout=UNCLAIM_MAX_WAIT_S)
    ended = all(call.done() for call in state.abandoned_calls)  # before UNCLAIM looks, not after
    ids, attempts = [i for i, _ in state.abandoned], [a for _, a in state.abandoned]
    data = {"reason": "the worker stopped before starting it (its claim was held up by the database)"}
    try:
        # Bounded as a whole: asyncpg's own timeout bounds the query, not getting a connection or
        # giving it back after a cancel.
        rows = await within(
            state.pool.fetch(q.UNCLAIM, ids, attempts, state.name, state.incarnation, data), UNCLAIM_MAX_WAIT_S,
            what="unclaim_abandoned",
        )
    except DATABASE_ERRORS as exc:  # a timeout among them
        state.log.warning("unclaim_failed", executions=len(ids), error=describe(exc))
        return False
    for row in rows:
        state.log.info("execution_rescheduled", kind="abandoned_claim", execution_id=str(row["id"]), attempt=row["attempt"])
    metrics.RESCHEDULES.labels("abandoned_claim").inc(len(rows))
    return ended
