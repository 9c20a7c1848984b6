"""Maintenance loop: Baton's hot tables stay lean whether or not the server's autovacuum runs.

Every execution leaves dead row versions behind in `executions` (one per transition) and dead
entries in its indexes. Autovacuum normally clears them, but it may be off (as on some CI and
development servers) or slower than a steady load: then the partial indexes the scheduler and the
worker's claims read fill with dead entries, and every pass gets slower as history grows. Every
`retention.vacuum_interval` this loop vacuums (and analyzes) each hot table with at least
`retention.vacuum_dead_rows` dead rows; when autovacuum keeps up, it finds nothing to do.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import asyncpg

from common.logging import get_logger
from common.queries import maintenance as q
from executor.resilience import periodic

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.maintenance")

#: The longest one VACUUM may take.
VACUUM_TIMEOUT_S = 3600.0


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    cfg = ctx.settings.retention
    await periodic(
        log, "maintenance", stop_event, enabled=bool(cfg.vacuum_interval_s), every_s=cfg.vacuum_interval_s,
        step=lambda: vacuum_dead(ctx), vacuum_interval_s=cfg.vacuum_interval_s, vacuum_dead_rows=cfg.vacuum_dead_rows,
    )


async def vacuum_dead(ctx: ExecutorContext) -> list[str]:
    """One pass; returns the tables vacuumed."""
    rows = await ctx.pool.fetch(q.DEAD_ROWS, list(q.HOT_TABLES), ctx.settings.retention.vacuum_dead_rows)
    vacuumed = []
    for row in rows:
        started = time.monotonic()
        try:
            # Outside a transaction (VACUUM cannot run in one), on a pooled connection; a large
            # table takes longer than the pool's command timeout allows an ordinary statement.
            await ctx.pool.execute(q.vacuum(row["table_name"]), timeout=VACUUM_TIMEOUT_S)
        except asyncpg.PostgresError as exc:
            # Not the executor's to fix (a privilege, a setting): said once a pass, and tried again.
            log.warning("vacuum_failed", table=row["table_name"], error=str(exc))
            continue
        log.info(
            "table_vacuumed", table=row["table_name"], dead_rows=row["dead_rows"], live_rows=row["live_rows"],
            took_s=round(time.monotonic() - started, 3),
        )
        vacuumed.append(row["table_name"])
    return vacuumed
