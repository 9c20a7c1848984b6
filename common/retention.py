"""Retention: finished executions and their events are deleted after `retention.executions_days`,
in batches, oldest first, through an index on `finished_at`. Used by the executor's retention loop
and by `baton executions prune`."""

from __future__ import annotations

import asyncpg

from common.queries import executions as q


async def prune_executions(pool: asyncpg.Pool, *, older_than_s: float, batch_size: int) -> int:
    """Delete finished executions older than ``older_than_s``; returns how many went. Each batch is
    its own short transaction, so pruning a large history never holds locks for long."""
    total = 0
    while True:
        status = await pool.execute(q.PRUNE_FINISHED, older_than_s, batch_size)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch_size:
            return total
