"""Retention loop: nothing grows without bound (DESIGN section 9).

Every `retention.prune_interval` it deletes finished executions (with their events) older than
`retention.executions_days`, and stopped or lost workers not seen for `retention.workers_days`
with their queues once those are empty (a queue still holding dispatches is left for its TTL to
drain; it is tried again next time).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiormq.exceptions

from common import amqp
from common.logging import get_logger
from common.queries import workers as wq
from common.retention import prune_executions
from executor.resilience import every

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.retention")

_DAY_S = 86400.0


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    cfg = ctx.settings.retention
    if not cfg.executions_days and not cfg.workers_days:
        log.info("retention_disabled")
        await stop_event.wait()
        return
    log.info("retention_started", executions_days=cfg.executions_days, workers_days=cfg.workers_days)
    await every(cfg.prune_interval_s, "retention", stop_event, lambda: prune(ctx))
    log.info("retention_stopped")


async def prune(ctx: ExecutorContext) -> tuple[int, int]:
    """One pass; returns (executions deleted, workers deleted)."""
    cfg = ctx.settings.retention
    executions = 0
    if cfg.executions_days:
        executions = await prune_executions(
            ctx.pool, older_than_s=cfg.executions_days * _DAY_S, batch_size=cfg.batch_size
        )
    workers: list[str] = []
    if cfg.workers_days:
        for row in await ctx.pool.fetch(wq.SELECT_GONE, cfg.workers_days * _DAY_S, cfg.batch_size):
            # The row goes only with its queue, so that a queue still draining is found again.
            if await _delete_queue_if_idle(ctx, row["name"]):
                workers += [r["name"] for r in await ctx.pool.fetch(wq.DELETE_GONE, [row["name"]])]
    if executions or workers:
        log.info("pruned", executions=executions, workers=len(workers))
    return executions, len(workers)


async def _delete_queue_if_idle(ctx: ExecutorContext, worker: str) -> bool:
    """Delete the worker's queue unless it holds dispatches or has a consumer; True if it is gone."""
    queue = ctx.names.worker_queue(worker)
    channel = await ctx.amqp.channel()  # a failed passive declare closes its channel: one per attempt
    try:
        reason = await amqp.delete_queue_if_idle(
            channel, queue, bindings=[(ctx.names.dispatch_exchange, ctx.names.worker_routing_key(worker))]
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
