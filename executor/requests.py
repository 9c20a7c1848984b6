"""Turning a raw request message into a row to record, or a rejection (DESIGN section 8). No I/O."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from pydantic import ValidationError

from common.actions import ActionSpec
from common.schemas import ExecutionRequest

# Execution ids derived from a non-UUID message_id live in this namespace, so that a redelivered
# request maps to the same execution and is recorded once.
_MESSAGE_ID_NAMESPACE = uuid.UUID("6f1c2b7e-3d4a-4c8e-9a51-0b7d2e9f4c13")


def execution_id_for(message_id: str | None) -> uuid.UUID:
    """The execution id a request gets: its message_id if that is a UUID (so a client knows the id
    before posting), a stable UUID derived from any other message_id, else a fresh one."""
    if not message_id:
        return uuid.uuid4()
    try:
        return uuid.UUID(message_id)
    except ValueError:
        return uuid.uuid5(_MESSAGE_ID_NAMESPACE, message_id)


@dataclass
class Rejection:
    """A request that cannot be tied to an execution: parked with its reason, never retried."""

    reason: str


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
    reply_to: str | None = field(default=None, compare=False)

    @property
    def status(self) -> str:
        return "failed" if self.error else "requested"

    def fail(self, message: str, **details: Any) -> None:
        self.error = {"error": message, "failed_by": "executor_intake", **details}


def parse_request(
    body: bytes, *, message_id: str | None, correlation_id: str | None, max_bytes: int
) -> NewExecution | Rejection:
    """Parse and check the envelope; the action itself is checked by :func:`check_action`."""
    if len(body) > max_bytes:
        return Rejection(f"request body is {len(body)} bytes, larger than the limit of {max_bytes}")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejection(f"request body is not JSON: {exc}")
    if not isinstance(data, dict):
        return Rejection(f"request body is JSON {type(data).__name__}, not an object")
    execution = NewExecution(
        id=execution_id_for(message_id),
        action_ref=data.get("action_ref") if isinstance(data.get("action_ref"), str) else None,
        parameters=data.get("parameters") if isinstance(data.get("parameters"), dict) else {},
        idempotency_key=data.get("idempotency_key") if isinstance(data.get("idempotency_key"), str) else None,
        message_id=message_id,
        correlation_id=correlation_id,
        timeout_s=None,
    )
    try:
        request = ExecutionRequest.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        execution.fail("invalid request: " + "; ".join(problems), problems=problems)
        return execution
    execution.action_ref = request.action_ref
    execution.parameters = request.parameters
    execution.idempotency_key = request.idempotency_key
    execution.timeout_s = request.timeout_seconds
    return execution


class ParameterValidator:
    """Compiled JSON-schema validators for catalogue entries, reused across requests."""

    def __init__(self) -> None:
        # Per action: the schema it was compiled from, and the validator. A re-registered action
        # brings a new schema object, which is compiled afresh.
        self._compiled: dict[str, tuple[dict[str, Any], jsonschema.protocols.Validator]] = {}

    def errors(self, spec: ActionSpec, parameters: dict[str, Any]) -> list[str]:
        cached = self._compiled.get(spec.ref)
        if cached is not None and cached[0] is spec.parameters_schema:
            validator = cached[1]
        else:
            cls = jsonschema.validators.validator_for(spec.parameters_schema, default=jsonschema.Draft202012Validator)
            validator = cls(spec.parameters_schema)
            self._compiled[spec.ref] = (spec.parameters_schema, validator)
        return [
            f"{'.'.join(str(p) for p in err.absolute_path) or 'parameters'}: {err.message}"
            for err in sorted(validator.iter_errors(parameters), key=lambda e: list(e.absolute_path))
        ]


def check_action(execution: NewExecution, spec: ActionSpec | None, validator: ParameterValidator) -> None:
    """Fail ``execution`` (in place) when its action is unknown or its parameters do not fit."""
    if execution.error:
        return
    if spec is None:
        execution.fail(f"unknown action {execution.action_ref!r}: no worker has registered it")
        return
    problems = validator.errors(spec, execution.parameters)
    if problems:
        execution.fail(
            f"invalid parameters for {spec.ref}: " + "; ".join(problems), problems=problems
        )
