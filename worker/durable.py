"""Running a workflow on this worker: its journal in PostgreSQL, replay from its checkpoints, and
what becomes of the run: an outcome for the finisher to record, or nothing more to record here
(it suspended, or it is no longer this worker's).

Every write goes through a fenced statement (`common.queries.workflows`): a zombie worker, one
that was paused or partitioned while its run was recovered elsewhere, records nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from common import db
from common.actions import CORE_ACTIONS
from common.errors import describe
from common.queries import workflows as wq
from common.retry import TRANSIENT_ERRORS
from common.schemas import Assignment
from worker.context import WorkflowContext, bind, unbind
from worker.journal import (
    ChildState,
    Fenced,
    Journal,
    Recorded,
    StepFailed,
    StepWrite,
    Suspend,
    TransientJournal,
)
from worker.registry import RegisteredAction
from worker.replay import NonDeterminismError, Replay, StepRecord
from worker.runner import Outcome, bounded_result, error_object, failure, parse_parameters, resolve_timeout_s
from worker.state import WorkerState

_T = TypeVar("_T")


class _UnknownAction(Exception):
    """Raised inside the child's transaction to roll its pending step back."""


class JournalUnavailable(Exception):
    """The run's journal stayed out of reach for longer than the worker waits for PostgreSQL: an
    infrastructure failure, not the workflow's. It ends the run here as interrupted (recovery
    decides by its policy), never as the workflow's own failure."""


async def _journal(operation: Callable[[], Awaitable[_T]], *, what: str, max_wait_s: float = 300.0) -> _T:
    """A journal read or write, waiting out a database that is briefly away."""
    try:
        return await db.until_available(operation, what=what, max_wait_s=max_wait_s)
    except TRANSIENT_ERRORS as exc:
        raise JournalUnavailable(f"{what}: PostgreSQL stayed unreachable: {describe(exc)}") from exc


class PgJournal:
    """A durable run's journal: its steps, children and signals in PostgreSQL, fenced on the run."""

    durable = True

    def __init__(self, state: WorkerState, dispatch: Assignment) -> None:
        self.pool = state.pool
        self.execution_id = dispatch.execution_id
        self.fence = (dispatch.execution_id, dispatch.attempt, state.name, state.incarnation)

    def _args(self, w: StepWrite) -> tuple[Any, ...]:
        return (
            *self.fence, w.step_id, w.name, w.status, w.result, w.error, w.store_delta, w.attempts,
            w.started_at_s, w.event, w.data, w.wake_in_s, w.child_id,
        )

    async def record(self, write: StepWrite) -> Recorded:
        row = await _journal(lambda: self.pool.fetchrow(wq.CHECKPOINT, *self._args(write)), what="checkpoint")
        if row is None:
            raise Fenced(f"step {write.step_id} not recorded: the run is no longer this worker's")
        return Recorded(pause_requested=row["pause_requested"], wake_at_s=row["wake_at_s"])

    async def start_child(self, write: StepWrite, action_ref: str, parameters: dict[str, Any],
                          timeout_s: float | None) -> bool:
        async def attempt() -> bool:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    if await conn.fetchrow(wq.CHECKPOINT, *self._args(write)) is None:
                        raise Fenced("child not started: the run is no longer this worker's")
                    child = await conn.fetchrow(
                        wq.INSERT_CHILD, write.child_id, action_ref, parameters, timeout_s, self.execution_id,
                        action_ref in CORE_ACTIONS,
                    )
                    if child is None or not child["exists"]:
                        raise _UnknownAction(action_ref)
            except _UnknownAction:
                return False
            return True

        return await _journal(attempt, what="start_child")

    async def child(self, child_id: uuid.UUID) -> ChildState | None:
        row = await _journal(lambda: self.pool.fetchrow(wq.CHILD, child_id), what="read_child")
        return None if row is None else ChildState(row["status"], row["result"], row["error"])

    async def take_signal(self, write: StepWrite) -> tuple[bool, Any]:
        async def attempt() -> tuple[bool, Any]:
            async with self.pool.acquire() as conn, conn.transaction():
                taken = await conn.fetchrow(wq.TAKEN_SIGNAL, self.execution_id, write.data["signal"], write.step_id)
                if taken is not None:  # an earlier try committed the take with its checkpoint
                    return True, taken["data"]
                signal = await conn.fetchrow(wq.TAKE_SIGNAL, self.execution_id, write.data["signal"], write.step_id)
                if signal is None:
                    return False, None
                done = dataclasses.replace(write, result=signal["data"])
                if await conn.fetchrow(wq.CHECKPOINT, *self._args(done)) is None:
                    raise Fenced("signal not taken: the run is no longer this worker's")  # rolls the take back
                return True, signal["data"]

        return await _journal(attempt, what="take_signal")


