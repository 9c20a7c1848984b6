"""Health loop: rewrites `executor.health_file` while the executor reaches PostgreSQL and RabbitMQ,
for `baton health` (and so for container health checks)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from common import health
from common.logging import get_logger
from common.queries import PING
from common.retry import TRANSIENT_ERRORS
from executor.resilience import every

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.health")

#: How often the file is rewritten; `baton health` allows a few missed beats.
INTERVAL_S = 2.0


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    path = ctx.settings.executor.health_file
    if path is None:
        await stop_event.wait()
        return

    async def report() -> None:
        try:
            await ctx.pool.fetchval(PING, timeout=INTERVAL_S)
            db_connected = True
        except TRANSIENT_ERRORS:
            db_connected = False
        health.write(path, service="executor", db_connected=db_connected, amqp_connected=ctx.amqp.connected.is_set())

    try:
        await every(INTERVAL_S, "health", stop_event, report)
    finally:
        health.remove(path)
