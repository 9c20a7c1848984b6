"""Running one dispatch's action to an outcome: completed, failed or timeout."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import traceback
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from common.errors import describe_invalid
from common.schemas import MAX_PARAMETERS_DEPTH, Assignment, json_depth
from worker.errors import ActionFailed, ActionTimedOut
from worker.registry import Invocation, RegisteredAction
from worker.replay import backoff_delay_s


@dataclass
class Outcome:
    status: str  # completed | failed | timeout
    result: Any = None
    error: dict[str, Any] | None = None
    retryable: bool = False  # an application failure the action's `retry_on` names
    retry_in_s: float | None = None  # set: not final, tried again after this delay


def with_retry(outcome: Outcome, action: RegisteredAction, dispatch: Assignment, jitter: float) -> Outcome:
    """A failure the action retries becomes a retry after a jittered exponential delay, until the
    invocation's `max_retries` (else the action's `retries`) are spent; the last failure says how
    many tries it had. Pure: ``jitter`` is drawn by the caller."""
    allowed = dispatch.max_retries if dispatch.max_retries is not None else (action.spec.retries or 0)
    if outcome.status != "failed" or not outcome.retryable or allowed <= 0:
        return outcome
    if dispatch.failed_tries < allowed:
        delay_s = backoff_delay_s(
            action.spec.retry_delay_s if action.spec.retry_delay_s is not None else 1.0,
            action.spec.retry_backoff or 2.0, dispatch.failed_tries + 1, jitter,
        )
        return dataclasses.replace(outcome, retry_in_s=delay_s)
    tries = dispatch.failed_tries + 1
    error = dict(outcome.error or {})
    error["error"] = f"failed after {tries} tries: {error.get('error', 'failed')}"
    error["tries"] = tries
    return dataclasses.replace(outcome, error=error)


def resolve_timeout_s(
    invocation_s: float | None, action_s: float | None, default_s: float, ceiling_s: float = math.inf
) -> float:
    """The invocation's own timeout wins, then the action's, then `worker.task_timeout`; none may
    exceed `worker.max_task_timeout` (whoever posts chooses `timeout_seconds`)."""
    for value in (invocation_s, action_s):
        if value is not None and value > 0:
            return min(value, ceiling_s)
    return min(default_s, ceiling_s)


def error_object(message: str, **details: Any) -> dict[str, Any]:
    return {"error": message, "failed_by": "worker", **details}


def bounded_result(result: Any, max_bytes: int) -> Outcome:
    try:
        encoded = json.dumps(result, allow_nan=False)  # NaN and Infinity are not JSON
    except (TypeError, ValueError) as exc:
        return Outcome("failed", error=error_object(f"result is not JSON-serialisable: {exc}"))
    if len(encoded) > max_bytes:
        return Outcome(
            "failed", error=error_object(f"result is {len(encoded)} bytes, more than max_output_bytes ({max_bytes})")
        )
    return Outcome("completed", result=result)


def validate_parameters(action: RegisteredAction, parameters: dict[str, Any]) -> Any:
    """The action's parameters as its model, by the rule the executor also applies: pydantic in
    strict JSON mode (the parameters came as JSON; "3" is not an int, 3.0 is not an int, 3 is a
    float), which `executor.requests.ParameterValidator` mirrors on the model's JSON Schema."""
    if json_depth(parameters) > MAX_PARAMETERS_DEPTH:
        raise ValueError(f"parameters nested deeper than {MAX_PARAMETERS_DEPTH} levels")
    return action.params_model.model_validate_json(json.dumps(parameters), strict=True)


def parse_parameters(action: RegisteredAction, parameters: dict[str, Any]) -> BaseModel | Outcome:
    """The parameters as the action's model, or the failure that says which are wrong and why."""
    try:
        params: BaseModel = validate_parameters(action, parameters)
    except ValidationError as exc:
        invalid = describe_invalid(exc, root="parameters")
        return Outcome("failed", error=error_object(f"invalid parameters: {invalid}"))
    except ValueError as exc:
        return Outcome("failed", error=error_object(f"invalid parameters: {exc}"))
    return params


def failure(exc: BaseException, retry_on: tuple[type[BaseException], ...] = ()) -> Outcome:
    """An action's (or a workflow's) own exception as its execution's outcome, traceback once."""
    return Outcome(
        "failed", error=error_object(f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=20)[-4000:]),
        retryable=isinstance(exc, retry_on),
    )


async def execute(
    action: RegisteredAction | None,
    dispatch: Assignment,
    *,
    default_timeout_s: float,
    max_output_bytes: int,
    max_timeout_s: float = math.inf,
) -> Outcome:
    """Never raises for anything the action does; only cancellation (worker stopping) propagates."""
    if action is None:
        return Outcome("failed", error=error_object(f"this worker does not serve action {dispatch.action_ref!r}"))
    timeout_s = resolve_timeout_s(dispatch.timeout_s, action.spec.timeout_s, default_timeout_s, max_timeout_s)
    params = parse_parameters(action, dispatch.parameters)
    if isinstance(params, Outcome):
        return params
    inv = Invocation(str(dispatch.execution_id), dispatch.attempt, dispatch.action_ref, timeout_s)
    # The shell runner enforces the timeout itself (SIGTERM, grace, SIGKILL); Python is cancelled.
    deadline = asyncio.timeout(None if action.spec.runtime == "shell" else timeout_s)
    try:
        async with deadline:
            result = await action.invoke(params, inv)
    except ActionTimedOut as exc:
        return Outcome("timeout", result=exc.result, error=error_object(str(exc), timeout_seconds=timeout_s))
    except TimeoutError as exc:
        if not deadline.expired():  # the action's own TimeoutError (a network call, say): a failure
            return Outcome("failed", error=error_object(f"{type(exc).__name__}: {exc}"))
        return Outcome(
            "timeout",
            error=error_object(f"action ran longer than its timeout of {timeout_s:g} s and was cancelled", timeout_seconds=timeout_s),
        )
    except ActionFailed as exc:
        return Outcome("failed", result=exc.result, error=error_object(str(exc)), retryable=isinstance(exc, action.retry_on))
    except Exception as exc:  # noqa: BLE001 - an action's own failure is its execution's outcome
        return failure(exc, action.retry_on)
    if action.spec.runtime == "shell":
        return Outcome("completed", result=result)  # stdout and stderr are capped as they are read
    return bounded_result(result, max_output_bytes)
