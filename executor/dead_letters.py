"""Dead-letter handler: dispatches that expired in a worker's queue (TTL) or were handed back by a
draining worker arrive here through the `<prefix>.dlx` fanout exchange. Each dispatch in such a
message whose execution is still `scheduled` at that attempt is rescheduled elsewhere (or failed);
the rest are stale, logged and dropped. Anyone may publish to the fanout: what the headers claim
is weighed against the row (`charge`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common import metrics
from common.amqp import property_text
from common.best_effort import best_effort
from common.db import until_available
from common.errors import describe, describe_invalid
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.schemas import Dispatch, DispatchBatch
from executor.rescheduling import reschedule_or_fail
from executor.resilience import unavailable

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.dead_letters")

#: Dead letters the handler holds at once.
PREFETCH = 50


#: The reasons RabbitMQ gives; anything else in the headers (anyone may publish to the fanout) is
#: `unknown`.
DEATH_REASONS = frozenset({"expired", "rejected", "maxlen", "delivery_limit"})


def death_reason(headers: Mapping[str, Any] | None) -> str:
    """Why RabbitMQ dead-lettered it: `expired`, `rejected`, `maxlen`, ... (first death wins)."""
    headers = headers or {}
    reason = headers.get("x-first-death-reason")
    if not reason:
        deaths = headers.get("x-death")
        first = deaths[0] if isinstance(deaths, list) and deaths else None
        reason = first.get("reason") if isinstance(first, Mapping) else None
    text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else reason
    return text if isinstance(text, str) and text in DEATH_REASONS else "unknown"


def charge(
    reason: str,
    *,
    waited_s: float | None,
    queue_ttl_s: float | None,
    worker_alive: bool,
    worker_busy: bool,
    worker_restarted: bool,
) -> bool | None:
    """Whether a dead-lettered dispatch, still current, spends one of the execution's dispatches
    (True), is rescheduled without spending one (False), or is dropped (None).

    Anyone who may post may publish to the fanout, headers included, so a dead letter is weighed
    against the row. A message in a queue with a TTL expires no sooner than the TTL after it was
    enqueued, which is after the row was scheduled; before then RabbitMQ dead-letters a dispatch
    only when its worker hands it back, which a worker does when it stops taking work (draining,
    standing down, or stopping, after which it may register again: ``worker_restarted``, since the
    dispatch). So an early letter naming a worker alive all along is forged, and the dispatch it
    names still waits in that worker's queue: dropped. (A quorum queue's delivery limit could send
    one too; the scheduled-timeout monitor puts that execution back in line.) A dispatch handed
    back, or left behind a live worker that is merely busy, is not the execution's fault."""
    early = waited_s is not None and queue_ttl_s is not None and waited_s < queue_ttl_s
    if early:
        return None if worker_alive and not worker_restarted else False
    return not (reason == "rejected" or worker_busy)


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    channel = await ctx.amqp.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.get_queue(ctx.names.dead_letters_queue)
    tag = await queue.consume(lambda message: handle(ctx, message))
    log.info("dead_letter_handler_started", queue=queue.name)
    try:
        await stop_event.wait()
    finally:
        await queue.cancel(tag)
        await channel.close()
        log.info("dead_letter_handler_stopped")


async def handle(ctx: ExecutorContext, message: AbstractIncomingMessage) -> None:
    """Settle one dead letter, and always settle the delivery: one left unacked would hold one of
    the consumer's prefetch slots for good, and enough of them would stop the handler."""
    try:
        await _handle(ctx, message)
    except Exception as exc:
        fields = {"error": describe(exc), "message_id": property_text(message.message_id)}
        if unavailable(exc):  # PostgreSQL away past until_available's wait: back to the queue for later
            log.warning("infrastructure_unavailable", during="dead_letter", **fields)
            await best_effort("requeue_dead_letter", message.nack(requeue=True))
            return
        # What it carried stays `scheduled`, and the scheduled-timeout monitor puts it back in line.
        log.exception("dead_letter_failed", **fields)
        await best_effort("ack_dead_letter", message.ack())


async def _handle(ctx: ExecutorContext, message: AbstractIncomingMessage) -> None:
    reason = death_reason(message.headers)
    try:
        batch = DispatchBatch.model_validate_json(message.body)
    except ValidationError as exc:
        metrics.DEAD_LETTERS.labels("invalid").inc()
        log.error(
            "dead_letter_invalid", death_reason=reason, error=describe_invalid(exc, root="message"),
            message_id=property_text(message.message_id),
        )
        await message.ack()
        return
    failed = []
    # One by one: a message carries one pass's dispatches to one worker, some of which the worker
    # may have claimed before it handed the rest back (those are stale here).
    for dispatch in batch.dispatches:
        row = await _settle(ctx, dispatch, reason)
        if row is not None:
            failed.append(row)
    if failed:
        await publish_terminal(ctx.exchanges.notifications, failed)
    await message.ack()


async def _settle(ctx: ExecutorContext, dispatch: Dispatch, reason: str) -> asyncpg.Record | None:
    """Reschedule (or fail) one dead-lettered dispatch still current; returns the row if failed."""
    fields = {"execution_id": str(dispatch.execution_id), "attempt": dispatch.attempt, "death_reason": reason}
    why = {
        "expired": "its dispatch expired unconsumed in the worker's queue",
        "rejected": "its worker handed the dispatch back",
    }.get(reason, f"its dispatch was dead-lettered ({reason})")
    cfg = ctx.settings.executor

    async def settle() -> tuple[str | None, asyncpg.Record | None]:
        async with ctx.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(q.SELECT_FOR_UPDATE, dispatch.execution_id, cfg.heartbeat_staleness_multiplier)
            if row is None or row["status"] != "scheduled" or row["attempt"] != dispatch.attempt:
                return "stale", None
            counts = charge(reason, waited_s=row["waited_s"], queue_ttl_s=row["queue_ttl_s"],
                            worker_alive=row["worker_alive"], worker_busy=row["worker_busy"],
                            worker_restarted=row["worker_restarted"])
            if counts is None:
                return "premature", None
            return await reschedule_or_fail(
                conn,
                row,
                max_schedule_attempts=cfg.max_schedule_attempts,
                reason=why,
                kind=f"dead_letter_{reason}",
                error={"error": f"no worker started it after {cfg.max_schedule_attempts} dispatches: {why}",
                       "failed_by": "dead_letter_handler", "attempts": row["schedule_attempts"]},
                counts=counts,
            )

    status, failed = await until_available(settle, what="dead_letter")
    if status == "premature":
        metrics.DEAD_LETTERS.labels("premature").inc()
        log.warning(
            "dead_letter_premature", **fields,
            detail="before its queue's TTL a dispatch is dead-lettered only when its worker hands it back, and this "
            "worker has been alive all along: the letter did not come from RabbitMQ and was dropped; find who "
            "publishes to the dead-letter exchange (or a RabbitMQ policy setting a shorter message-ttl)",
        )
    elif status == "stale" or status is None:
        metrics.DEAD_LETTERS.labels("dropped").inc()
        log.info("dead_letter_dropped", **fields)
    else:
        metrics.DEAD_LETTERS.labels(status).inc()
        log.info("dead_letter_handled", outcome=status, **fields)
        ctx.wake.set()
    return failed
