"""The workflow SDK: ``@workflow``, ``@step`` and the ``ctx`` a workflow is given.

A durable workflow records each step's outcome (and what it changed in ``ctx.store``) as it
completes; when the run is recovered, dispatched again after a long sleep, or resumed, its code runs
again from the top and every recorded step returns its recorded result without running. What this
module decides it decides without I/O: the records come from, and go to, a `Journal` (PostgreSQL in
`worker.durable`, nothing at all for a transient run).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import random
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel

from common.actions import CORE_PREFIX, ActionSpec
from worker.registry import Invocation, RegisteredAction, params_model_for, register
from worker.replay import (
    NonDeterminismError,
    Replay,
    StepRecord,
    backoff_delay_s,
    remaining_attempts,
    timer_decision,
)

_F = TypeVar("_F", bound=Callable[..., Any])

#: The workflow whose code is running in this task (None inside a step's own body, so that a step
#: calling another step function just calls it).
_current: contextvars.ContextVar[WorkflowContext | None] = contextvars.ContextVar("baton_workflow", default=None)


# -- how a run leaves its worker, and how steps fail -----------------------------------------------


class Suspend(BaseException):
    """The run leaves its worker until a timer, a child or a signal (or an operator's resume).
    A BaseException, so that a workflow's own ``except Exception`` does not swallow it."""

    def __init__(
        self,
        status: Literal["sleeping", "waiting", "paused"],
        *,
        wake_at_s: float | None = None,
        child_id: uuid.UUID | None = None,
        signal: str | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.wake_at_s = wake_at_s
        self.child_id = child_id
        self.signal = signal


class Fenced(BaseException):
    """The run is no longer this worker's (recovered elsewhere, cancelled): record nothing more."""


class StepFailed(Exception):
    """A step failed for good (its retries exhausted). Uncaught, it fails the workflow with an
    application error, which recovery does not retry."""

    def __init__(self, step_id: int, name: str, error: dict[str, Any]) -> None:
        super().__init__(error.get("error", "step failed"))
        self.step_id = step_id
        self.name = name
        self.error = error


class ChildFailed(StepFailed):
    """A child execution started with ``ctx.run`` did not complete (failed, timed out, cancelled)."""


# -- what the context records through ----------------------------------------------------------


@dataclass(frozen=True)
class StepWrite:
    step_id: int
    name: str
    status: Literal["pending", "completed", "failed"]
    event: str
    data: dict[str, Any]
    result: Any = None
    error: dict[str, Any] | None = None
    store_delta: dict[str, Any] | None = None
    attempts: int = 1
    started_at_s: float | None = None
    wake_in_s: float | None = None
    child_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Recorded:
    pause_requested: bool = False
    wake_at_s: float | None = None


@dataclass(frozen=True)
class ChildState:
    status: str
    result: Any
    error: dict[str, Any] | None


class Journal(Protocol):
    durable: bool

    async def record(self, write: StepWrite) -> Recorded:
        """Record a step; raises Fenced if the run is no longer this worker's."""

    async def start_child(self, write: StepWrite, action_ref: str, parameters: dict[str, Any],
                          timeout_s: float | None) -> bool:
        """Record the pending step and create its child in one transaction; False if the action
        is unknown (nothing is created then)."""

    async def child(self, child_id: uuid.UUID) -> ChildState | None: ...

    async def take_signal(self, write: StepWrite) -> tuple[bool, Any]:
        """Consume the oldest signal named in ``write`` and record the step as completed with its
        data, in one transaction; (False, None) if none has arrived."""


class TransientJournal:
    """A run that records nothing: steps just run; timers are slept; children and signals need a
    durable run."""

    durable = False

    async def record(self, write: StepWrite) -> Recorded:
        return Recorded()

    async def start_child(self, write: StepWrite, action_ref: str, parameters: dict[str, Any],
                          timeout_s: float | None) -> bool:
        raise TypeError(f"ctx.run({action_ref!r}) needs a durable workflow (@workflow(..., durable=True))")

    async def child(self, child_id: uuid.UUID) -> ChildState | None:
        return None

    async def take_signal(self, write: StepWrite) -> tuple[bool, Any]:
        raise TypeError("ctx.wait_for_signal needs a durable workflow (@workflow(..., durable=True))")


# -- the context -------------------------------------------------------------------------------


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

    def snapshot(self) -> dict[str, Any]:
        return dict(self._values)

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
        while True:
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
        await self._record(StepWrite(
            step_id, name, "completed", "step.completed",
            {"step": step_id, "name": name, "attempts": attempt,
             "duration_ms": round((time.time() - started_at_s) * 1000, 3)},
            result=result, attempts=attempt, started_at_s=started_at_s, store_delta=self.store._take_changes(),
        ))
        return result

    @staticmethod
    async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        token = _current.set(None)  # inside a step, other step functions are plain calls
        try:
            value = fn(*args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
            return value
        finally:
            _current.reset(token)

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
            parameters = parameters or {}
            _check_json(parameters, f"the parameters of ctx.run({action_ref!r})")
            child_id = uuid.uuid5(uuid.UUID(self.execution_id), f"step-{step_id}")
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
        if child is None or child.status not in ("completed", "failed", "timeout", "cancelled"):
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

    async def _fail_child(self, step_id: int, name: str, error: dict[str, Any]) -> None:
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
                          store_delta=self.store._take_changes())
        found, data = await self._journal.take_signal(write)
        if found:
            return data
        self.store._changes = {**(write.store_delta or {}), **self.store._changes}  # not recorded after all
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


# -- decorators ----------------------------------------------------------------------------------


def step(
    func: _F | None = None, *, name: str | None = None, retries: int = 0, retry_delay_s: float = 1.0,
    backoff: float = 2.0,
) -> Any:
    """Make a function (sync or async) a step of the workflows that call it: ``@step`` or
    ``@step(name=..., retries=N, retry_delay_s=1.0, backoff=2.0)``. In a workflow, ``await`` it;
    its result is recorded and, once recorded, never computed again for that run. Outside a
    workflow it is a plain call. ``retries`` more tries follow a failure, each after a jittered
    exponential delay, each recorded as `step.retrying`."""
    if retries < 0 or retry_delay_s < 0 or backoff < 1:
        raise ValueError("@step: retries and retry_delay_s must be >= 0 and backoff >= 1")
    policy = StepPolicy(retries, retry_delay_s, backoff)

    def decorate(fn: _F) -> _F:
        step_name = name or fn.__qualname__

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            ctx = _current.get()
            if ctx is None:
                return fn(*args, **kwargs)
            # The step's identity is taken now, as it is called, before anything is awaited:
            # steps started together number in the order they are written.
            return ctx._run_step(ctx._next_step_id(), step_name, policy, fn, args, kwargs)

        return call  # type: ignore[return-value]

    if func is not None:
        return decorate(func)
    return decorate


@dataclass(frozen=True)
class WorkflowSpec:
    func: Callable[..., Awaitable[Any]]
    durable: bool
    timeout_s: float | None
    param_names: list[str] = field(default_factory=list)


def workflow(
    ref: str,
    *,
    durable: bool = True,
    recover_on_worker_loss: bool | None = None,
    max_recovery_attempts: int | None = None,
    timeout_s: float | None = None,
    description: str | None = None,
    version: int = 1,
) -> Callable[[_F], _F]:
    """Register ``async def fn(ctx, **parameters)`` as action ``ref``, invoked like any other.

    ``durable`` runs record their steps and resume from the last one after any interruption;
    transient ones (``durable=False``) record none and, on worker loss, fail or (with
    ``recover_on_worker_loss=True``) start again. ``timeout_s`` is a deadline for the whole run,
    across suspensions and recoveries (an invocation's ``timeout_seconds`` overrides it)."""
    if "." not in ref:
        raise ValueError(f"workflow ref {ref!r} must look like 'pack.name'")
    if ref.startswith(CORE_PREFIX):
        raise ValueError(f"workflow ref {ref!r}: {CORE_PREFIX}* is reserved for Baton's built-in actions")
    if max_recovery_attempts is not None and max_recovery_attempts < 0:
        raise ValueError(f"workflow {ref!r}: max_recovery_attempts cannot be negative")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"workflow {ref!r}: timeout_s must be positive")

    def decorate(fn: _F) -> _F:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"workflow {ref!r} must be an async function taking ctx first")
        signature = inspect.signature(fn, eval_str=True)
        params = list(signature.parameters.values())
        if not params:
            raise TypeError(f"workflow {ref!r} must take ctx as its first parameter")
        rest = signature.replace(parameters=params[1:])

        def without_ctx(**kwargs: Any) -> Any:
            return None

        without_ctx.__signature__ = rest  # type: ignore[attr-defined]
        model = params_model_for(ref, without_ctx)
        spec = WorkflowSpec(func=fn, durable=durable, timeout_s=timeout_s, param_names=list(model.model_fields))

        async def invoke(params: BaseModel, inv: Invocation) -> Any:  # pragma: no cover - run by worker.durable
            raise RuntimeError(f"workflow {ref!r} runs through worker.durable, not as a plain action")

        register(RegisteredAction(
            spec=ActionSpec(
                ref=ref, runtime="python", parameters_schema=model.model_json_schema(), timeout_s=timeout_s,
                description=description or inspect.getdoc(fn), durable=durable,
                recover_on_worker_loss=recover_on_worker_loss, max_recovery_attempts=max_recovery_attempts,
                version=version,
            ),
            params_model=model,
            invoke=invoke,
            workflow=spec,
        ))
        return fn

    return decorate


def current() -> WorkflowContext | None:
    return _current.get()


def bind(ctx: WorkflowContext) -> contextvars.Token[WorkflowContext | None]:
    return _current.set(ctx)


def unbind(token: contextvars.Token[WorkflowContext | None]) -> None:
    _current.reset(token)


__all__ = [
    "ChildFailed", "Fenced", "NonDeterminismError", "StepFailed", "StepRecord", "Suspend", "WorkflowContext",
    "step", "workflow",
]
