"""Liveness sweeper: declares workers lost and hands what they held to rescheduling and recovery.

A worker is lost when its heartbeat is older than `heartbeat_staleness_multiplier` x its interval
(hung, partitioned), or at once when its process has died: each worker holds a session advisory
lock on its own connection, which PostgreSQL releases when the process goes. Workers are locked
`FOR UPDATE SKIP LOCKED`, so replicas never handle the same loss twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import asyncpg

from common import metrics
from common.actions import ActionSpec
from common.db import Executor
from common.interruption import interrupt
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.queries import workers as wq
from common.recovery import resolve_policy
from executor.recovery import recover_interrupted
from executor.rescheduling import reschedule_or_fail
from executor.resilience import next_pause_s, riding_out_outages

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.sweeper")


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    interval_s = ctx.settings.executor.sweep_interval_s
    log.info("sweeper_started", interval_s=interval_s)
    while not stop_event.is_set():
        pause_s = interval_s
        async with riding_out_outages("sweep", stop_event):
            await sweep(ctx)
            await reclaim_from_unavailable(ctx)
            await interrupt_orphans(ctx)
            await recover_interrupted(ctx)
            await _observe(ctx)
            pause_s = next_pause_s(
                interval_s, await ctx.pool.fetchval(wq.NEXT_STALE_IN, ctx.settings.executor.heartbeat_staleness_multiplier)
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop_event.wait(), pause_s)
    log.info("sweeper_stopped")


async def sweep(ctx: ExecutorContext) -> list[str]:
    """One sweep; returns the names of the workers it declared lost."""
    cfg = ctx.settings.executor
    lost: list[str] = []
    failed = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        for worker in await conn.fetch(wq.FIND_LOST, cfg.heartbeat_staleness_multiplier):
            marked = await conn.fetchrow(
                wq.MARK_LOST, cfg.heartbeat_staleness_multiplier, worker["name"], worker["incarnation"]
            )
            if marked is None:  # it checked in meanwhile, or a replica handled it first
                continue
            signal = "heartbeat_stale" if worker["heartbeat_stale"] else "process_died"
            lost.append(worker["name"])
            metrics.WORKERS_LOST.labels(signal).inc()
            log.warning(
                "worker_lost",
                worker=worker["name"],
                signal=signal,
                last_heartbeat=str(worker["last_heartbeat"]),
            )
            failed += await release_held(ctx, conn, worker["name"], signal)
    await publish_terminal(ctx.exchanges.notifications, failed)
    if lost:
        ctx.wake.set()
    return lost


async def reclaim_from_unavailable(ctx: ExecutorContext) -> int:
    """Executions dispatched to a worker that has since stopped taking work go to another one now.
    Not their fault, so it costs them no dispatch."""
    cfg = ctx.settings.executor
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(q.SELECT_SCHEDULED_ON_UNAVAILABLE)
        for row in rows:
            await reschedule_or_fail(
                conn,
                row,
                max_schedule_attempts=cfg.max_schedule_attempts,
                reason=f"worker {row['worker']} is {row['worker_status']}",
                kind=f"worker_{row['worker_status']}",
                error={},
                counts=False,
            )
    if rows:
        ctx.wake.set()
    return len(rows)


async def interrupt_orphans(ctx: ExecutorContext) -> int:
    """`running` executions of a stopped or lost worker are run by nobody: interrupt them."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(q.SELECT_RUNNING_ON_STOPPED)
        specs = await ctx.catalogue.resolve({r["action_ref"] for r in rows if r["action_ref"]})
        for row in rows:
            await _interrupt(ctx, conn, row, specs, f"worker {row['worker']} stopped without finishing it")
    return len(rows)


async def _interrupt(
    ctx: ExecutorContext,
    conn: Executor,
    row: asyncpg.Record | dict[str, Any],
    specs: dict[str, ActionSpec],
    error: str,
) -> None:
    event = await interrupt(
        conn,
        execution_id=row["id"],
        attempt=row["attempt"],
        worker=row["worker"],
        incarnation=None,
        reason="worker_lost",
        error=error,
        policy=resolve_policy(specs.get(row["action_ref"]), ctx.settings.recovery),
        recovery_attempts=row["recovery_attempts"],
    )
    if event is not None:
        log.warning(
            "execution_interrupted", execution_id=str(row["id"]), attempt=row["attempt"], worker=row["worker"],
            reason="worker_lost", recoverable=event["recoverable"],
        )


async def release_held(ctx: ExecutorContext, conn: Executor, worker: str, signal: str) -> list[asyncpg.Record]:
    """A lost worker's `scheduled` executions go to another worker; its `running` ones become
    `interrupted` (recovery decides what follows). Returns the rows that failed instead."""
    cfg = ctx.settings.executor
    failed: list[asyncpg.Record] = []
    held = await conn.fetch(q.SELECT_HELD_BY_WORKER, worker)
    specs = await ctx.catalogue.resolve({r["action_ref"] for r in held if r["action_ref"]})
    for row in held:
        if row["status"] == "scheduled":
            reason = f"worker {worker} was lost ({signal}) before starting it"
            _, done = await reschedule_or_fail(
                conn,
                row,
                max_schedule_attempts=cfg.max_schedule_attempts,
                reason=reason,
                kind="worker_lost",
                error={"error": f"no worker started it after {cfg.max_schedule_attempts} dispatches: {reason}",
                       "failed_by": "liveness_sweeper", "attempts": row["schedule_attempts"]},
            )
            if done is not None:
                failed.append(done)
            continue
        await _interrupt(ctx, conn, {**row, "worker": worker}, specs, f"worker {worker} was lost ({signal}) while running it")
    return failed


async def _observe(ctx: ExecutorContext) -> None:
    """Refresh the gauges that describe the whole system."""
    if ctx.settings.executor.metrics_port is None:
        return
    executions = await ctx.pool.fetch(q.COUNT_ACTIVE_BY_STATUS)
    workers = await ctx.pool.fetch(wq.COUNT_BY_STATUS)
    ages = await ctx.pool.fetch(wq.HEARTBEAT_AGES)
    metrics.replace_all(metrics.EXECUTIONS, {row["status"]: row["n"] for row in executions})
    metrics.replace_all(metrics.WORKERS, {row["status"]: row["n"] for row in workers})
    metrics.replace_all(metrics.HEARTBEAT_AGE, {row["name"]: row["age_s"] for row in ages if row["age_s"] is not None})
