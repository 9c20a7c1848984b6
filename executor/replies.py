"""Intake's replies and announcements: each request that set `reply_to` is answered with what
became of it (`Acceptance`), and a request that failed at intake is announced like any terminal
execution. Replies go only to client inboxes (`reply_allowed`); neither a reply nor an
announcement that fails holds a request back: it is recorded either way, and the client can read
it from PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractIncomingMessage

from common.amqp import Names, persistent_json, property_text, short_string
from common.errors import describe
from common.logging import get_logger
from common.notifications import publish_terminal
from common.schemas import ANSWERS, ANSWERS_HEADER, Acceptance, ExistingRequest, RecordedRequest
from executor.requests import NewExecution, Rejection
from executor.resilience import being_cancelled

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.intake")

#: Executions by id: the rows recorded, or found already there.
Rows = dict[uuid.UUID, RecordedRequest]
Existing = dict[uuid.UUID, ExistingRequest]

#: How long one reply may take before it is given up (the request is recorded either way).
REPLY_TIMEOUT_S = 5.0


def _failed_at_intake(row: RecordedRequest) -> bool:
    return row["status"] == "failed" and (row.get("error") or {}).get("failed_by") == "executor_intake"


async def reply_and_notify(
    ctx: ExecutorContext,
    parsed: list[tuple[AbstractIncomingMessage, NewExecution | Rejection]],
    inserted: Rows,
    same: Existing,
    duplicates: Existing,
) -> None:
    """Answer each message that set `reply_to`: each request with its `Acceptance` (a message
    refused as a whole with one), or, for a batch that asks for it (`ANSWERS_HEADER`), with one
    reply holding an answer per request in the batch's order (null: nothing is known of one)."""
    replies = []
    batches: dict[int, tuple[AbstractIncomingMessage, str, list[Acceptance | None]]] = {}
    for message, result in parsed:
        reply_to = property_text(message.reply_to)
        if not reply_to:
            continue
        reply = _acceptance(result, inserted, same, duplicates)
        listed = (message.headers or {}).get(ANSWERS_HEADER) == "list"
        if result.batch_index is not None and listed:
            batches.setdefault(id(message), (message, reply_to, []))[2].append(reply)
        elif reply is not None:
            # To a batch that asked for the list, a single answer is the whole message's: the
            # header tells the client so (one request's answer, from an executor that lists none,
            # comes without it).
            replies.append(_reply(ctx, message, reply_to, reply.model_dump_json().encode(), listed=listed))
    for message, reply_to, answers in batches.values():
        replies.append(_reply(ctx, message, reply_to, ANSWERS.dump_json(answers), listed=True))
    await asyncio.gather(*replies)
    # A request seen again that had failed at intake may have lost its notification with its ack.
    failed = [r for r in inserted.values() if r["status"] == "failed"]
    failed += [r for r in same.values() if _failed_at_intake(r)]
    await publish_terminal(ctx.exchanges.notifications, failed)


def _acceptance(
    result: NewExecution | Rejection, inserted: Rows, same: Existing, duplicates: Existing
) -> Acceptance | None:
    """What became of one request (None: nothing is known of it)."""
    if isinstance(result, Rejection):
        return Acceptance(error=result.reason)
    if result.id in inserted or result.id in same:
        row = inserted.get(result.id) or same[result.id]
        return Acceptance(
            execution_id=row["id"], status=row["status"], error=(row["error"] or {}).get("error"),
            warnings=row.get("warnings") or [],
        )
    if result.id in duplicates:
        row = duplicates[result.id]
        return Acceptance(execution_id=row["id"], status=row["status"], duplicate=True)
    return None


def reply_allowed(reply_to: str, names: Names) -> bool:
    """Replies go only to a client's inbox: a queue named `<prefix>.reply.*` or a server-named
    `amq.gen-*` one. Never to Baton's own queues (a worker would take a reply as a dispatch, the
    request queue as a request), nor to RabbitMQ's direct reply-to names, a malformed one of which
    makes the broker close the publishing connection: the executor's own."""
    return reply_to.startswith((names.reply_queue(""), "amq.gen-")) and short_string(reply_to) is not None


async def _reply(
    ctx: ExecutorContext, message: AbstractIncomingMessage, reply_to: str, body: bytes, *, listed: bool = False
) -> None:
    """Send one reply; never raises (the request is recorded either way, and the client can read
    it from PostgreSQL)."""
    if not reply_allowed(reply_to, ctx.names):
        log.warning("reply_refused", reply_to=reply_to[:300], message_id=property_text(message.message_id))
        return
    outgoing = persistent_json(
        body, correlation_id=short_string(message.correlation_id), headers={ANSWERS_HEADER: "list"} if listed else None
    )
    try:
        await asyncio.wait_for(
            ctx.publish_channel.default_exchange.publish(
                outgoing,
                routing_key=reply_to,
                mandatory=False,  # the client may be gone; that is its business
            ),
            REPLY_TIMEOUT_S,
        )
    except asyncio.CancelledError:
        if being_cancelled():
            raise
        log.warning("reply_publish_failed", reply_to=reply_to[:300], error="cancelled by the AMQP library")
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("reply_publish_failed", reply_to=reply_to[:300], error=describe(exc))
