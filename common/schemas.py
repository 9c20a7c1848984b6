"""Message and record schemas shared by executor, worker and client."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Status(str, enum.Enum):
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


TERMINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.TIMEOUT, Status.CANCELLED})


class ExecutionRequest(BaseModel):
    """The body of `execution.requested` (DESIGN section 2)."""

    model_config = ConfigDict(extra="forbid")

    action_ref: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")
    parameters: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=500)
    timeout_seconds: float | None = Field(None, gt=0)


class Dispatch(BaseModel):
    """What the executor sends to a worker's queue; `(execution_id, attempt)` fences the worker."""

    execution_id: uuid.UUID
    attempt: int
    action_ref: str
    parameters: dict[str, Any]
    timeout_s: float | None = None


class Acceptance(BaseModel):
    """The executor's reply to a request that set `reply_to`."""

    execution_id: uuid.UUID | None = None
    status: str | None = None
    duplicate: bool = False
    error: str | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def jsonable_row(row: Any) -> dict[str, Any]:
    """A database row as JSON-ready values (UUIDs and timestamps as strings)."""
    return {key: _jsonable(value) for key, value in dict(row).items()}


def execution_json(row: Any, events: list[Any] | None = None) -> dict[str, Any]:
    """An execution as `baton executions show --json` prints it, and as notifications carry it."""
    out = jsonable_row(row)
    out.pop("pg_notify", None)
    if events is not None:
        out["events"] = [{k: v for k, v in jsonable_row(ev).items() if k != "execution_id"} for ev in events]
    return out
