"""Retry policies (tenacity) for infrastructure calls: connecting to PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import logging

import aiormq.exceptions
import asyncpg
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

_log = logging.getLogger("baton.retry")

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


def connect_retrying(max_wait_s: float = 60.0) -> AsyncRetrying:
    """Exponential backoff with jitter on connect, giving up after ``max_wait_s``."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_ERRORS),
        wait=wait_exponential(multiplier=0.1, max=5.0) + wait_random(0, 0.5),
        stop=stop_after_delay(max_wait_s),
        before_sleep=before_sleep_log(_log, logging.WARNING),
        reraise=True,
    )
