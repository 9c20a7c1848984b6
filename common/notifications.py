"""`ExecutionCompleted` notifications: one per terminal transition, on `<prefix>.notifications`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import asyncpg
from aio_pika.abc import AbstractExchange

from common.amqp import Names, persistent_json
from common.logging import get_logger
from common.queries import executions as q
from common.schemas import execution_json

log = get_logger("baton.notifications")


async def publish_terminal(
    pool: asyncpg.Pool, exchange: AbstractExchange, rows: Sequence[dict[str, Any] | asyncpg.Record]
) -> None:
    """Publish each finished execution (as `executions show --json` prints it, events included)
    with routing key `execution.<id>.<status>`. A failure to publish is logged, not raised: the
    state is already in PostgreSQL, and waiting clients re-read it from there."""
    if not rows:
        return
    rows = [dict(r) for r in rows]
    events: dict[Any, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
    try:
        for ev in await pool.fetch(q.EVENTS, list(events)):
            events[ev["execution_id"]].append(dict(ev))
    except Exception as exc:  # noqa: BLE001 - the outcome matters more than its history
        log.warning("notification_events_unavailable", error=str(exc))

    async def one(row: dict[str, Any]) -> None:
        body = json.dumps(execution_json(row, events[row["id"]])).encode()
        key = Names.notification_key(row["id"], row["status"])
        try:
            # Not mandatory: nobody listening is normal, and no reason to hear back from the broker.
            await exchange.publish(
                persistent_json(body, message_id=str(row["id"])), routing_key=key, mandatory=False
            )
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("notification_publish_failed", execution_id=str(row["id"]), error=str(exc))

    await asyncio.gather(*(one(r) for r in rows))
