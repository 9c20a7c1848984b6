"""Interrupting a run: the one way a `running` execution becomes `interrupted`, with the
`workflow.interrupted` event that recovery reads (DESIGN section 6). The sweeper uses it for a lost
worker's runs, a worker for what it gives up (drain deadline, standing down) and for runs recorded
on it that it does not run."""

from __future__ import annotations

import uuid
from typing import Any

from common.db import Executor
from common.queries import executions as q
from common.recovery import InterruptReason, RecoveryPolicy, interrupted_event


async def interrupt(
    conn: Executor,
    *,
    execution_id: uuid.UUID,
    attempt: int,
    worker: str,
    incarnation: uuid.UUID | None,
    reason: InterruptReason,
    error: str,
    policy: RecoveryPolicy,
    recovery_attempts: int,
) -> dict[str, Any] | None:
    """Fenced on the attempt and the worker (and on the incarnation when one is given: a worker
    interrupting its own run); returns the event data if the write took effect, None if the run
    had moved on."""
    event = interrupted_event(
        reason=reason, worker=worker, error=error, policy=policy, recovery_attempts=recovery_attempts
    )
    row = await conn.fetchrow(q.INTERRUPT, execution_id, attempt, worker, event, incarnation)
    return event if row is not None else None
