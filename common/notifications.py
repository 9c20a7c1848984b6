"""`ExecutionCompleted` notifications: one per terminal transition, on `<prefix>.notifications`.

A notification is a wake-up call, not a record: it names the execution and its status, and whoever
receives it reads the row from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
from aio_pika.abc import AbstractExchange

from common.amqp import Names, persistent_json
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

    async def one(row: dict[str, Any]) -> None:
        key = Names.notification_key(row["id"], row["status"])
        try:
            # Not mandatory: nobody listening is normal, and no reason to hear back from the broker.
            await exchange.publish(
                persistent_json(notification_body(row), message_id=str(row["id"])), routing_key=key, mandatory=False
            )
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("notification_publish_failed", execution_id=str(row["id"]), error=str(exc))

    await asyncio.gather(*(one(dict(r)) for r in rows))
