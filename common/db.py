"""PostgreSQL access: the pool (with JSON codecs) and the versioned migrations."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg
from tenacity import retry_if_exception_type

from common.deadline import STOP_STEP_TIMEOUT_S, within
from common.errors import describe
from common.logging import get_logger
from common.queries import migrations as mq
from common.retry import TRANSIENT_ERRORS, connect_retrying, worth_waiting_out
from common.values import masked_url, where

log = get_logger("baton.db")

#: Whatever a query can be run on: a connection of one's own, one acquired from a pool, or the
#: pool itself (which acquires one per call). Functions that only run queries take any of them.
Executor = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool

_T = TypeVar("_T")

# An arbitrary constant; every process that migrates takes this lock, so that two executors
# starting at once apply each migration exactly once.
_MIGRATION_LOCK_KEY = 0x6261746F6E  # "baton"


#: Every statement is planned with its actual parameters and the table as it is now. A generic plan
#: cached while a table was nearly empty (the first minutes of a deployment) would otherwise keep
#: scanning it whole for the life of the connection, as it grows. (The few statements run for every
#: execution are the exception, on connections of their own: `HOT_PATH_SETTINGS`.)
#
#: A client that vanishes without a word (its host gone, or a network that swallows its packets)
#: leaves its session behind, holding its locks: a worker's name lock, or a transaction's row
#: locks, which would hold up the executor's recovery of that very run until the kernel's
#: keepalive notices, two hours later. Every Baton transaction is statements only, milliseconds
#: apart, so one idle for a minute is abandoned and the server ends it; a silent peer of a session
#: outside a transaction is probed after 10 s and dropped some 15 s later.
SERVER_SETTINGS = {
    "plan_cache_mode": "force_custom_plan",
    "idle_in_transaction_session_timeout": "60s",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}


#: The hot path's own connections (`connect(hot_path=True)`): intake's insert and its read of the
#: workers' room, a worker's claim and finish. Planned once per connection (a generic plan), as
#: planning them anew cost PostgreSQL more than running them (0.3-0.5 ms a call against 0.05-0.4).
#: Because a plan cached on a nearly empty table (above) would stay, their plans are pinned to one
#: shape, whatever the tables held when they were planned: sequential scans, hash joins and merge
#: joins are priced out, so each statement reaches its rows through an index (nested loops), which
#: costs what the rows do as the table grows. JIT is off: a priced-out scan of a table with no other
#: way in (`workers`) would otherwise cross its cost threshold and compile every call. Only
#: statements whose every table has an index they can use belong here (a test in
#: `tests/test_hardening_integration.py` caches each plan on an empty table and reads it later).
HOT_PATH_SETTINGS = {
    **SERVER_SETTINGS,
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "jit": "off",
}


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state of ours (no session locks, no LISTEN, no SET):
    skip asyncpg's reset query on every release. Open transactions are still ended by asyncpg."""


async def connect(url: str, *, max_size: int = 10, max_wait_s: float = 60.0, hot_path: bool = False) -> asyncpg.Pool:
    """A pool to ``url``, waiting (with backoff) for PostgreSQL to accept connections; with
    ``hot_path``, one whose statements are planned once (`HOT_PATH_SETTINGS`)."""
    async for attempt in connect_retrying(max_wait_s, what="PostgreSQL", at=where(url)):
        with attempt:
            return await asyncpg.create_pool(
                url, min_size=1, max_size=max_size, init=_init_connection, reset=_keep_session, command_timeout=60,
                server_settings=HOT_PATH_SETTINGS if hot_path else SERVER_SETTINGS,
            )
    raise AssertionError("unreachable")


async def close_pool(pool: asyncpg.Pool, *, timeout_s: float = STOP_STEP_TIMEOUT_S, **context: object) -> None:
    """Close ``pool`` gracefully if its connections let go within ``timeout_s``, else terminate
    it: one held by a query the network swallowed would hold a stop up for minutes."""
    try:
        await within(pool.close(), timeout_s, what="close_database_pool")
    except TimeoutError:
        log.warning("database_pool_terminated", waited_s=round(timeout_s, 2), **context)
        pool.terminate()


async def close_connection(conn: asyncpg.Connection, *, timeout_s: float = STOP_STEP_TIMEOUT_S) -> None:
    """Close ``conn`` gracefully within ``timeout_s``, else drop it (`close_pool`'s why)."""
    try:
        await within(conn.close(), timeout_s, what="close_database_connection")
    except TimeoutError:
        conn.terminate()


