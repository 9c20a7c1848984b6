"""Retry policies (tenacity) for infrastructure calls: connecting to PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiormq.exceptions
import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from common.errors import describe
from common.logging import get_logger

_log = get_logger("baton.retry")

#: Errors that mean "the service is not there (yet)": worth waiting for, never a bug.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.PostgresConnectionError,
    # What asyncpg raises for an operation caught by a connection breaking under it.
    asyncpg.exceptions.InternalClientError,
    # PostgreSQL recovering from a crash, a failover to a replica that is still read-only, and
    # lost races that PostgreSQL resolved by aborting one side: all worth another try.
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)


#: What a statement may run into when the database, not the code, is at fault or away: anything
#: above, asyncpg's InternalClientError among them (a connection left mid-operation by a query
#: that timed out, as while PostgreSQL restarts), or a statement PostgreSQL refuses. Loops that
#: must outlast an outage (a heartbeat, recording an interruption, rescheduling a dispatch)
#: catch these and carry on.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, asyncpg.PostgresError)


#: Refusals that no wait will change (wrong user or password): never retried.
AUTH_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ProbableAuthenticationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
)


def worth_waiting_out(exc: BaseException) -> bool:
    """A service that is not there (yet), as opposed to one that refuses these credentials."""
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, AUTH_ERRORS)


def connect_retrying(
    max_wait_s: float = 60.0, *, what: str, at: str | None = None, operation: str | None = None
) -> AsyncRetrying:
    """Exponential backoff with jitter on connect, giving up after ``max_wait_s``; a wrong user or
    password fails at once. Each wait is logged (`waiting_for_service`: which dependency, where, for
    which operation, why, for how much longer)."""
    started = time.monotonic()

    def say(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        _log.warning(
            "waiting_for_service",
            # `dependency`, not `service`: that names the process logging (executor, worker).
            dependency=what, at=at, operation=operation,
            error=describe(exc) if exc else None,
            retry_in_s=round(state.next_action.sleep, 2) if state.next_action else None,
            giving_up_in_s=round(max(max_wait_s - (time.monotonic() - started), 0), 1),
        )

    return AsyncRetrying(
        retry=retry_if_exception(worth_waiting_out),
        wait=wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.5),
        stop=stop_after_delay(max_wait_s),
        before_sleep=say,
        reraise=True,
    )


#: Races PostgreSQL settled by aborting one side. The aborted transaction was rolled back whole, so
#: running it again is always safe, unlike after a lost connection (its commit may have gone through).
LOST_RACES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

_T = TypeVar("_T")


async def retry_lost_races(operation: Callable[[], Awaitable[_T]], *, attempts: int = 5) -> _T:
    """Run the transaction ``operation()`` again (a moment later) when PostgreSQL aborted it to
    settle a race, up to ``attempts`` times; any other error is raised at once."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(LOST_RACES), stop=stop_after_attempt(attempts),
        wait=wait_random(0.05, 0.5), reraise=True,
    ):
        with attempt:
            return await operation()
    raise AssertionError("unreachable")
