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
from pamqp import commands as spec

from common.amqp import Names
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
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("notification_publish_failed", executions=len(rows), error=str(exc) or type(exc).__name__)
        return

    async def one(row: dict[str, Any]) -> None:
        key = Names.notification_key(row["id"], row["status"])
        try:
            # Straight to the channel, without waiting for each one to be flushed (`wait=False`): a
            # burst of outcomes is written back to back, not one socket drain per notification.
            # Not mandatory: nobody listening is normal, and no reason to hear back from the broker.
            await channel.basic_publish(
                notification_body(row), exchange=exchange.name, routing_key=key, mandatory=False, wait=False,
                properties=spec.Basic.Properties(
                    content_type="application/json", delivery_mode=2, message_id=str(row["id"])
                ),
            )
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("notification_publish_failed", execution_id=str(row["id"]), error=str(exc))

    await asyncio.gather(*(one(dict(r)) for r in rows))