async def connect_one(url: str, *, max_wait_s: float = 60.0) -> asyncpg.Connection:
    """A single connection (for LISTEN, or a session-scoped lock), with the same codecs."""
    async for attempt in connect_retrying(max_wait_s, what="PostgreSQL", at=where(url)):
        with attempt:
            conn = await asyncpg.connect(url, server_settings=SERVER_SETTINGS)
            await _init_connection(conn)
            return conn
    raise AssertionError("unreachable")


def _lost_create_race(exc: asyncpg.PostgresError) -> bool:
    """Whether CREATE DATABASE failed because another process took the name first: it saw the
    database (``DuplicateDatabaseError``), or both inserted into pg_database at once and this one
    lost on its unique name index (``UniqueViolationError``)."""
    if isinstance(exc, asyncpg.exceptions.DuplicateDatabaseError):
        return True
    return isinstance(exc, asyncpg.exceptions.UniqueViolationError) and (
        getattr(exc, "table_name", None) == "pg_database"
        or (getattr(exc, "constraint_name", None) or "").startswith("pg_database")
    )


class _NotThereYet(Exception):
    """The database was created (here or elsewhere) but cannot be connected to yet: look again."""


async def _exists(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.exceptions.InvalidCatalogNameError:
        return False
    await conn.close()
    return True


async def ensure_database(url: str, *, max_wait_s: float = 60.0) -> bool:
    """Create the database ``url`` names if it does not exist yet; True if this call created it.

    Safe for any number of processes starting at once against a missing database: a lost race to
    create it means another process created it, and the database is only reported there once a
    connection to it succeeds (a process that looks before the creator's commit is visible looks
    again, with backoff). Transient errors (PostgreSQL not up yet, another session briefly on the
    template database) are retried for up to ``max_wait_s``."""
    name = urlsplit(url).path.lstrip("/")
    created = False
    retrying = connect_retrying(max_wait_s, what="PostgreSQL", at=where(url)).copy(
        retry=retry_if_exception_type((*TRANSIENT_ERRORS, asyncpg.exceptions.ObjectInUseError, _NotThereYet))
    )
    async for attempt in retrying:
        with attempt:
            if await _exists(url):
                return created
            if not name or '"' in name:
                raise ValueError(f"database.url names no database that can be created: {masked_url(url)!r}")
            admin = await asyncpg.connect(url, database="postgres")
            try:
                await admin.execute(mq.create_database(name))
            except asyncpg.PostgresError as exc:
                if not _lost_create_race(exc):
                    raise
                log.info("database_created_elsewhere", database=name)
            else:
                created = True
                log.info("database_created", database=name)
            finally:
                await admin.close()
            if await _exists(url):
                return created
            raise _NotThereYet(f"database {name!r} was created but cannot be connected to yet")
    raise AssertionError("unreachable")


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("common.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: Executor) -> list[str]:
    """Apply pending migrations in one transaction; returns the names applied."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as c:
            return await migrate(c)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute(mq.LOCK, _MIGRATION_LOCK_KEY)
        await conn.execute(mq.CREATE_TABLE)
        done = {r["version"] for r in await conn.fetch(mq.APPLIED)}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(mq.RECORD, version, name)
            applied.append(name)
    for name in applied:
        log.info("migration_applied", migration=name)
    return applied


async def until_available(operation: Callable[[], Awaitable[_T]], *, what: str, max_wait_s: float = 300.0) -> _T:
    """Run ``operation()`` (a coroutine factory), waiting out a database that is briefly away.

    Used where giving up would lose work held only in memory (a batch not yet recorded); after
    ``max_wait_s`` the error propagates and the service stops loudly. Each wait is logged once,
    as `waiting_for_service` naming the operation."""
    try:
        # Nearly every call succeeds at once, and builds no retry loop: on the hot path, building
        # one cost about as much as the statement's own Python side.
        return await operation()
    except TRANSIENT_ERRORS as exc:
        if not worth_waiting_out(exc):
            raise
        log.warning(
            "waiting_for_service", dependency="PostgreSQL", operation=what, error=describe(exc), retry_in_s=0.0,
            giving_up_in_s=max_wait_s,
        )
    async for attempt in connect_retrying(max_wait_s, what="PostgreSQL", operation=what):
        with attempt:
            return await operation()
    raise AssertionError("unreachable")
