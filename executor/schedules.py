"""Cron schedules: each due time fires exactly once, whichever executors are up.

At start, the YAML `schedules:` section is written to the `schedules` table (the CLI adds and
removes others there). Then the loop sleeps until the next due time (or until a schedule changes,
announced on TIMER_CHANNEL) and fires what is due: in one transaction per pass it takes the due
schedules (`FOR UPDATE SKIP LOCKED`: one executor each), records one execution per due time to fire
(an id derived from the schedule and the due time, so a due time can never be recorded twice),
and advances each schedule. An executor killed mid-pass commits nothing, and another takes the
same due times. Due times missed while every executor was away follow the schedule's `catch_up`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg

from common import schedules as cron
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import TIMER_CHANNEL
from common.queries import executions as q
from common.queries import schedules as sq
from executor.requests import NewExecution, ParameterValidator, check_action, insert_arguments
from executor.resilience import riding_out_outages, until_due

if TYPE_CHECKING:
    from common.settings import Settings
    from executor.context import ExecutorContext

log = get_logger("baton.executor.schedules")

BATCH = 100


async def sync_configured(pool: asyncpg.Pool, settings: Settings) -> None:
    """The YAML schedules into the table; YAML schedules no longer configured out of it."""
    async with pool.acquire() as conn, conn.transaction():
        now = await conn.fetchval(q.NOW)
        for name, entry in settings.schedules.items():
            row = await conn.fetchrow(
                sq.UPSERT, name, entry.cron, entry.action_ref, entry.parameters, entry.catch_up,
                entry.timezone, "yaml", cron.next_after(entry.cron, entry.timezone, now),
            )
            if row is None:
                log.error("schedule_name_taken", schedule=name,
                          error="a schedule added with `baton schedules add` has this name; remove it or rename one")
        removed = await conn.fetch(sq.DELETE_STALE_YAML, list(settings.schedules))
    for row in removed:
        log.info("schedule_removed", schedule=row["name"], source="yaml")


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    validator = ParameterValidator()
    async with riding_out_outages("sync_schedules", stop_event):
        await sync_configured(ctx.pool, ctx.settings)
    log.info("schedules_started", configured=len(ctx.settings.schedules))

    async def step() -> None:
        while await fire_due(ctx, validator) >= BATCH:
            pass

    await until_due(
        url=ctx.settings.database.url, channel=TIMER_CHANNEL, what="fire_schedules", stop_event=stop_event,
        fallback_s=ctx.settings.executor.sweep_interval_s, step=step,
        next_due_in_s=lambda: ctx.pool.fetchval(sq.NEXT_DUE_IN), wakes_on=lambda payload: payload == "schedule",
    )
    log.info("schedules_stopped")


async def fire_due(ctx: ExecutorContext, validator: ParameterValidator) -> int:
    """One pass over due schedules; returns how many schedules it took."""
    grace_s = ctx.settings.executor.schedule_misfire_grace_s
    failed = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        due = await conn.fetch(sq.DUE, BATCH)
        if not due:
            return 0
        specs = await ctx.catalogue.resolve({r["action_ref"] for r in due})
        for row in due:
            times, next_fire_at, skipped = cron.due_times(
                row["cron"], row["timezone"], row["next_fire_at"], row["now"], row["catch_up"], grace_s
            )
            executions = []
            for when in times:
                execution = NewExecution(
                    id=cron.execution_id(row["name"], when), action_ref=row["action_ref"],
                    parameters=row["parameters"], idempotency_key=None, message_id=None, correlation_id=None,
                    timeout_s=None, schedule_name=row["name"], scheduled_for=when,
                )
                check_action(execution, specs.get(row["action_ref"]), validator)
                executions.append(execution)
            inserted = await conn.fetch(q.INSERT_REQUESTS, *insert_arguments(executions)) if executions else []
            failed += [r for r in inserted if r["status"] == "failed"]
            await conn.execute(sq.ADVANCE, row["name"], next_fire_at, times[-1] if times else None)
            log.info(
                "schedule_fired", schedule=row["name"], fired=len(inserted), due_times=[t.isoformat() for t in times],
                skipped_missed=skipped, next_fire_at=next_fire_at.isoformat(),
            )
    await publish_terminal(ctx.exchanges.notifications, failed)
    ctx.wake.set()
    return len(due)

