"""Requested-timeout monitor: a request that has waited `executor.requested_timeout` as `requested`
for an action that no live worker has served for that long fails with a reason naming the action,
instead of waiting forever. Work for an action that some live worker serves, or served a moment
ago (its only worker is restarting, or missed a heartbeat), is only waiting its turn and is left
alone. Each action's backlog is read through its own index range, oldest first."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common import metrics
from common.actions import CORE_ACTIONS
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import actions as aq
from common.queries import executions as q
from common.queries import workers as wq
from executor.resilience import every

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.requested_timeout")

BATCH = 500


def expirable(unserved_for_s: Mapping[str, float | None], timeout_s: float) -> list[str]:
    """Of the actions no live worker serves, by seconds since a worker last served each (None:
    never), those whose requests may time out: unserved for at least the whole timeout."""
    return sorted(a for a, age_s in unserved_for_s.items() if age_s is None or age_s >= timeout_s)


def requested_timeout_error(action_ref: str, timeout_s: float, age_s: float) -> dict[str, Any]:
    return {
        "error": (
            f"no live worker serves action {action_ref!r}: the request waited {int(age_s)} s as requested, "
            f"and no worker has served the action for at least {timeout_s:g} s (executor.requested_timeout); "
            f"start a worker that serves it and submit again"
        ),
        "failed_by": "requested_timeout_monitor",
        "timeout_seconds": timeout_s,
        "age_seconds": int(age_s),
        "original_status": "requested",
    }


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    cfg = ctx.settings.executor
    if cfg.requested_timeout_s <= 0:
        log.info("requested_timeout_disabled")
        await stop_event.wait()
        return
    interval_s = min(cfg.timeout_check_interval_s, cfg.requested_timeout_s)
    log.info("requested_timeout_started", requested_timeout_s=cfg.requested_timeout_s, interval_s=interval_s)

    async def step() -> None:
        while await check(ctx) == BATCH:
            pass

    await every(interval_s, "requested_timeout_check", stop_event, step)
    log.info("requested_timeout_stopped")


async def check(ctx: ExecutorContext) -> int:
    cfg = ctx.settings.executor
    failed = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        served = {r["ref"] for r in await conn.fetch(wq.SERVED_ACTIONS, cfg.heartbeat_staleness_multiplier)}
        known = {r["ref"] for r in await conn.fetch(aq.REFS)} | set(CORE_ACTIONS)
        unserved = sorted(known - served)
        if not unserved:
            return 0
        last_served = {r["ref"]: r["age_s"] for r in await conn.fetch(wq.LAST_SERVED, unserved)}
        expiring = expirable(last_served, cfg.requested_timeout_s)
        if not expiring:
            return 0
        rows = await conn.fetch(q.SELECT_REQUESTED_EXPIRED, cfg.requested_timeout_s, expiring, BATCH)
        for row in rows:
            error = requested_timeout_error(row["action_ref"], cfg.requested_timeout_s, row["age_s"])
            done = await conn.fetchrow(q.FAIL, row["id"], "requested", row["attempt"], error)
            if done is not None:
                failed.append(done)
                metrics.TIMEOUTS.labels("requested").inc()
                log.warning(
                    "requested_timeout", execution_id=str(row["id"]), action_ref=row["action_ref"],
                    age_s=round(row["age_s"], 3),
                )
    await publish_terminal(ctx.exchanges.notifications, failed)
    return len(rows)
