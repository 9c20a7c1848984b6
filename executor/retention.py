"""Retention loop: nothing grows without bound (DESIGN section 9).

Every `retention.prune_interval` it deletes finished executions (with their events) older than
`retention.executions_days`, and stopped or lost workers not seen for `retention.workers_days`
with their queues once those are empty (a queue still holding dispatches is left for its TTL to
drain; it is tried again next time).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from common.logging import get_logger
from common.retention import prune_executions, prune_workers
from executor.resilience import periodic

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.retention")

_DAY_S = 86400.0


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    cfg = ctx.settings.retention
    await periodic(
        log, "retention", stop_event, enabled=bool(cfg.executions_days or cfg.workers_days),
        every_s=cfg.prune_interval_s, step=lambda: prune(ctx),
        executions_days=cfg.executions_days, workers_days=cfg.workers_days,
    )


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
        workers, _ = await prune_workers(
            ctx.pool, ctx.amqp, ctx.names, older_than_s=cfg.workers_days * _DAY_S, batch_size=cfg.batch_size
        )
    if executions or workers:
        log.info("pruned", executions=executions, workers=len(workers))
    return executions, len(workers)
