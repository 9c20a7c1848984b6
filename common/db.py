"""PostgreSQL access: the pool (with JSON codecs) and the versioned migrations."""

from __future__ import annotations

import json
from importlib import resources
from urllib.parse import urlsplit

import asyncpg

from common.logging import get_logger
from common.retry import connect_retrying

log = get_logger("baton.db")

# An arbitrary constant; every process that migrates takes this lock, so that two executors
# starting at once apply each migration exactly once.
_MIGRATION_LOCK_KEY = 0x6261746F6E  # "baton"


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state of ours (no session locks, no LISTEN, no SET):
    skip asyncpg's reset query on every release. Open transactions are still ended by asyncpg."""


async def connect(url: str, *, max_size: int = 10, max_wait_s: float = 60.0) -> asyncpg.Pool:
    """A pool to ``url``, waiting (with backoff) for PostgreSQL to accept connections."""
    async for attempt in connect_retrying(max_wait_s):
        with attempt:
            return await asyncpg.create_pool(
                url, min_size=1, max_size=max_size, init=_init_connection, reset=_keep_session, command_timeout=60
            )
    raise AssertionError("unreachable")


async def connect_one(url: str, *, max_wait_s: float = 60.0) -> asyncpg.Connection:
    """A single connection (for LISTEN, or a session-scoped lock), with the same codecs."""
    async for attempt in connect_retrying(max_wait_s):
        with attempt:
            conn = await asyncpg.connect(url)
            await _init_connection(conn)
            return conn
    raise AssertionError("unreachable")


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if it does not exist yet; True if it was created."""
    try:
        async for attempt in connect_retrying(60.0):
            with attempt:
                conn = await asyncpg.connect(url)
    except asyncpg.exceptions.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    name = urlsplit(url).path.lstrip("/")
    if not name or '"' in name:
        raise ValueError(f"database.url names no database that can be created: {url!r}")
    admin = await asyncpg.connect(url, database="postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.exceptions.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    log.info("database_created", database=name)
    return True


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("common.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """Apply pending migrations in one transaction; returns the names applied."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as c:
            return await migrate(c)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append(name)
    for name in applied:
        log.info("migration_applied", migration=name)
    return applied


async def until_available(operation, *, what: str, max_wait_s: float = 300.0):
    """Run ``operation()`` (a coroutine factory), waiting out a database that is briefly away.

    Used where giving up would lose work held only in memory (a batch not yet recorded); after
    ``max_wait_s`` the error propagates and the service stops loudly."""
    async for attempt in connect_retrying(max_wait_s):
        with attempt:
            if attempt.retry_state.attempt_number > 1:
                log.info("database_retry", operation=what, attempt=attempt.retry_state.attempt_number)
            return await operation()
    raise AssertionError("unreachable")
