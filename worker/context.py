"""``ctx``: what a workflow function is given, and how it runs, replays and records each step, timer,
child and signal. It decides without I/O: the records come from, and go to, its `Journal`."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import random
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from common.schemas import TERMINAL_STATUSES
from worker.journal import (
    ChildFailed,
    Fenced,
    Journal,
    Recorded,
    StepFailed,
    StepWrite,
    Suspend,
)
from worker.replay import (
    Replay,
    backoff_delay_s,
    remaining_attempts,
    timer_decision,
)

#: The workflow whose code is running in this task (None inside a step's own body, so that a step
#: calling another step function just calls it).
_current: contextvars.ContextVar[WorkflowContext | None] = contextvars.ContextVar("baton_workflow", default=None)


class Store:
    """``ctx.store``: JSON values by key, checkpointed with the next step the run records and
    restored, as of each step, when the run is replayed."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._changes: dict[str, Any] = {}

    async def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    async def set(self, key: str, value: Any) -> None:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ctx.store[{key!r}] must be a JSON value: {exc}") from None
        self._values[key] = value
        self._changes[key] = value

    def _pending_changes(self) -> dict[str, Any] | None:
        """The changes the next recorded step would carry, left in place."""
        return dict(self._changes) or None

    def _take_changes(self) -> dict[str, Any] | None:
        changes, self._changes = self._changes, {}
        return changes or None

    def _replayed(self, delta: dict[str, Any] | None) -> None:
        """A recorded step's changes: the store as it was right after that step."""
        self._values.update(delta or {})
        self._changes = {}


@dataclass(frozen=True)
class StepPolicy:
    retries: int = 0
    retry_delay_s: float = 1.0
    backoff: float = 2.0


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=20)[-4000:]}


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


