"""`ExecutionCompleted` notifications: one per terminal transition, on `<prefix>.notifications`.

A notification is a wake-up call, not a record: it names the execution and its status, and whoever
receives it reads the row from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractExchange
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from common.amqp import Names
from common.errors import describe
from common.logging import get_logger
from common.schemas import jsonable_row

log = get_logger("baton.notifications")


#: What a notification says: enough to route and wake on, nothing an execution was given or
#: produced (parameters and results may hold what only PostgreSQL should keep). Waiters read the row.
NOTIFIED_FIELDS = ("id", "action_ref", "status", "attempt", "worker", "finished_at")


def notification_body(row: dict[str, Any]) -> bytes:
    return json.dumps(jsonable_row({k: row.get(k) for k in NOTIFIED_FIELDS})).encode()


async def publish_terminal(exchange: AbstractExchange, rows: Sequence[Mapping[str, Any] | asyncpg.Record]) -> None:
    """Publish one notification per finished execution with routing key `execution.<id>.<status>`.
    A failure to publish is logged, not raised: the state is already in PostgreSQL, and waiting
    clients re-read it from there."""
    if not rows:
        return
    try:
        # Every exchange Baton declares is one; the channel under it takes a publish directly.
        channel = cast(aiormq.Channel, await cast(aio_pika.Exchange, exchange).channel.get_underlay_channel())
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
        if channel.publisher_confirms:
            # Each confirmed on its own (a channel's delivery tags count publishes one by one).
            await asyncio.gather(*(_publish_one(channel, exchange.name, dict(row)) for row in rows))
        else:
            await _publish_together(channel, exchange.name, [dict(row) for row in rows])
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("notification_publish_failed", executions=len(rows), error=describe(exc))


def _frames(exchange: str, row: dict[str, Any]) -> tuple[spec.Basic.Publish, ContentHeader, ContentBody]:
    """One notification's frames. Not mandatory: nobody listening is normal."""
    body = notification_body(row)
    properties = spec.Basic.Properties(content_type="application/json", delivery_mode=2, message_id=str(row["id"]))
    return (
        spec.Basic.Publish(exchange=exchange, routing_key=Names.notification_key(row["id"], row["status"])),
        ContentHeader(body_size=len(body), properties=properties),
        ContentBody(body),
    )


async def _publish_together(channel: aiormq.Channel, exchange: str, rows: list[dict[str, Any]]) -> None:
    """A batch of notifications as one write on a channel without confirms: the frames of each
    publish back to back (a notification is far smaller than a frame), not a socket write and a
    drain per notification, which cost a worker more than running a no-op action."""
    frames = [frame for row in rows for frame in _frames(exchange, row)]
    async with channel.lock:  # as `basic_publish` does: one publisher's frames at a time
        await channel.write_queue.put(ChannelFrame.marshall(channel_number=channel.number, frames=frames))


async def _publish_one(channel: aiormq.Channel, exchange: str, row: dict[str, Any]) -> None:
    publish, header, body = _frames(exchange, row)
    await channel.basic_publish(
        body.value, exchange=exchange, routing_key=publish.routing_key, properties=header.properties, mandatory=False
    )
