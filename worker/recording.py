"""Running a claimed assignment and recording what became of it: its outcome, in batches, fenced
on the attempt and this incarnation, then announced; or, if it is cancelled, its interruption.
A run's slot is freed only once what became of it has been recorded (or given up on)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import asyncpg

from common import db, metrics
from common.deadline import within
from common.errors import describe
from common.interruption import interrupt
from common.notifications import publish_terminal
from common.queries import executions as q
from common.queries import workflows as wfq
from common.recovery import InterruptReason, resolve_policy
from common.retry import DATABASE_ERRORS
from common.schemas import TERMINAL_STATUSES, Assignment
from worker import durable
from worker.runner import Outcome, execute, with_retry
from worker.state import WorkerState


async def run_one(state: WorkerState, dispatch: Assignment) -> None:
    action = state.actions.get(dispatch.action_ref)
    outcome: Outcome | None
    try:
        if action is not None and action.workflow is not None:
            outcome = await durable.run(state, dispatch, action)
        else:
            outcome = await execute(
                action,
                dispatch,
                default_timeout_s=state.cfg.task_timeout_s,
                max_output_bytes=state.cfg.max_output_bytes,
                max_timeout_s=state.cfg.max_task_timeout_s,
            )
    except asyncio.CancelledError:
        if dispatch.execution_id in state.stopped:
            state.stopped.discard(dispatch.execution_id)
            state.log.info("execution_stopped", execution_id=str(dispatch.execution_id), attempt=dispatch.attempt)
        else:
            reason, error = state.cancel_reason
            try:
                await _interrupt(state, dispatch, reason=reason, error=error)
            finally:  # a second cancel while interrupting: the slot is still given back
                _release(state, dispatch.execution_id)
            raise
        _release(state, dispatch.execution_id)
        raise
    except Exception as exc:  # the worker's own machinery, not the action (its errors are outcomes)
        # An outage that outlasted the retries, say. The run must not stay `running` here with
        # nothing running it: it is interrupted, and recovery decides by its policy.
        state.log.exception(
            "execution_crashed", error=describe(exc), execution_id=str(dispatch.execution_id),
            attempt=dispatch.attempt,
        )
        try:
            await _interrupt(
                state, dispatch, reason="worker_lost", error=f"the worker failed while running it: {describe(exc)}"
            )
        finally:  # a cancel while interrupting (a drain's deadline): the slot is still given back
            _release(state, dispatch.execution_id)
        return
    if outcome is None:  # suspended, or no longer this worker's: nothing more to record here
        _release(state, dispatch.execution_id)
        return
    if action is not None:
        outcome = with_retry(outcome, action, dispatch, random.random())
    await state.outcomes.put((dispatch, outcome))


async def stop_if_moved_on(state: WorkerState, execution_ids: list[uuid.UUID], *, timeout_s: float = 5.0) -> None:
    """Stop the runs among these that the database says no longer run here (cancelled by an
    operator, say): within a moment of the change, not at their end."""
    # The runs asked about: while the check is under way one may end and the execution's next
    # attempt start here (a workflow woken, a retry), and that one is not what was checked.
    asked = {i: (state.running[i], state.running_attempts[i]) for i in execution_ids if i in state.running}
    if not asked:
        return
    try:
        rows = await state.pool.fetch(
            wfq.NO_LONGER_MINE, list(asked), [attempt for _, attempt in asked.values()], state.name,
            state.incarnation, timeout=timeout_s,
        )
    except DATABASE_ERRORS as exc:
        state.log.warning("control_check_failed", error=describe(exc))
        return
    for row in rows:
        task = asked[row["id"]][0]
        # (One being cancelled already, by a stand-down or a drain, is on its way out: a second
        # cancel would only cut its fenced interruption short.)
        if state.running.get(row["id"]) is task and not task.done() and not task.cancelling():
            state.stopped.add(row["id"])
            state.log.warning("execution_stopping", execution_id=str(row["id"]), status=row["status"])
            task.cancel()


#: How long a run's interruption waits for the database, as a whole (getting a connection
#: included): a drain or a stand-down waits for it.
INTERRUPT_TIMEOUT_S = 4.0


async def _interrupt(state: WorkerState, dispatch: Assignment, *, reason: InterruptReason, error: str) -> None:
    """Fenced: only if the run is still this worker's at this attempt. If the database cannot be
    reached, the executor interrupts it instead once this worker is declared lost."""
    action = state.actions.get(dispatch.action_ref)
    policy = resolve_policy(action.spec if action else None, state.settings.recovery)
    fields = {"execution_id": str(dispatch.execution_id), "attempt": dispatch.attempt, "reason": reason}

    async def record() -> dict[str, Any] | None:
        recovery_attempts = await state.pool.fetchval(q.RECOVERY_ATTEMPTS, dispatch.execution_id)
        return await interrupt(
            state.pool,
            execution_id=dispatch.execution_id,
            attempt=dispatch.attempt,
            worker=state.name,
            incarnation=state.incarnation,
            reason=reason,
            error=error,
            policy=policy,
            recovery_attempts=recovery_attempts or 0,
        )

    try:
        event = await within(record(), INTERRUPT_TIMEOUT_S, what="record_interruption")
    except DATABASE_ERRORS as exc:
        # The executor interrupts it instead, once it declares this worker lost.
        state.log.warning("interrupt_not_recorded", error=describe(exc), **fields)
        return
    if event is not None:
        state.log.warning("execution_interrupted", **fields)
    else:  # fenced: the run had moved on (recovered elsewhere, or already finished)
        state.log.info("interrupt_fenced", **fields)


def _release(state: WorkerState, execution_id: uuid.UUID) -> None:
    state.stopped.discard(execution_id)  # whatever stopped this run, the next one here is not stopped
    if state.running.pop(execution_id, None) is not None:
        state.running_attempts.pop(execution_id, None)
        state.slots.release()
    waiting = state.deferred.pop(execution_id, None)
    if waiting:
        state.inbox.extend(waiting)
        state.mail.set()
    if not state.running:
        state.idle.set()


async def finish_loop(state: WorkerState) -> None:
    while True:
        batch = [await state.outcomes.get()]
        while not state.outcomes.empty():
            batch.append(state.outcomes.get_nowait())
        try:
            await _record(state, batch)
        finally:
            for dispatch, _ in batch:
                _release(state, dispatch.execution_id)
                state.outcomes.task_done()


async def _finish(state: WorkerState, batch: list[tuple[Assignment, Outcome]]) -> list[asyncpg.Record]:
    batch = sorted(batch, key=lambda item: item[0].execution_id)  # rows locked in one order: no deadlocks
    return await db.until_available(
        lambda: finish_rows(
            state.hot_pool,
            [d.execution_id for d, _ in batch],
            [d.attempt for d, _ in batch],
            ["retry" if o.retry_in_s is not None else o.status for _, o in batch],
            [json.dumps(o.result) if o.result is not None else None for _, o in batch],
            [json.dumps(o.error) if o.error is not None else None for _, o in batch],
            state.name,
            state.incarnation,
            [o.retry_in_s for _, o in batch],
        ),
        what="record_outcomes",
    )


async def finish_rows(
    pool: asyncpg.Pool,
    ids: list[uuid.UUID],
    attempts: list[int],
    statuses: list[str],
    results: list[str | None],
    errors: list[str | None],
    worker: str,
    incarnation: uuid.UUID,
    retry_in_s: list[float | None],
) -> list[asyncpg.Record]:
    """The fenced finish of these outcomes (status `retry`: back to `requested` after its delay);
    returns the rows recorded. Idempotent: what an earlier try recorded (its commit
    unacknowledged) comes back too, so that its one notification is still published."""
    rows = await pool.fetch(q.FINISH, ids, attempts, statuses, results, errors, worker, incarnation, retry_in_s)
    if len(rows) == len(ids):
        return rows
    recorded = {r["id"] for r in rows}
    rest = [(i, a, s) for i, a, s in zip(ids, attempts, statuses, strict=True) if i not in recorded]
    return rows + await pool.fetch(
        q.FINISHED, [i for i, _, _ in rest], [a for _, a, _ in rest], [s for _, _, s in rest], worker, incarnation
    )


async def _record(state: WorkerState, batch: list[tuple[Assignment, Outcome]]) -> None:
    try:
        rows = await _finish(state, batch)
    except asyncpg.exceptions.DataError:
        # Something PostgreSQL refuses to store (a NUL in a string): one by one, so that only
        # the offending outcome is replaced by a failure that says why.
        rows = []
        for dispatch, outcome in batch:
            try:
                rows += await _finish(state, [(dispatch, outcome)])
            except asyncpg.exceptions.DataError as exc:
                unstorable = Outcome(
                    "failed", error={"error": f"the outcome cannot be stored: {describe(exc)}", "failed_by": "worker"}
                )
                rows += await _finish(state, [(dispatch, unstorable)])
    recorded = {r["id"] for r in rows}
    for dispatch, outcome in batch:
        fields = {"execution_id": str(dispatch.execution_id), "attempt": dispatch.attempt}
        if dispatch.execution_id not in recorded:
            # Fencing: the execution moved on (recovered elsewhere); this late outcome is dropped.
            state.log.warning("outcome_fenced", status=outcome.status, **fields)
        elif outcome.retry_in_s is not None:
            metrics.FINISHED.labels("retrying").inc()
            state.log.warning(
                "execution_retrying", error=(outcome.error or {}).get("error"), try_number=dispatch.failed_tries + 1,
                retry_in_s=round(outcome.retry_in_s, 3), **fields,
            )
        elif outcome.status == "completed":
            metrics.FINISHED.labels("completed").inc()
            state.log.info("execution_completed", **fields)
        else:
            metrics.FINISHED.labels(outcome.status).inc()
            event = "execution_timeout" if outcome.status == "timeout" else "execution_failed"
            state.log.warning(event, error=(outcome.error or {}).get("error"), **fields)
    await publish_terminal(state.exchanges.notifications, [r for r in rows if r["status"] in TERMINAL_STATUSES])
