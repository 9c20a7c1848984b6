"""Turning a raw request message into a row to record, or a rejection (DESIGN section 8). No I/O."""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
import re2
import referencing
from pydantic import ValidationError

from common.actions import ActionSpec
from common.errors import MAX_LOC_CHARS, MAX_PROBLEMS, describe, validation_problems
from common.ids import MAX_BATCH_REQUESTS, batch_execution_id, execution_id_for
from common.schemas import ExecutionRequest


@dataclass
class Rejection:
    """A request that cannot be tied to an execution: parked with its reason, never retried."""

    reason: str
    #: The request's place in its batch message (None: the message as a whole, or a lone request).
    batch_index: int | None = None


@dataclass
class NewExecution:
    """A row for `executions`: `requested`, or already `failed` with `error` for a bad request."""

    id: uuid.UUID
    action_ref: str | None
    parameters: dict[str, Any]
    idempotency_key: str | None
    message_id: str | None
    correlation_id: str | None
    timeout_s: float | None
    error: dict[str, Any] | None = None
    max_retries: int | None = None
    not_before: dt.datetime | None = None  # a delayed execution waits as `requested` until then
    schedule_name: str | None = None  # fired by this schedule ...
    scheduled_for: dt.datetime | None = None  # ... for this due time
    warnings: list[str] | None = None  # what intake ignored in the request
    batch_index: int | None = None  # its place in its batch message (None: the message held it alone)

    @property
    def status(self) -> str:
        return "failed" if self.error else "requested"

    def fail(self, message: str, **details: Any) -> None:
        self.error = {"error": message, "failed_by": "executor_intake", **details}