class WorkflowContext:
    """What a workflow function is given as its first argument."""

    def __init__(
        self,
        *,
        execution_id: str,
        attempt: int,
        recovery_attempts: int,
        journal: Journal,
        replay: Replay,
        max_inline_sleep_s: float,
        clock_offset_s: float = 0.0,
    ) -> None:
        self.execution_id = execution_id
        self.attempt = attempt
        self.recovery_attempts = recovery_attempts
        self.store = Store()
        self._journal = journal
        self._replay = replay
        self._max_inline_sleep_s = max_inline_sleep_s
        self._clock_offset_s = clock_offset_s  # database clock minus this machine's
        self._steps_called = 0
        self.closed = False
        # The tasks running a step's own code now (branches of a gather among them): stopped when
        # the run leaves this worker, so that no step goes on running here without its slot.
        self._in_flight: set[asyncio.Task[Any]] = set()

    @property
    def is_replaying(self) -> bool:
        """True while the code is passing steps the run has already recorded."""
        return self._steps_called < self._replay.last_step_id

    @property
    def steps_called(self) -> int:
        return self._steps_called

    def _next_step_id(self) -> int:
        if self.closed:
            raise Fenced("the run has ended on this worker")
        self._steps_called += 1
        return self._steps_called

    def _db_now(self) -> float:
        return time.time() + self._clock_offset_s

    async def _record(self, write: StepWrite) -> Recorded:
        """Record through the journal; a step boundary, where a pause an operator asked for begins."""
        if self.closed:
            raise Fenced("the run has ended on this worker")
        recorded = await self._journal.record(write)
        if recorded.pause_requested:
            raise Suspend("paused")
        return recorded

    # -- steps ----------------------------------------------------------------------------------

    async def _run_step(
        self, step_id: int, name: str, policy: StepPolicy, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        record = self._replay.expect(step_id, name)
        if record is not None and record.status != "pending":
            self.store._replayed(record.store_delta)
            if record.status == "failed":
                raise StepFailed(step_id, name, record.error or {})
            return record.result
        first = record.attempts if record is not None else 1
        last = first + remaining_attempts(policy.retries, first) - 1
        started_at_s = time.time()
        attempt = first
        # This task is in flight from its first attempt to its last, retries' waits included: a run
        # that ends here meanwhile (a sibling in a gather failed, or suspended) stops it there.
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            while True:
                if self.closed:  # no attempt after the run has left this worker
                    raise Fenced("the run has ended on this worker")
                try:
                    result = await self._call(fn, args, kwargs)
                    _check_json(result, f"the result of step {name!r}")
                    break
                except Exception as exc:
                    error = {**_error(exc), "step": step_id, "name": name, "attempts": attempt}
                    if attempt >= last:
                        await self._record(StepWrite(
                            step_id, name, "failed", "step.failed",
                            {"step": step_id, "name": name, "attempts": attempt, "error": error["error"]},
                            error=error, attempts=attempt, started_at_s=started_at_s,
                            store_delta=self.store._take_changes(),
                        ))
                        raise StepFailed(step_id, name, {**error, "error": (
                            f"step {name!r} failed after {attempt} attempt{'s' if attempt > 1 else ''}: {error['error']}"
                        )}) from exc
                    delay_s = backoff_delay_s(policy.retry_delay_s, policy.backoff, attempt, random.random())
                    attempt += 1
                    await self._record(StepWrite(
                        step_id, name, "pending", "step.retrying",
                        {"step": step_id, "name": name, "attempt": attempt, "delay_s": round(delay_s, 3),
                         "error": error["error"]},
                        attempts=attempt, started_at_s=started_at_s,
                    ))
                    await _sleep(delay_s)
        finally:
            if task is not None:
                self._in_flight.discard(task)
        await self._record(StepWrite(
            step_id, name, "completed", "step.completed",
            {"step": step_id, "name": name, "attempts": attempt,
             "duration_ms": round((time.time() - started_at_s) * 1000, 3)},
            result=result, attempts=attempt, started_at_s=started_at_s, store_delta=self.store._take_changes(),
        ))
        return result

    async def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = _current.set(None)  # inside a step, other step functions are plain calls
        try:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
            return value
        finally:
            _current.reset(token)

    async def stop_in_flight(self) -> None:
        """Cancel the steps still running in other tasks (siblings in a gather) and wait for them:
        called when the run ends, suspends or fails here, before its slot is given up."""
        me = asyncio.current_task()
        others = [t for t in self._in_flight if t is not me and not t.done()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # -- timers ---------------------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        """A durable timer: its wake-up time is recorded the first time, and kept across crashes
        and recoveries. A long one (over `worker.max_inline_sleep`) frees the worker meanwhile."""
        step_id = self._next_step_id()
        record = self._replay.expect(step_id, "sleep")
        if record is not None and record.status == "completed":
            self.store._replayed(record.store_delta)
            return
        if not self._journal.durable:
            await _sleep(seconds)
            return
        wake_at_s = record.wake_at_s if record is not None else None
        if wake_at_s is None:
            recorded = await self._record(StepWrite(
                step_id, "sleep", "pending", "sleep.started", {"step": step_id, "seconds": seconds},
                started_at_s=time.time(), wake_in_s=seconds,
            ))
            wake_at_s = recorded.wake_at_s
        assert wake_at_s is not None
        await self._wait_until(wake_at_s, Suspend("sleeping", wake_at_s=wake_at_s))
        await self._record(StepWrite(
            step_id, "sleep", "completed", "sleep.completed", {"step": step_id, "wake_at_s": wake_at_s},
            store_delta=self.store._take_changes(),
        ))

    async def _wait_until(self, wake_at_s: float, suspension: Suspend) -> None:
        remaining_s = wake_at_s - self._db_now()
        decision = timer_decision(remaining_s, self._max_inline_sleep_s)
        if decision == "suspend":
            raise suspension
        if decision == "inline":
            await _sleep(remaining_s)

    # -- children -------------------------------------------------------------------------------

    async def run(self, action_ref: str, parameters: dict[str, Any] | None = None, *,
                  timeout_s: float | None = None) -> Any:
        """Start a child execution of ``action_ref`` through the normal path (any worker serving it,
        of any runtime) and return its result; raises ChildFailed if it does not complete. The run
        waits without holding its worker, and a recovered run waits for the same child."""
        name = f"run:{action_ref}"
        step_id = self._next_step_id()
        record = self._replay.expect(step_id, name)
        if record is not None and record.status != "pending":
            self.store._replayed(record.store_delta)
            if record.status == "failed":
                raise ChildFailed(step_id, name, record.error or {})
            return record.result
        if record is not None:
            child_id = uuid.UUID(str(record.child_id))
        else:
            parameters = {} if parameters is None else parameters
            if not isinstance(parameters, dict):
                raise TypeError(
                    f"the parameters of ctx.run({action_ref!r}) must be an object (a dict), not {type(parameters).__name__}"
                )
            _check_json(parameters, f"the parameters of ctx.run({action_ref!r})")
            # One child per step and dispatch: a recovered run reads the child from its pending
            # step (recorded with it), and a retried run, whose failed step starts over, gets a new one.
            child_id = uuid.uuid5(uuid.UUID(self.execution_id), f"step-{step_id}-attempt-{self.attempt}")
            known = await self._journal.start_child(
                StepWrite(step_id, name, "pending", "child.started",
                          {"step": step_id, "action_ref": action_ref, "child": str(child_id)},
                          started_at_s=time.time(), child_id=child_id),
                action_ref, parameters, timeout_s,
            )
            if not known:
                await self._fail_child(step_id, name, {
                    "error": f"ctx.run: no worker has registered action {action_ref!r} (unknown action)",
                    "action_ref": action_ref,
                })
        child = await self._journal.child(child_id)
        if child is None:  # pruned by retention while this run was paused or waited in line
            await self._fail_child(step_id, name, {
                "error": f"child execution {child_id} ({action_ref}) no longer exists", "child": str(child_id),
            })
        if child.status not in TERMINAL_STATUSES:
            raise Suspend("waiting", child_id=child_id)
        if child.status != "completed":
            reason = (child.error or {}).get("error") or child.status
            await self._fail_child(step_id, name, {
                "error": f"child execution {child_id} ({action_ref}) ended {child.status}: {reason}",
                "child": str(child_id), "child_status": child.status,
            })
        await self._record(StepWrite(
            step_id, name, "completed", "child.completed", {"step": step_id, "child": str(child_id)},
            result=child.result, store_delta=self.store._take_changes(), child_id=child_id,
        ))
        return child.result

    async def _fail_child(self, step_id: int, name: str, error: dict[str, Any]) -> NoReturn:
        await self._record(StepWrite(
            step_id, name, "failed", "child.failed", {"step": step_id, "error": error["error"]},
            error=error, store_delta=self.store._take_changes(),
        ))
        raise ChildFailed(step_id, name, error)

    # -- signals --------------------------------------------------------------------------------

    async def wait_for_signal(self, name: str, *, timeout_s: float | None = None) -> Any:
        """The data of the next signal ``name`` sent to this run (``baton executions signal``), or
        None once ``timeout_s`` has passed. The run waits without holding its worker."""
        step_name = f"signal:{name}"
        step_id = self._next_step_id()
        record = self._replay.expect(step_id, step_name)
        if record is not None and record.status == "completed":
            self.store._replayed(record.store_delta)
            return record.result
        write = StepWrite(step_id, step_name, "completed", "signal.received", {"step": step_id, "signal": name},
                          store_delta=self.store._pending_changes())
        found, data = await self._journal.take_signal(write)
        if found:
            self.store._take_changes()  # recorded with the signal's step
            return data
        wake_at_s = record.wake_at_s if record is not None else None
        if record is None:
            recorded = await self._record(StepWrite(
                step_id, step_name, "pending", "signal.waiting", {"step": step_id, "signal": name, "timeout_s": timeout_s},
                started_at_s=time.time(), wake_in_s=timeout_s,
            ))
            wake_at_s = recorded.wake_at_s
        if wake_at_s is not None and wake_at_s <= self._db_now():
            await self._record(StepWrite(
                step_id, step_name, "completed", "signal.timed_out", {"step": step_id, "signal": name},
                result=None, store_delta=self.store._take_changes(),
            ))
            return None
        raise Suspend("waiting", wake_at_s=wake_at_s, signal=name)


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(max(seconds, 0))


def bind(ctx: WorkflowContext) -> contextvars.Token[WorkflowContext | None]:
    return _current.set(ctx)


def unbind(token: contextvars.Token[WorkflowContext | None]) -> None:
    _current.reset(token)


