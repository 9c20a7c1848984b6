"""Message and record schemas shared by executor, worker and client."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from common.values import parse_duration, parse_moment


class Status(enum.StrEnum):
    REQUESTED = "requested"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    PAUSED = "paused"
    SLEEPING = "sleeping"
    WAITING = "waiting"


TERMINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.TIMEOUT, Status.CANCELLED})


#: Deepest nesting of arrays and objects in an invocation's parameters, the parameters object
#: itself being level 1. Both sides apply it (the executor to the request, the worker before its
#: model), well below where a JSON parser on the way gives up (pydantic's stops at 200 levels).
MAX_PARAMETERS_DEPTH = 100


def json_depth(value: Any) -> int:
    """How deeply ``value``'s arrays and objects nest (a scalar is 0); without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


class ExecutionRequest(BaseModel):
    """The body of `execution.requested` (DESIGN section 2)."""

    # Strict: a JSON body's values are taken as they are ("5" is not a timeout), so that each field
    # that passed its checks can be stored as it came even when another field failed.
    # Unknown top-level fields are ignored (intake records a warning with the execution), so that a
    # client may send fields a later Baton reads; unknown *parameters* are still refused.
    model_config = ConfigDict(extra="ignore", strict=True)

    action_ref: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")
    parameters: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=500)
    timeout_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: Retries of an application failure, overriding the action's `retries`.
    max_retries: int | None = Field(None, ge=0, le=1000)
    #: Not to run before this time (RFC 3339, with a time zone): a delayed execution.
    not_before: dt.datetime | None = None

    @field_validator("not_before", mode="before")
    @classmethod
    def _aware_time(cls, value: Any) -> Any:
        # Strict mode takes no string for a datetime: parse RFC 3339 here, and insist on a zone.
        if isinstance(value, str):
            try:
                return parse_moment(value, naive_is_utc=False)
            except ValueError as exc:
                raise ValueError(f"must be an RFC 3339 date-time that names its time zone: {exc}") from None
        return value

    @field_validator("timeout_seconds", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        # The same durations as the configuration: 30, "30s", "5m", "250ms".
        if isinstance(value, str):
            return parse_duration(value)
        return value

    @field_validator("parameters")
    @classmethod
    def _not_too_deep(cls, value: dict[str, Any]) -> dict[str, Any]:
        if json_depth(value) > MAX_PARAMETERS_DEPTH:
            raise ValueError(f"nested deeper than {MAX_PARAMETERS_DEPTH} levels")
        return value


class Dispatch(BaseModel):
    """One execution handed to a worker: identity and fencing only. What to run (action,
    parameters, timeout) the worker reads from the row its fenced claim returns, never from the
    message, which anyone able to reach the broker could have written."""

    execution_id: uuid.UUID
    attempt: int


#: The most dispatches one message may carry (a scheduling pass sends at most its batch per worker).
MAX_DISPATCHES_PER_MESSAGE = 1000


class DispatchBatch(BaseModel):
    """What the executor sends to a worker's queue: the dispatches one scheduling pass placed on
    that worker, in one message, so that a burst costs the broker a message per worker per pass
    rather than one per execution. Each is claimed (or found stale) on its own; the message is
    acked once every one of them has been."""

    dispatches: list[Dispatch] = Field(min_length=1, max_length=MAX_DISPATCHES_PER_MESSAGE)


class Assignment(BaseModel):
    """A claimed run as recorded in PostgreSQL: what the worker runs."""

    execution_id: uuid.UUID
    attempt: int
    action_ref: str
    parameters: dict[str, Any]
    timeout_s: float | None = None
    failed_tries: int = 0  # application failures already retried
    max_retries: int | None = None  # the invocation's own limit (None: the action's)


class RecordedRequest(TypedDict):
    """What intake reads back of an execution it recorded (`INSERT_REQUESTS`): enough to reply to
    its request and to announce it if it failed there."""

    id: uuid.UUID
    action_ref: str | None
    status: str
    attempt: int
    worker: str | None
    finished_at: dt.datetime | None
    error: dict[str, Any] | None
    warnings: list[str] | None
    not_before: dt.datetime | None


class ExistingRequest(RecordedRequest):
    """An execution a request turned out to repeat (`FIND_EXISTING`), with what it was given."""

    parameters: dict[str, Any]
    timeout_s: float | None
    idempotency_key: str | None


class ExecutionSummary(TypedDict):
    """An execution as a list shows it (`executions.LIST_PAGE`)."""

    id: uuid.UUID
    action_ref: str | None
    status: str
    attempt: int
    worker: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: dict[str, Any] | None


class FinishedMinute(TypedDict):
    """Executions finished in one minute (`executions.FINISHED_PER_MINUTE`)."""

    minute: dt.datetime
    completed: int
    failed: int


class WorkerSummary(TypedDict):
    """A worker as `baton workers list --json` prints it (`workers.LIST`, JSON-ready: times as
    ISO 8601 strings)."""

    name: str
    status: str
    runtimes: list[str]
    max_concurrent_tasks: int
    in_flight: int
    last_heartbeat: str | None
    heartbeat_age_s: float | None
    heartbeat_interval_s: float
    hostname: str | None
    pid: int | None
    started_at: str | None
    actions: list[str] | None


class ExecutionRow(TypedDict):
    """A whole `executions` row (``SELECT *``) as a dict, JSON columns decoded."""

    id: uuid.UUID
    action_ref: str | None
    parameters: dict[str, Any]
    status: str
    attempt: int
    worker: str | None
    timeout_s: float | None
    idempotency_key: str | None
    message_id: str | None
    correlation_id: str | None
    result: Any
    error: dict[str, Any] | None
    recovery_attempts: int
    last_event_seq: int
    created_at: dt.datetime
    scheduled_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    schedule_attempts: int
    previous_worker: str | None
    incarnation: uuid.UUID | None
    wake_at: dt.datetime | None
    waiting_on: uuid.UUID | None
    waiting_for: str | None
    parent_id: uuid.UUID | None
    deadline: dt.datetime | None
    pause_requested: bool
    store: dict[str, Any]
    retry_of: uuid.UUID | None
    not_before: dt.datetime | None
    failed_tries: int
    max_retries: int | None
    schedule_name: str | None
    scheduled_for: dt.datetime | None
    warnings: list[str] | None


class Acceptance(BaseModel):
    """The executor's reply to a request that set `reply_to`."""

    execution_id: uuid.UUID | None = None
    status: str | None = None
    duplicate: bool = False
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)  # what intake ignored in the request


#: The executor's reply to a batch of requests that set `reply_to` and the header `ANSWERS_HEADER`
#: to `list`: an answer per request, in the batch's order (null: nothing is known of that request).
#: Without the header, each request of a batch is answered on its own, as before there was a list.
ANSWERS: TypeAdapter[list[Acceptance | None]] = TypeAdapter(list[Acceptance | None])
ANSWERS_HEADER = "x-baton-reply"


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def jsonable_row(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    """A database row as JSON-ready values (UUIDs and timestamps as strings)."""
    return {key: _jsonable(value) for key, value in dict(row).items()}


def execution_json(
    row: Mapping[str, Any] | asyncpg.Record, events: Sequence[Mapping[str, Any] | asyncpg.Record] | None = None
) -> dict[str, Any]:
    """An execution as `baton executions show --json` prints it, and as notifications carry it."""
    out = jsonable_row(row)
    out.pop("pg_notify", None)
    if events is not None:
        out["events"] = [{k: v for k, v in jsonable_row(ev).items() if k != "execution_id"} for ev in events]
    return out