def insert_arguments(
    executions: list[NewExecution], workers: Mapping[uuid.UUID, str] | None = None
) -> tuple[list[Any], ...]:
    """The arrays `INSERT_REQUESTS` takes, one element per execution; ``workers``: where intake
    placed some of them."""
    placed = workers or {}
    return (
        [e.id for e in executions],
        [e.action_ref for e in executions],
        [json.dumps(e.parameters) for e in executions],
        [e.status for e in executions],
        [e.idempotency_key for e in executions],
        [e.message_id for e in executions],
        [e.correlation_id for e in executions],
        [e.timeout_s for e in executions],
        [json.dumps(e.error) if e.error else None for e in executions],
        [e.max_retries for e in executions],
        [e.not_before for e in executions],
        [e.schedule_name for e in executions],
        [e.scheduled_for for e in executions],
        [json.dumps(e.warnings) if e.warnings else None for e in executions],
        [placed.get(e.id) for e in executions],
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: JSON, but no float holds it (and PostgreSQL refuses inf)
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _bounded(problem: str, limit: int = 300) -> str:
    """A problem quotes the value at fault, which may be huge."""
    return problem if len(problem) <= limit else problem[:limit] + "..."


def _decode(body: bytes, max_bytes: int) -> Any:
    """The body's JSON, or the rejection that says why there is none."""
    if len(body) > max_bytes:
        return Rejection(f"request body is {len(body)} bytes, larger than the limit of {max_bytes}")
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        return Rejection(f"request body is not JSON: {str(exc)[:200]}")


def parse_message(
    body: bytes, *, message_id: str | None, correlation_id: str | None, max_bytes: int
) -> list[NewExecution] | Rejection:
    """A request message: one request (an object), or a batch (an array of up to
    `MAX_BATCH_REQUESTS` of them, one execution each, with ids derived from the message_id and
    their position). A batch's entry that is not a request object is recorded as failed under its
    id; only what concerns the whole message (too large, not JSON, no message_id) rejects it."""
    data = _decode(body, max_bytes)
    if isinstance(data, Rejection):
        return data
    if isinstance(data, dict):
        return [request_from(data, execution_id_for(message_id), message_id=message_id, correlation_id=correlation_id)]
    if not isinstance(data, list):
        return Rejection(f"request body is JSON {type(data).__name__}, not an object or an array of them")
    if not message_id:
        return Rejection(
            "a batch of requests needs a message_id: its executions' ids are derived from it, so that a "
            "redelivered batch is recorded once"
        )
    if not data or len(data) > MAX_BATCH_REQUESTS:
        return Rejection(f"a batch holds {len(data)} requests: from 1 to {MAX_BATCH_REQUESTS} are accepted")
    executions = []
    for index, entry in enumerate(data):
        execution_id = batch_execution_id(message_id, index)
        if isinstance(entry, dict):
            execution = request_from(entry, execution_id, message_id=message_id, correlation_id=correlation_id)
        else:
            execution = NewExecution(
                id=execution_id, action_ref=None, parameters={}, idempotency_key=None, message_id=message_id,
                correlation_id=correlation_id, timeout_s=None,
            )
            execution.fail(f"request {index} of the batch is JSON {type(entry).__name__}, not an object")
        execution.batch_index = index
        executions.append(execution)
    return executions


def request_from(
    data: dict[str, Any], execution_id: uuid.UUID, *, message_id: str | None, correlation_id: str | None
) -> NewExecution:
    """One request object as the execution to record."""
    execution = NewExecution(
        id=execution_id,
        action_ref=None,
        parameters={},
        idempotency_key=None,
        message_id=message_id,
        correlation_id=correlation_id,
        timeout_s=None,
    )
    unknown = [k for k in data if k not in ExecutionRequest.model_fields]
    if unknown:
        execution.warnings = [f"unknown field {k[:MAX_LOC_CHARS]!r} ignored" for k in unknown[:MAX_PROBLEMS]]
        if len(unknown) > MAX_PROBLEMS:
            execution.warnings.append(f"... and {len(unknown) - MAX_PROBLEMS} more unknown fields ignored")
    try:
        request = ExecutionRequest.model_validate(data)
    except ValidationError as exc:
        failed = {err["loc"][0] if err["loc"] else None for err in exc.errors(include_url=False, include_input=False)}
        if None not in failed:  # each field is checked on its own (the model is strict: no coercion)
            valid = {k: data[k] for k in ExecutionRequest.model_fields if k in data and k not in failed}
            execution.action_ref = valid.get("action_ref")
            execution.parameters = valid.get("parameters") or {}
            execution.idempotency_key = valid.get("idempotency_key")
            timeout = valid.get("timeout_seconds")
            execution.timeout_s = float(timeout) if timeout is not None else None
            execution.max_retries = valid.get("max_retries")
        problems = validation_problems(exc, root="body")
        execution.fail("invalid request: " + "; ".join(problems), problems=problems)
        return execution
    execution.action_ref = request.action_ref
    execution.parameters = request.parameters
    execution.idempotency_key = request.idempotency_key
    execution.timeout_s = request.timeout_seconds
    execution.max_retries = request.max_retries
    execution.not_before = request.not_before
    return execution


def _is_strict_integer(_checker: Any, instance: Any) -> bool:
    """JSON Schema's "integer" as the worker's pydantic (strict, JSON mode) reads it: a JSON
    integer literal only. Not a bool, and not a float with no fractional part (3.0), which
    JSON Schema's own rule would take and pydantic's strict int refuses."""
    return isinstance(instance, int) and not isinstance(instance, bool)


class UnsafePattern(ValueError):
    """A schema's regular expression that a linear-time engine cannot run."""


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@functools.lru_cache(maxsize=4096)
def linear_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2, whose matching time is linear in the input: a schema a worker
    registered cannot make the executor backtrack for seconds (`^(a+)+$`). Patterns RE2 cannot run
    (look-arounds, back-references) are refused; pydantic's own engine refuses them on the worker."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        raise UnsafePattern(f"pattern {pattern[:100]!r} is not supported (no look-arounds or back-references): {exc}") from None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not linear_pattern(pattern).search(instance):
        yield jsonschema.ValidationError(f"does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = linear_pattern(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    patterns = [linear_pattern(p) for p in schema.get("patternProperties", {})]
    extras = [
        key for key in instance
        if key not in schema.get("properties", {}) and not any(p.search(key) for p in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif additional is False and extras:
        names = ", ".join(repr(e)[:80] for e in sorted(extras)[:10])
        yield jsonschema.ValidationError(f"Additional properties are not allowed ({names} unexpected)")


def _strict_validator_class(cls: type[jsonschema.protocols.Validator]) -> type[jsonschema.protocols.Validator]:
    """``cls`` with pydantic's strict notion of an integer, and every regular expression run by RE2."""
    extended: type[jsonschema.protocols.Validator] = jsonschema.validators.extend(
        cls,
        validators={"pattern": _pattern, "patternProperties": _pattern_properties,
                    "additionalProperties": _additional_properties},
        type_checker=cls.TYPE_CHECKER.redefine("integer", _is_strict_integer),
    )
    return extended


#: Schemas are resolved against themselves only: a `$ref` to anything else (a URL, a file) is
#: never fetched, so a registered schema cannot make the executor wait on the network or read files.
_NO_RETRIEVAL = referencing.Registry()


class ParameterValidator:
    """Compiled JSON-schema validators for catalogue entries, reused across requests.

    One rule decides whether parameters fit an action, on both sides: the worker validates them
    with the action's pydantic model in strict JSON mode (`worker.runner`), and this validator
    reads the model's JSON Schema with the same notion of an integer."""

    def __init__(self) -> None:
        # Per action: the schema it was compiled from, and the validator. A re-registered action
        # brings a new schema object, which is compiled afresh.
        self._compiled: dict[str, tuple[dict[str, Any], jsonschema.protocols.Validator]] = {}
        self._classes: dict[type, type] = {}

    def errors(self, spec: ActionSpec, parameters: dict[str, Any]) -> list[str]:
        cached = self._compiled.get(spec.ref)
        if cached is not None and cached[0] is spec.parameters_schema:
            validator = cached[1]
        else:
            base = jsonschema.validators.validator_for(spec.parameters_schema, default=jsonschema.Draft202012Validator)
            cls = self._classes.get(base)
            if cls is None:
                cls = self._classes[base] = _strict_validator_class(base)
            validator = cls(spec.parameters_schema, registry=_NO_RETRIEVAL)
            self._compiled[spec.ref] = (spec.parameters_schema, validator)
        errors = sorted(validator.iter_errors(parameters), key=lambda e: [str(p) for p in e.absolute_path])
        problems = [
            _bounded(f"{'.'.join(str(p) for p in err.absolute_path) or 'parameters'}: {value_free_message(err)}")
            for err in errors[:MAX_PROBLEMS]
        ]
        if len(errors) > MAX_PROBLEMS:
            problems.append(f"... and {len(errors) - MAX_PROBLEMS} more")
        return problems


#: Rules whose jsonschema message names only the schema's property names, never a value.
_NAMES_ONLY = frozenset({"required", "additionalProperties", "dependentRequired"})


def value_free_message(err: jsonschema.ValidationError) -> str:
    """What a parameter got wrong, without its value: parameters may hold secrets, and the error
    is stored, logged and shown. (jsonschema's own messages quote the value.)"""
    if err.validator in _NAMES_ONLY:
        message: str = err.message
        return message
    rule = err.validator_value
    if err.validator == "type":
        kinds = " or ".join(rule) if isinstance(rule, list) else rule
        return f"must be of type {kinds}"
    if err.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                         "minItems", "maxItems", "minProperties", "maxProperties", "multipleOf", "pattern",
                         "format", "const", "enum", "uniqueItems"):
        return f"fails {err.validator} {json.dumps(rule, default=str)[:200]}"
    if err.validator == "propertyNames":
        return "has a name that is not allowed"
    if err.validator in ("anyOf", "oneOf"):
        return f"matches none of the {len(rule)} allowed forms" if isinstance(rule, list) else "matches no allowed form"
    return f"fails the schema's {err.validator} rule"


def check_action(execution: NewExecution, spec: ActionSpec | None, validator: ParameterValidator) -> None:
    """Fail ``execution`` (in place) when its action is unknown, its parameters do not fit, or the
    schema they are checked against cannot be used."""
    if execution.error:
        return
    if spec is None:
        execution.fail(f"unknown action {execution.action_ref!r}: no worker has registered it")
        return
    try:
        problems = validator.errors(spec, execution.parameters)
    except Exception as exc:  # noqa: BLE001 - a schema a worker registered that cannot be used
        # (a look-around pattern, an unknown type, a `$ref` to nowhere): this request fails, and
        # whoever checks it (intake, a schedule firing) goes on.
        execution.fail(f"parameters cannot be checked against the action's schema: {describe(exc)}")
        return
    if problems:
        execution.fail(
            f"invalid parameters for {spec.ref}: " + "; ".join(problems), problems=problems
        )
