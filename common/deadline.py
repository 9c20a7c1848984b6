"""A time bound that holds even when what it bounds cannot stop in time.

`asyncio.wait_for` cancels what timed out and then waits for it to unwind. A query to a database
whose network swallows every packet does not unwind promptly: asyncpg gives its connection back
only once its cancel request has reached the server, and that connection attempt waits out its
own timeout (a minute). A service on its way out cannot wait for that; `within` cancels and leaves
the operation to end in the background (the pool, terminated last, takes its connection with it).
"""

from __future__ import annotations

import asyncio
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

log = get_logger("baton.deadline")


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


async def wait_unwound(tasks: Set[asyncio.Future[Any]], logger: Any, kind: str) -> set[asyncio.Future[Any]]:
    """Wait for cancelled ``tasks`` to unwind, for `STOP_STEP_TIMEOUT_S` at most, and return those
    left behind: an action slow to honour its cancel, or a query on a database that swallows its
    packets (a pool's close, terminated if need be, ends that one). ``logger`` says which failed as
    they unwound and which were left, as `cancelled_task_failed` and `tasks_left_behind`, each
    naming the tasks' ``kind``."""
    if not tasks:
        return set()
    done, pending = await asyncio.wait(tasks, timeout=STOP_STEP_TIMEOUT_S)
    for task in done:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.warning("cancelled_task_failed", kind=kind, task=_name(task), error=describe(exc))
    if pending:
        logger.warning(
            "tasks_left_behind", kind=kind, count=len(pending), tasks=sorted(_name(t) for t in pending),
            waited_s=STOP_STEP_TIMEOUT_S,
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
