"""Intake: requests from `<prefix>.execution.requests` become rows in `executions`.

Requests are taken in batches and recorded in one statement; only then are they acked, so a crash
loses nothing (a redelivered request maps to the same execution id and is recorded once). A bad
request is recorded as `failed` when it can be tied to an execution, otherwise parked in
`<prefix>.rejected_requests` with its reason; either way it is acked and never retried in a loop.

Anyone who can reach the broker writes these messages, so no message, whatever its body,
properties or headers, may stop intake: a request PostgreSQL refuses is parked alone (the batch is
recorded again one by one), replies go only to client inboxes (`executor.replies`), a parked
request's headers are carried only as far as they can be written back to AMQP, and properties
that the AMQP library would fail to decode (invalid UTF-8, out-of-range timestamps, tables nested
without end) are decoded leniently rather than closing the connection. Only an outage (a
transient error, or PostgreSQL refusing everything) puts a batch back, and intake pauses with a
jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from common import amqp, metrics
from common.amqp import property_text
from common.best_effort import best_effort
from common.db import until_available
from common.errors import describe
from common.logging import get_logger
from common.queries import executions as q
from common.schemas import ExistingRequest, RecordedRequest
from executor import dispatching
from executor.parking import park
from executor.replies import Existing, Rows, reply_and_notify
from executor.requests import (
    NewExecution,
    ParameterValidator,
    Rejection,
    check_action,
    insert_arguments,
    parse_message,
)
from executor.resilience import Backoff, unavailable

if TYPE_CHECKING:
    from common.actions import ActionSpec
    from common.settings import Settings
    from executor.context import ExecutorContext

log = get_logger("baton.executor.intake")

#: Why each request that PostgreSQL refused cannot be stored, by execution id.
Unstorable = dict[uuid.UUID, str]

def intake_prefetch(settings: Settings) -> int:
    """Deliveries intake holds at once: at most two batches, and at most
    `executor.intake_buffer_bytes` worth of requests of the largest accepted size."""
    by_bytes = settings.executor.intake_buffer_bytes // settings.message_queue.max_request_bytes
    return max(1, min(2 * settings.executor.intake_batch_size, by_bytes))


@dataclass
class _State:
    """What intake keeps between batches."""

    validator: ParameterValidator = field(default_factory=ParameterValidator)
    backoff: Backoff = field(default_factory=Backoff)


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    channel = await ctx.amqp.channel()
    prefetch = intake_prefetch(ctx.settings)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(ctx.names.requests_queue)
    tag = await queue.consume(inbox.put)
    state = _State()
    log.info("intake_started", queue=ctx.names.requests_queue, prefetch=prefetch)
    stop_waiter = asyncio.ensure_future(stop_event.wait())
    try:
        while not stop_event.is_set():
            getter = asyncio.ensure_future(inbox.get())
            await asyncio.wait({getter, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            batch = [getter.result()]
            # Bounded in count and in bytes: a batch's requests are parsed and held together, and
            # JSON can take tens of times its size once parsed (`[{}, {}, ...]`).
            size = len(batch[0].body)
            cfg = ctx.settings.executor
            while len(batch) < cfg.intake_batch_size and size < cfg.intake_batch_bytes and not inbox.empty():
                batch.append(inbox.get_nowait())
                size += len(batch[-1].body)
            try:
                await _process_guarded(ctx, batch, state)
            except Exception as exc:  # noqa: BLE001 - only outages get here (see _process_guarded)
                # Back to the queue; a request recorded before the failure maps to the same id again.
                pause = state.backoff.next_delay_s()
                log.warning(
                    "infrastructure_unavailable", during="intake", error=describe(exc), retry_in_s=round(pause, 2)
                )
                for message in batch:
                    if not message.processed:
                        await best_effort("requeue_request", message.nack(requeue=True))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_event.wait(), pause)
            else:
                state.backoff.reset()
    finally:
        stop_waiter.cancel()
        # Unacked deliveries go back to the queue when the channel closes; another replica takes them.
        await best_effort("cancel_intake_consumer", queue.cancel(tag))
        await best_effort("close_intake_channel", channel.close())
        await dispatching.finish_handovers(ctx)
        log.info("intake_stopped")


async def _process_guarded(ctx: ExecutorContext, batch: list[AbstractIncomingMessage], state: _State) -> None:
    """Process ``batch``; raise only for an outage. Anything else that goes wrong is a request's
    fault until shown otherwise: the batch is taken again one request at a time, and a request that
    still fails is parked with the error (or, if even that fails, counted as an outage)."""
    try:
        await _process(ctx, batch, state)
        return
    except Exception as exc:
        if unavailable(exc):
            raise
        log.exception("intake_batch_failed", error=describe(exc), batch=len(batch))
    for message in batch:
        if message.processed:
            continue
        try:
            await _process(ctx, [message], state)
        except Exception as exc:
            if unavailable(exc):
                raise
            await park(ctx, message, f"intake failed on this request: {describe(exc)}", bare=True)
            await amqp.ack_all([message])


async def _process(ctx: ExecutorContext, batch: list[AbstractIncomingMessage], state: _State) -> None:
    """Record, reply to, park and ack one batch, placing what it records where it can (`_insert`)."""
    max_bytes = ctx.settings.message_queue.max_request_bytes
    # One entry per request: a batch message brings several, each its own execution.
    parsed: list[tuple[AbstractIncomingMessage, NewExecution | Rejection]] = []
    for message in batch:
        try:
            result = parse_message(
                message.body,
                message_id=property_text(message.message_id),
                correlation_id=property_text(message.correlation_id),
                max_bytes=max_bytes,
            )
        except Exception as exc:  # noqa: BLE001 - say, JSON nested deeper than the parser's recursion
            result = Rejection(f"request cannot be parsed: {describe(exc)}")
        if isinstance(result, Rejection):
            parsed.append((message, result))
        else:
            parsed.extend((message, new) for new in result)

    executions = [r for _, r in parsed if isinstance(r, NewExecution)]
    specs = await ctx.catalogue.resolve({e.action_ref for e in executions if e.action_ref and not e.error})
    for execution in executions:
        check_action(execution, specs.get(execution.action_ref or ""), state.validator)

    inserted, unstorable = await _record(ctx, executions, specs)
    same, duplicates = await _existing(
        ctx.pool, [e for e in executions if e.id not in inserted and e.id not in unstorable]
    )
    # A key reused with other parameters is refused: recorded as failed, under its own id and
    # without the key, naming the execution that holds it.
    conflicts = []
    for execution in executions:
        reason = key_conflict(execution, duplicates[execution.id]) if execution.id in duplicates else None
        if reason is not None:
            existing_id = duplicates.pop(execution.id)["id"]
            execution.idempotency_key = None
            execution.fail(reason, conflicts_with=str(existing_id))
            conflicts.append(execution)
    if conflicts:
        recorded, refused = await _record(ctx, conflicts, None)
        inserted.update(recorded)
        unstorable.update(refused)
    if unstorable:
        parsed = [
            (m, Rejection(unstorable[r.id], r.batch_index) if isinstance(r, NewExecution) and r.id in unstorable else r)
            for m, r in parsed
        ]
    # Recorded and committed: a pass may place them now, while the replies are on their way (each
    # waits for the broker's confirm, which would otherwise delay every reply-to request's start).
    if any(row["status"] == "requested" for row in [*inserted.values(), *same.values()]):
        ctx.wake.set()
    await reply_and_notify(ctx, parsed, inserted, same, duplicates)
    # A message is parked once, with every reason its requests were refused for (a batch's other
    # requests are recorded; parked, the message can be inspected, or replayed: those map to the
    # executions already recorded).
    to_park: dict[int, tuple[AbstractIncomingMessage, list[str]]] = {}
    for message, entry in parsed:
        if isinstance(entry, Rejection):
            to_park.setdefault(id(message), (message, []))[1].append(entry.reason)
    for message, reasons in to_park.values():
        more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
        await park(ctx, message, "; ".join(dict.fromkeys(reasons[:3])) + more)
    await amqp.ack_all(batch)
    metrics.REQUESTS.labels("recorded").inc(sum(1 for r in inserted.values() if r["status"] != "failed"))
    metrics.REQUESTS.labels("failed").inc(sum(1 for r in inserted.values() if r["status"] == "failed"))
    metrics.REQUESTS.labels("redelivered").inc(len(same))
    metrics.REQUESTS.labels("duplicate").inc(len(duplicates))
    metrics.REQUESTS.labels("parked").inc(sum(1 for _, r in parsed if isinstance(r, Rejection)))


async def _record(
    ctx: ExecutorContext, executions: list[NewExecution], place: Mapping[str, ActionSpec] | None
) -> tuple[Rows, Unstorable]:
    """Insert all in one statement (and place them, given their actions' specs: `_insert`). If
    PostgreSQL refuses it for anything but an outage (a NUL in a string, a value too large for an
    index, any other error a request's data can cause), insert one by one, so that only the
    requests that cannot be stored are rejected."""
    if not executions:
        return {}, {}
    try:
        return await _insert(ctx, executions, place), {}
    except Exception as exc:
        if unavailable(exc):
            raise
        if len(executions) > 1:
            log.warning("record_batch_refused", error=describe(exc), batch=len(executions))
    inserted: Rows = {}
    unstorable: Unstorable = {}
    for execution in executions:
        try:
            inserted.update(await _insert(ctx, [execution], place))
        except Exception as exc:
            if unavailable(exc):
                raise
            unstorable[execution.id] = f"request cannot be stored: {describe(exc)}"
    return inserted, unstorable


def _recorded(record: asyncpg.Record) -> RecordedRequest:
    return cast(RecordedRequest, dict(record))


def _existing_row(record: asyncpg.Record) -> ExistingRequest:
    return cast(ExistingRequest, dict(record))


async def _insert(ctx: ExecutorContext, executions: list[NewExecution], place: Mapping[str, ActionSpec] | None) -> Rows:
    """Record these requests in one statement. Given their actions' specs (``place``), while no
    backlog is known and no scheduler pass is under way, those whose actions have nothing older
    waiting to be placed (`dispatching.place_new`) are placed first and recorded `scheduled` on
    their workers (no scheduler pass, and no second transaction, between a request and its
    dispatch). What no worker has room for is recorded `requested` and starts a backlog: intake
    then places nothing more until a scheduler pass has found the backlog gone, so that nothing
    later starts ahead."""

    async def record() -> tuple[list[asyncpg.Record], bool]:
        # A scheduler pass under way is placing a backlog (a burst, most likely): these wait for
        # the next one rather than for this one to end, and intake does not take on its work.
        if place is None or ctx.backlog or ctx.placing.locked() or not ctx.amqp.connected.is_set():
            return await ctx.hot_pool.fetch(q.INSERT_REQUESTS, *insert_arguments(executions)), False
        async with ctx.placing:  # the scheduler's next pass counts these once they are recorded
            workers, left = await dispatching.place_new(ctx, executions, place)
            return await ctx.hot_pool.fetch(q.INSERT_REQUESTS, *insert_arguments(executions, workers)), left

    # The batch stays unacked while the database is away; nothing is dropped. (Placed rows whose
    # commit was not acknowledged are not handed over: they stay `scheduled`, and the
    # scheduled-timeout monitor puts them back in line, as after a scheduler pass's.)
    rows, left = await until_available(record, what="record_requests")
    if left:
        ctx.backlog = True
    for row in rows:
        fields = {"execution_id": str(row["id"]), "action_ref": row["action_ref"]}
        if row["status"] == "failed":
            log.warning("execution_rejected", error=row["error"]["error"], **fields)
        else:
            log.info("execution_requested", **fields)
        if row["warnings"]:
            log.warning("request_fields_ignored", warnings=row["warnings"], **fields)
    dispatching.hand_over(ctx, [row for row in rows if row["status"] == "scheduled"])
    return {row["id"]: _recorded(row) for row in rows}


async def _existing(pool: asyncpg.Pool, repeated: list[NewExecution]) -> tuple[Existing, Existing]:
    """For requests not inserted: the execution each one is. By its own id, it is the same request
    seen again (its first recording committed, but the reply or the ack was lost); by its
    idempotency key only, it is another request that duplicates an earlier one."""
    if not repeated:
        return {}, {}
    keyed = [e for e in repeated if e.idempotency_key]
    rows = await pool.fetch(
        q.FIND_EXISTING,
        [e.id for e in repeated],
        [e.action_ref for e in keyed],
        [e.idempotency_key for e in keyed],
    )
    by_id = {r["id"]: _existing_row(r) for r in rows}
    by_key = {(r["action_ref"], r["idempotency_key"]): _existing_row(r) for r in rows if r["idempotency_key"]}
    same: Existing = {}
    duplicates: Existing = {}
    for e in repeated:
        if e.id in by_id:
            same[e.id] = by_id[e.id]
            log.info("execution_redelivered", execution_id=str(e.id), status=by_id[e.id]["status"])
        elif (e.action_ref, e.idempotency_key) in by_key:
            row = by_key[(e.action_ref, e.idempotency_key)]
            duplicates[e.id] = row
            log.info("execution_duplicate", execution_id=str(row["id"]), idempotency_key=(e.idempotency_key or "")[:100])
    return same, duplicates


def key_conflict(execution: NewExecution, existing: ExistingRequest) -> str | None:
    """Why a request that reuses an idempotency key is not the same request (None: it is). Keys are
    scoped by action; under one action, a key names one set of parameters."""
    if execution.parameters == existing["parameters"] and execution.timeout_s == existing["timeout_s"]:
        return None
    return (
        f"idempotency key {(execution.idempotency_key or '')[:100]!r} of {execution.action_ref} is already used "
        f"by execution {existing['id']} with other parameters: use another key, or the same parameters "
        f"to get that execution"
    )
