"""`@action`: registering Python functions as Baton actions.

The parameters an action takes are read from its signature and become a pydantic model, whose JSON
schema goes into the catalogue so that the executor can reject bad parameters before dispatch.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, create_model

from common.actions import CORE_PREFIX, ActionSpec, Runtime
from worker.threads import run_in_thread

if TYPE_CHECKING:
    from worker.workflow import WorkflowSpec

#: Runs an action given its validated parameters; shell actions also get the execution's context.
Invoker = Callable[[BaseModel, "Invocation"], Awaitable[Any]]

#: A function ``@action`` registers (returned as it is).
_ActionFunc = TypeVar("_ActionFunc", bound=Callable[..., Any])
#: A built-in's invoker: it takes the instance of its own parameters model that it is given.
_CoreInvoker = TypeVar("_CoreInvoker", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True)
class Invocation:
    """What an action may know about the execution it serves."""

    execution_id: str
    attempt: int
    action_ref: str
    timeout_s: float


@dataclass
class RegisteredAction:
    spec: ActionSpec
    params_model: type[BaseModel]
    invoke: Invoker
    retry_on: tuple[type[BaseException], ...] = (Exception,)  # which failures `retries` applies to
    workflow: WorkflowSpec | None = None  # a workflow runs through `worker.durable`


_REGISTRY: dict[str, RegisteredAction] = {}


def registered() -> dict[str, RegisteredAction]:
    return dict(_REGISTRY)


def register(entry: RegisteredAction) -> None:
    existing = _REGISTRY.get(entry.spec.ref)
    if existing is not None and existing.invoke is not entry.invoke:
        raise ValueError(f"action {entry.spec.ref!r} is registered twice")
    _REGISTRY[entry.spec.ref] = entry


def params_model_for(ref: str, func: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of ``func``'s keyword parameters; unknown parameters are refused unless the
    function takes ``**kwargs``."""
    fields: dict[str, Any] = {}
    extra: Literal["allow", "forbid"] = "forbid"
    # eval_str: a module with `from __future__ import annotations` has its annotations as strings.
    for name, param in inspect.signature(func, eval_str=True).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            raise TypeError(f"action {ref!r}: parameters must be passable by keyword ({name!r} is not)")
        annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (annotation, default)
    model_name = "".join(part.title() for part in ref.replace("-", "_").split(".")) + "Params"
    return create_model(model_name, __config__=ConfigDict(extra=extra), **fields)


def action(
    ref: str,
    *,
    timeout_s: float | None = None,
    description: str | None = None,
    recover_on_worker_loss: bool | None = None,
    max_recovery_attempts: int | None = None,
    version: int = 1,
    retries: int | None = None,
    retry_delay_s: float = 1.0,
    backoff: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    max_concurrency: int | None = None,
) -> Callable[[_ActionFunc], _ActionFunc]:
    """Register a Python function (sync or async) as action ``ref`` (``pack.name``).

    Its keyword parameters are the action's parameters; its return value (JSON-serialisable) is the
    execution's result; an exception fails the execution. A sync function runs in a thread and,
    unlike a coroutine, cannot be interrupted at its timeout: prefer ``async def`` for long work.

    ``version`` must grow whenever the parameters or the runtime change: the catalogue refuses a
    changed action under a version it already has, and any worker older than its newest version.

    ``recover_on_worker_loss`` (restart from scratch on another worker when the worker running it
    is lost) and ``max_recovery_attempts`` override the YAML `recovery:` section for this action.

    ``retries``: an application failure (an exception among ``retry_on``) is tried again, up to
    this many times (an invocation's ``max_retries`` overrides it), each after a jittered
    exponential delay (``retry_delay_s`` x ``backoff`` ^ n) spent as `requested` in PostgreSQL, not
    in a worker slot. ``max_concurrency``: at most this many of the action are dispatched or running
    at once, across all workers (YAML `executor.max_concurrency` overrides it).
    """
    if max_recovery_attempts is not None and max_recovery_attempts < 0:
        raise ValueError(f"action {ref!r}: max_recovery_attempts cannot be negative")
    if "." not in ref:
        raise ValueError(f"action ref {ref!r} must look like 'pack.name'")
    if ref.startswith(CORE_PREFIX):
        raise ValueError(f"action ref {ref!r}: {CORE_PREFIX}* is reserved for Baton's built-in actions")
    if version < 1:
        raise ValueError(f"action {ref!r}: version must be 1 or more")
    if (retries is not None and retries < 0) or retry_delay_s < 0 or backoff < 1:
        raise ValueError(f"action {ref!r}: retries and retry_delay_s must be >= 0 and backoff >= 1")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"action {ref!r}: max_concurrency must be 1 or more")

    def decorate(func: _ActionFunc) -> _ActionFunc:
        model = params_model_for(ref, func)
        names = list(model.model_fields)

        async def invoke(params: BaseModel, _inv: Invocation) -> Any:
            kwargs = {n: getattr(params, n) for n in names}
            kwargs.update(params.model_extra or {})
            if inspect.iscoroutinefunction(func):
                return await func(**kwargs)
            return await run_in_thread(func, **kwargs)

        register(
            RegisteredAction(
                spec=ActionSpec(
                    ref=ref,
                    runtime="python",
                    parameters_schema=model.model_json_schema(),
                    timeout_s=timeout_s,
                    description=description or inspect.getdoc(func),
                    recover_on_worker_loss=recover_on_worker_loss,
                    max_recovery_attempts=max_recovery_attempts,
                    version=version,
                    retries=retries,
                    retry_delay_s=retry_delay_s if retries else None,
                    retry_backoff=backoff if retries else None,
                    max_concurrency=max_concurrency,
                ),
                params_model=model,
                invoke=invoke,
                retry_on=retry_on,
            )
        )
        return func

    return decorate


def core_action(
    ref: str, runtime: Runtime, model: type[BaseModel], description: str
) -> Callable[[_CoreInvoker], _CoreInvoker]:
    """Register a built-in whose contract (ref, runtime, parameters) is fixed in `common.actions`."""

    def decorate(func: _CoreInvoker) -> _CoreInvoker:
        register(
            RegisteredAction(
                spec=ActionSpec(
                    ref=ref, runtime=runtime, parameters_schema=model.model_json_schema(), description=description
                ),
                params_model=model,
                invoke=func,
            )
        )
        return func

    return decorate
