"""Intake: requests from `<prefix>.execution.requests` become rows in `executions`.

Requests are taken in batches and recorded in one statement; only then are they acked, so a crash
loses nothing (a redelivered request maps to the same execution id and is recorded once). A bad
request is recorded as `failed` when it can be tied to an execution, otherwise parked in
`<prefix>.rejected_requests` with its reason; either way it is acked and never retried in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from common import metrics
from common import amqp
from common.amqp import persistent_json
from common.db import until_available
from common.retry import TRANSIENT_ERRORS
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.schemas import Acceptance
from executor.requests import NewExecution, ParameterValidator, Rejection, check_action, parse_request

if TYPE_CHECKING:
    from executor.service import ExecutorContext

log = get_logger("baton.executor.intake")


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    channel = await ctx.amqp.channel()
    await channel.set_qos(prefetch_count=ctx.settings.executor.intake_batch_size * 2)
    queue = await channel.get_queue(ctx.names.requests_queue)
    tag = await queue.consume(inbox.put)
    validator = ParameterValidator()
    log.info("intake_started", queue=ctx.names.requests_queue)
    stop_waiter = asyncio.ensure_future(stop_event.wait())
    try:
        while not stop_event.is_set():
            getter = asyncio.ensure_future(inbox.get())
            await asyncio.wait({getter, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            batch = [getter.result()]
            while len(batch) < ctx.settings.executor.intake_batch_size and not inbox.empty():
                batch.append(inbox.get_nowait())
            try:
                await _process(ctx, batch, validator)
            except TRANSIENT_ERRORS as exc:
                # Back to the queue; a request recorded before the failure maps to the same id again.
                log.warning("infrastructure_unavailable", during="intake", error=str(exc) or type(exc).__name__)
                for message in batch:
                    if not message.processed:
                        with contextlib.suppress(Exception):
                            await message.nack(requeue=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_event.wait(), 1.0)
    finally:
        stop_waiter.cancel()
        # Unacked deliveries go back to the queue when the channel closes; another replica takes them.
        await queue.cancel(tag)
        await channel.close()
        log.info("intake_stopped")


async def _process(ctx: ExecutorContext, batch: list[AbstractIncomingMessage], validator: ParameterValidator) -> None:
    max_bytes = ctx.settings.message_queue.max_request_bytes
    parsed: list[tuple[AbstractIncomingMessage, NewExecution | Rejection]] = []
    for message in batch:
        try:
            result = parse_request(
                message.body,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                max_bytes=max_bytes,
            )
        except Exception as exc:  # noqa: BLE001 - say, JSON nested deeper than the parser's recursion
            result = Rejection(f"request cannot be parsed: {type(exc).__name__}: {str(exc)[:200]}")
        if isinstance(result, NewExecution):
            result.reply_to = message.reply_to
        parsed.append((message, result))

    executions = [r for _, r in parsed if isinstance(r, NewExecution)]
    specs = await ctx.catalogue.resolve({e.action_ref for e in executions if e.action_ref and not e.error})
    for execution in executions:
        try:
            check_action(execution, specs.get(execution.action_ref or ""), validator)
        except Exception as exc:  # noqa: BLE001 - a schema a worker registered that cannot be used
            execution.fail(f"parameters cannot be checked against the action's schema: {type(exc).__name__}: {exc}")

    inserted, unstorable = await _record(ctx.pool, executions)
    if unstorable:
        parsed = [
            (m, Rejection(unstorable[r.id]) if isinstance(r, NewExecution) and r.id in unstorable else r)
            for m, r in parsed
        ]
    existing = await _existing(
        ctx.pool, [e for e in executions if e.id not in inserted and e.id not in unstorable]
    )
    await _reply_and_notify(ctx, parsed, inserted, existing)
    for message, result in parsed:
        if isinstance(result, Rejection):
            await _park(ctx, message, result.reason)
    await amqp.ack_all(batch)
    metrics.REQUESTS.labels("recorded").inc(sum(1 for r in inserted.values() if r["status"] == "requested"))
    metrics.REQUESTS.labels("failed").inc(sum(1 for r in inserted.values() if r["status"] == "failed"))
    metrics.REQUESTS.labels("duplicate").inc(len(existing))
    metrics.REQUESTS.labels("parked").inc(sum(1 for _, r in parsed if isinstance(r, Rejection)))
    if any(row["status"] == "requested" for row in inserted.values()):
        ctx.wake.set()


async def _record(pool: asyncpg.Pool, executions: list[NewExecution]) -> tuple[dict, dict]:
    """Insert all in one statement; if PostgreSQL refuses the data (say a NUL in a string), insert
    one by one so that only the offending requests are rejected."""
    if not executions:
        return {}, {}
    try:
        return await _insert(pool, executions), {}
    except asyncpg.exceptions.DataError:
        pass
    inserted: dict = {}
    unstorable: dict = {}
    for execution in executions:
        try:
            inserted.update(await _insert(pool, [execution]))
        except asyncpg.exceptions.DataError as exc:
            unstorable[execution.id] = f"request cannot be stored: {exc}"
    return inserted, unstorable


async def _insert(pool: asyncpg.Pool, executions: list[NewExecution]) -> dict:
    args = (
        [e.id for e in executions],
        [e.action_ref for e in executions],
        [json.dumps(e.parameters) for e in executions],
        [e.status for e in executions],
        [e.idempotency_key for e in executions],
        [e.message_id for e in executions],
        [e.correlation_id for e in executions],
        [e.timeout_s for e in executions],
        [json.dumps(e.error) if e.error else None for e in executions],
    )
    # The batch stays unacked while the database is away; nothing is dropped.
    rows = await until_available(lambda: pool.fetch(q.INSERT_REQUESTS, *args), what="record_requests")
    for row in rows:
        fields = {"execution_id": str(row["id"]), "action_ref": row["action_ref"]}
        if row["status"] == "failed":
            log.warning("execution_rejected", error=row["error"]["error"], **fields)
        else:
            log.info("execution_requested", **fields)
    return {row["id"]: dict(row) for row in rows}


async def _existing(pool: asyncpg.Pool, duplicates: list[NewExecution]) -> dict:
    """For requests not inserted: the execution each one repeats (by id or by idempotency key)."""
    if not duplicates:
        return {}
    rows = await pool.fetch(
        q.FIND_EXISTING, [e.id for e in duplicates], [e.idempotency_key for e in duplicates if e.idempotency_key]
    )
    by_id = {r["id"]: r for r in rows}
    by_key = {r["idempotency_key"]: r for r in rows if r["idempotency_key"]}
    found = {}
    for e in duplicates:
        row = by_id.get(e.id) or by_key.get(e.idempotency_key)
        if row is not None:
            found[e.id] = row
            log.info("execution_duplicate", execution_id=str(row["id"]), idempotency_key=e.idempotency_key)
    return found


async def _reply_and_notify(ctx: ExecutorContext, parsed, inserted: dict, existing: dict) -> None:
    replies = []
    for message, result in parsed:
        if not message.reply_to:
            continue
        if isinstance(result, Rejection):
            reply = Acceptance(error=result.reason)
        elif result.id in inserted:
            row = inserted[result.id]
            reply = Acceptance(execution_id=row["id"], status=row["status"], error=(row["error"] or {}).get("error"))
        elif result.id in existing:
            row = existing[result.id]
            reply = Acceptance(execution_id=row["id"], status=row["status"], duplicate=True)
        else:
            continue
        replies.append(
            ctx.publish_channel.default_exchange.publish(
                persistent_json(reply.model_dump_json().encode(), correlation_id=message.correlation_id),
                routing_key=message.reply_to,
                mandatory=False,  # the client may be gone; that is its business
            )
        )
    results = await asyncio.gather(*replies, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            log.warning("reply_publish_failed", error=str(r))
    await publish_terminal(ctx.pool, ctx.exchanges.notifications, [r for r in inserted.values() if r["status"] == "failed"])


async def _park(ctx: ExecutorContext, message: AbstractIncomingMessage, reason: str) -> None:
    """Keep a request that fits no execution, with its reason, before acking it."""
    log.warning(
        "request_rejected", reason=reason, message_id=message.message_id, body_bytes=len(message.body)
    )
    headers = dict(message.headers or {})
    headers["x-baton-reason"] = reason[:1000]
    await ctx.publish_channel.default_exchange.publish(
        persistent_json(
            message.body,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers=headers,
        ),
        routing_key=ctx.names.rejected_requests_queue,
        mandatory=True,  # the parking queue must exist: a return raises, and the request is not acked
    )
