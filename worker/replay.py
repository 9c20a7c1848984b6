"""Replay decisions of a durable run, without I/O: step identity, what a recorded step means when
the code reaches its position again, timers, and `ctx.store`'s state as of a step.

A step's identity is its position in the run: a counter taken when the step is *called*, before
any await, so that steps started together (`asyncio.gather(a(), b())`) number in the order they are
written, whichever finishes first. Its name is recorded beside it and compared on replay: a
different step at a recorded position means the code changed under the run, which fails it with
an error naming both, rather than hand the new step an old step's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class NonDeterminismError(BaseException):
    """The code no longer matches the run's recorded steps. A BaseException, so that a workflow's
    own ``except Exception`` cannot swallow it: the run fails, with this error."""


@dataclass(frozen=True)
class StepRecord:
    """A step's checkpoint as stored (`workflow_steps`)."""

    step_id: int
    name: str
    status: Literal["pending", "completed", "failed"]
    result: Any = None
    error: dict[str, Any] | None = None
    store_delta: dict[str, Any] | None = None
    attempts: int = 1
    child_id: Any = None
    wake_at_s: float | None = None  # epoch seconds, database clock


@dataclass
class Replay:
    """The recorded steps of a run, consulted as the code reaches each position again."""

    steps: dict[int, StepRecord] = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[StepRecord]) -> Replay:
        return cls({r.step_id: r for r in records})

    @property
    def last_step_id(self) -> int:
        return max(self.steps, default=0)

    def expect(self, step_id: int, name: str) -> StepRecord | None:
        """The record at ``step_id`` if the code calls the same step there; None if nothing is
        recorded there yet. Raises NonDeterminismError if another step was recorded there."""
        record = self.steps.get(step_id)
        if record is not None and record.name != name:
            raise NonDeterminismError(
                f"non-deterministic workflow: step {step_id} was recorded as {record.name!r}, but the code now "
                f"calls {name!r} at that position (the workflow's code changed while this run was in flight; "
                f"finish or cancel such runs before deploying a change that reorders their steps)"
            )
        return record

    def check_finished(self, steps_called: int) -> None:
        """At the end of a run: the code must have reached every step the run recorded."""
        missing = sorted(i for i in self.steps if i > steps_called)
        if missing:
            first = self.steps[missing[0]]
            raise NonDeterminismError(
                f"non-deterministic workflow: the run recorded step {first.step_id} ({first.name!r}), but the code "
                f"now returns after {steps_called} steps (the workflow's code changed while this run was in flight)"
            )


TimerDecision = Literal["done", "inline", "suspend"]


def timer_decision(remaining_s: float, max_inline_sleep_s: float) -> TimerDecision:
    """What a durable timer with ``remaining_s`` left does: it is over, it is waited out on the
    worker (short), or the run leaves its worker until it is due (long)."""
    if remaining_s <= 0:
        return "done"
    if remaining_s <= max_inline_sleep_s:
        return "inline"
    return "suspend"


def remaining_attempts(retries: int, attempts_started: int) -> int:
    """How many tries a step still has: ``retries`` + 1 in all, less those that failed before a
    crash (the attempt that was under way when it struck is tried again)."""
    failed_before = max(attempts_started - 1, 0)
    return max(retries + 1 - failed_before, 1)



def backoff_delay_s(retry_delay_s: float, backoff: float, retry_number: int, jitter: float, cap_s: float = 3600.0) -> float:
    """Before retry number ``retry_number`` (1-based), of a step or of an action: ``retry_delay_s``
    x ``backoff`` ^ (n - 1), capped, and spread by ``jitter`` (a fraction in [0, 1), drawn by the
    caller) so that what fails together does not retry together."""
    try:
        base = min(retry_delay_s * backoff ** max(retry_number - 1, 0), cap_s)
    except OverflowError:  # a large backoff to a large power: the cap, long before that
        base = cap_s
    return base * (1 + jitter / 2)