async def run(state: WorkerState, dispatch: Assignment, action: RegisteredAction) -> Outcome | None:
    """Run (or replay) the workflow; None when there is nothing for the finisher to record."""
    spec = action.workflow
    assert spec is not None
    fields = {"execution_id": str(dispatch.execution_id), "attempt": dispatch.attempt}
    params = parse_parameters(action, dispatch.parameters)
    if isinstance(params, Outcome):
        return params
    kwargs = {n: getattr(params, n) for n in spec.param_names}
    kwargs.update(params.model_extra or {})

    journal: Journal
    if spec.durable:
        pg = journal = PgJournal(state, dispatch)
        run_timeout_s = dispatch.timeout_s or spec.timeout_s
        started = await _journal(
            lambda: state.pool.fetchrow(
                wq.START, *pg.fence, run_timeout_s, {"worker": state.name, "attempt": dispatch.attempt}
            ),
            what="start_workflow",
        )
        if started is None:
            state.log.info("workflow_fenced", at="start", **fields)
            return None
        records = await _journal(lambda: state.pool.fetch(wq.STEPS, dispatch.execution_id), what="read_steps")
        replay = Replay.of([StepRecord(**dict(r)) for r in records])
        remaining_s: float | None = started["remaining_s"]
        recovery_attempts = started["recovery_attempts"]
        clock_offset_s = started["db_now"] - time.time()
    else:
        journal, replay, recovery_attempts, clock_offset_s = TransientJournal(), Replay(), 0, 0.0
        remaining_s = resolve_timeout_s(
            dispatch.timeout_s, spec.timeout_s, state.cfg.task_timeout_s, state.cfg.max_task_timeout_s
        )
    ctx = WorkflowContext(
        execution_id=str(dispatch.execution_id), attempt=dispatch.attempt, recovery_attempts=recovery_attempts,
        journal=journal, replay=replay, max_inline_sleep_s=state.cfg.max_inline_sleep_s,
        clock_offset_s=clock_offset_s,
    )
    if replay.steps:
        state.log.info("workflow_replaying", recorded_steps=len(replay.steps), **fields)
    deadline = asyncio.timeout(remaining_s if remaining_s is None or remaining_s > 0 else 0)
    token = bind(ctx)
    try:
        try:
            async with deadline:
                if remaining_s is not None and remaining_s <= 0:
                    raise TimeoutError
                result = await spec.func(ctx, **kwargs)
        except BaseException:
            # Whatever ends the run here (a suspension, a failure, a cancel), no step of it goes
            # on running in a sibling task once its slot is given up.
            ctx.closed = True
            await ctx.stop_in_flight()
            raise
        replay.check_finished(ctx.steps_called)
        changes = ctx.store._take_changes()
        if changes and isinstance(journal, PgJournal):
            await _journal(lambda: state.pool.fetchrow(wq.SAVE_STORE, *journal.fence, changes), what="save_store")
    except Suspend as suspension:
        await _suspend(state, dispatch, suspension, fields)
        return None
    except Fenced:
        state.log.warning("workflow_fenced", at="step", **fields)
        return None
    except NonDeterminismError as exc:
        return Outcome("failed", error=error_object(str(exc), kind="non_determinism"))
    except TimeoutError as exc:
        if deadline.expired() or (remaining_s is not None and remaining_s <= 0):
            whole = dispatch.timeout_s or spec.timeout_s
            return Outcome("timeout", error=error_object(
                f"workflow ran past its deadline ({whole:g} s for the whole run, across suspensions and recoveries)"
                if spec.durable and whole else f"workflow ran longer than its timeout of {remaining_s:g} s",
                timeout_seconds=whole or remaining_s,
            ))
        return failure(exc)
    except StepFailed as exc:
        return Outcome("failed", error={**exc.error, "failed_by": "workflow"})
    except JournalUnavailable:
        raise  # the worker's failure, not the workflow's: the run is interrupted (recording.run_one)
    except Exception as exc:  # noqa: BLE001 - the workflow's own failure is its execution's outcome
        return failure(exc)
    finally:
        ctx.closed = True
        unbind(token)
    return bounded_result(result, state.cfg.max_output_bytes)


async def suspend_run(pool: asyncpg.Pool, fence: tuple[Any, ...], suspension: Suspend) -> str | None:
    """Record that the run (``fence``: id, attempt, worker, incarnation) leaves its worker; returns
    the status it now has (`requested` if what it waits for is already there), or None if fenced."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(wq.LOCK_FOR_SUSPEND, fence[0], suspension.child_id)
        status: str | None = await conn.fetchval(
            wq.SUSPEND, *fence, suspension.status, suspension.wake_at_s, suspension.child_id, suspension.signal,
        )
        return status


async def _suspend(state: WorkerState, dispatch: Assignment, suspension: Suspend, fields: dict[str, Any]) -> None:
    fence = (dispatch.execution_id, dispatch.attempt, state.name, state.incarnation)
    status = await _journal(lambda: suspend_run(state.pool, fence, suspension), what="suspend")
    if status is None:
        state.log.warning("workflow_fenced", at="suspend", **fields)
        return
    state.log.info(
        "workflow_suspended", status=status, wake_at_s=suspension.wake_at_s,
        child=str(suspension.child_id) if suspension.child_id else None, signal=suspension.signal, **fields,
    )
