"""What a workflow's context records through (a `Journal`: PostgreSQL in `worker.durable`, nothing
for a transient run), the records themselves, and how a run leaves its worker or a step fails."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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


