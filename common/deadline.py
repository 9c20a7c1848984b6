"""A time bound that holds even when what it bounds cannot stop in time.

`asyncio.wait_for` cancels what timed out and then waits for it to unwind. A query to a database
whose network swallows every packet does not unwind promptly: asyncpg gives its connection back
only once its cancel request has reached the server, and that connection attempt waits out its
own timeout (a minute). A service on its way out cannot wait for that; `within` cancels and leaves
the operation to end in the background (the pool, terminated last, takes its connection with it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Set
from typing import Any, TypeVar

from common.errors import describe
from common.logging import get_logger

T = TypeVar("T")

#: How long a stopping service gives each step of its way out that waits on another party (a status
#: mark, a connection's close, loops unwinding after their cancel): long enough for a database or
#: broker that is slow, short enough that one that does not answer cannot stretch a stop by the
#: clients' own timeouts (a minute each).
STOP_STEP_TIMEOUT_S = 5.0

#: How long what a stopping worker does after its drain's deadline (recording the interruptions, its
#: last status mark, closing its connections) takes at most, all together, however many of those
#: steps wait on a party that does not answer: a worker exits within `worker.shutdown_timeout` and
#: this, which the compose file's grace period leaves room for.
STOP_AFTERMATH_S = 10.0

log = get_logger("baton.deadline")


class Allowance:
    """Time shared by the steps of a stop: each is bounded by the lesser of its own bound and what
    is left, so that together they cannot outlast it."""

    def __init__(self, total_s: float) -> None:
        self._ends_at = time.monotonic() + total_s

    def left_s(self, cap_s: float = STOP_STEP_TIMEOUT_S, *, reserve_s: float = 0.0) -> float:
        """What a step may take: at most ``cap_s``, and no more than what is left but
        ``reserve_s`` (kept for a step that must come after it); nothing once that is spent."""
        return max(0.0, min(cap_s, self._ends_at - time.monotonic() - reserve_s))


async def within(operation: Awaitable[T], timeout_s: float, *, what: str) -> T:
    """Await ``operation`` for at most ``timeout_s``; past it, cancel it without waiting for it to
    unwind and raise `TimeoutError`. ``what`` names it in the log should it end in error later."""
    task = asyncio.ensure_future(operation)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(timeout_s, 0))
    except asyncio.CancelledError:
        _abandon(task, what)
        raise
    if not done:
        _abandon(task, what)
        raise TimeoutError(f"{what} did not finish within {timeout_s:g} s")
    return task.result()


async def wait_unwound(
    tasks: Set[asyncio.Future[Any]], logger: Any, kind: str, *, timeout_s: float = STOP_STEP_TIMEOUT_S
) -> set[asyncio.Future[Any]]:
    """Wait for cancelled ``tasks`` to unwind, for ``timeout_s`` at most, and return those
    left behind: an action slow to honour its cancel, or a query on a database that swallows its
    packets (a pool's close, terminated if need be, ends that one). ``logger`` says which failed as
    they unwound and which were left, as `cancelled_task_failed` and `tasks_left_behind`, each
    naming the tasks' ``kind``."""
    if not tasks:
        return set()
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.warning("cancelled_task_failed", kind=kind, task=_name(task), error=describe(exc))
    if pending:
        logger.warning(
            "tasks_left_behind", kind=kind, count=len(pending), tasks=sorted(_name(t) for t in pending),
            waited_s=round(timeout_s, 2),
        )
    return pending


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


def _abandon(task: asyncio.Future[T], what: str) -> None:
    task.cancel()
    task.add_done_callback(lambda done: _ended(done, what))


def _ended(task: asyncio.Future[T], what: str) -> None:
    """How an abandoned operation ended, read so that asyncio does not report it as never read."""
    error = None if task.cancelled() else task.exception()
    if error is not None:
        log.debug("abandoned_operation_ended", operation=what, error=describe(error))
