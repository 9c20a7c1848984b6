"""The workflow SDK's decorators: ``@workflow`` registers a workflow as an action, ``@step`` makes a
function a step of the workflows that call it.

A durable workflow records each step's outcome (and what it changed in ``ctx.store``) as it
completes; when the run is recovered, dispatched again after a long sleep, or resumed, its code runs
again from the top and every recorded step returns its recorded result without running. The
context that does so is `worker.context`; what it records through is `worker.journal`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from common.actions import CORE_PREFIX, ActionSpec
from worker.context import StepPolicy, WorkflowContext, _current
from worker.journal import ChildFailed, StepFailed
from worker.registry import Invocation, RegisteredAction, params_model_for, register
from worker.replay import (
    NonDeterminismError,
)

_F = TypeVar("_F", bound=Callable[..., Any])


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



__all__ = ["ChildFailed", "NonDeterminismError", "StepFailed", "WorkflowContext", "step", "workflow"]
