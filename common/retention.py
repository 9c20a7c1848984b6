"""Retention: finished executions and their events are deleted after `retention.executions_days`,
in batches, oldest first, through an index on `finished_at`; workers stopped or lost for longer than
`retention.workers_days` go with their queues once those are empty. Used by the executor's retention
loop and by `baton executions prune` and `baton workers prune`."""

from __future__ import annotations

import aiormq.exceptions
import asyncpg
from aio_pika.abc import AbstractRobustConnection

from common import amqp
from common.logging import get_logger
from common.queries import executions as q
from common.queries import workers as wq

log = get_logger("baton.retention")


async def prune_executions(pool: asyncpg.Pool, *, older_than_s: float, batch_size: int) -> int:
    """Delete finished executions older than ``older_than_s``; returns how many went. Each batch is
    its own short transaction, so pruning a large history never holds locks for long."""
    total = 0
    while True:
        deleted = int(await pool.fetchval(q.PRUNE_FINISHED, older_than_s, batch_size))
        total += deleted
        if deleted < batch_size:
            return total


async def prune_workers(
    pool: asyncpg.Pool, connection: AbstractRobustConnection, names: amqp.Names, *, older_than_s: float,
    batch_size: int,
) -> tuple[list[str], list[str]]:
    """Delete workers stopped or lost for longer than ``older_than_s``, each with its queue; one
    whose queue still holds dispatches (or has a consumer) is kept, to be found again. Returns
    (the workers deleted, those kept for their queue)."""
    removed: list[str] = []
    kept: list[str] = []
    for row in await pool.fetch(wq.SELECT_GONE, older_than_s, batch_size):
        if await _delete_queue_if_idle(connection, names, row["name"]):
            removed += [r["name"] for r in await pool.fetch(wq.DELETE_GONE, [row["name"]])]
        else:
            kept.append(row["name"])
    return removed, kept


async def _delete_queue_if_idle(connection: AbstractRobustConnection, names: amqp.Names, worker: str) -> bool:
    """Delete the worker's queue unless it holds dispatches or has a consumer; True if it is gone."""
    queue = names.worker_queue(worker)
    channel = await connection.channel()  # a failed passive declare closes its channel: one per attempt
    try:
        reason = await amqp.delete_queue_if_idle(
            channel, queue, bindings=[(names.dispatch_exchange, names.worker_routing_key(worker))]
        )
    except aiormq.exceptions.ChannelNotFoundEntity:
        return True  # already gone
    finally:
        if not channel.is_closed:
            await channel.close()
    if reason is not None:
        log.info("worker_queue_kept", queue=queue, reason=reason)
        return False
    return True
