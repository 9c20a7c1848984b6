"""RabbitMQ topology (DESIGN section 2), connection and publishing helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url

from common import amqp_decoding
from common.best_effort import best_effort
from common.retry import connect_retrying
from common.values import where

REQUESTED_KEY = "execution.requested"

QueueType = Literal["classic", "quorum"]


@dataclass(frozen=True)
class Names:
    """Every exchange and queue name, derived from `message_queue.prefix`."""

    prefix: str

    @property
    def executions_exchange(self) -> str:
        return f"{self.prefix}.executions"

    @property
    def requests_queue(self) -> str:
        return f"{self.prefix}.execution.requests"

    @property
    def rejected_requests_queue(self) -> str:
        return f"{self.prefix}.rejected_requests"

    @property
    def dispatch_exchange(self) -> str:
        return f"{self.prefix}.dispatch"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letters_queue(self) -> str:
        return f"{self.prefix}.dead_letters"

    @property
    def notifications_exchange(self) -> str:
        return f"{self.prefix}.notifications"

    def reply_queue(self, token: str) -> str:
        """A client's exclusive inbox for replies and notifications: the only kind of queue,
        besides a server-named `amq.gen-*` one, that the executor sends a reply to."""
        return f"{self.prefix}.reply.{token}"

    def worker_queue(self, worker: str) -> str:
        return f"{self.prefix}.worker.{worker}"

    @staticmethod
    def worker_routing_key(worker: str) -> str:
        return f"worker.{worker}"

    @staticmethod
    def notification_key(execution_id: object, status: str) -> str:
        return f"execution.{execution_id}.{status}"


async def connect(
    url: str, *, max_wait_s: float = 60.0, reconnect_interval_s: float = 1.0
) -> AbstractRobustConnection:
    """A robust connection (it reconnects every ``reconnect_interval_s`` and re-declares by itself),
    waiting for the broker first. Frames are decoded leniently (`common.amqp_decoding`): no message
    can close the connection."""
    amqp_decoding.install()
    async for attempt in connect_retrying(max_wait_s, what="RabbitMQ", at=where(url)):
        with attempt:
            # What `aio_pika.connect_robust` does, but a connection whose first connect fails is
            # closed here: dropped unclosed, it closes itself when garbage collected, on whatever
            # event loop runs then (another's, in tests), and that close fails unread.
            connection = aio_pika.RobustConnection(
                make_url(url, reconnect_interval=reconnect_interval_s), reconnect_interval=reconnect_interval_s
            )
            try:
                await connection.connect()
            except BaseException:
                await connection.close()
                raise
            return connection
    raise AssertionError("unreachable")


@dataclass
class Exchanges:
    executions: AbstractExchange
    dispatch: AbstractExchange
    dlx: AbstractExchange
    notifications: AbstractExchange


async def declare_exchanges(channel: AbstractChannel, names: Names) -> Exchanges:
    return Exchanges(
        executions=await channel.declare_exchange(
            names.executions_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        ),
        dispatch=await channel.declare_exchange(names.dispatch_exchange, aio_pika.ExchangeType.DIRECT, durable=True),
        # Fanout: dead-lettered messages keep their original routing key, which a direct or topic
        # DLX bound with '#' would not match for every source queue.
        dlx=await channel.declare_exchange(names.dlx, aio_pika.ExchangeType.FANOUT, durable=True),
        notifications=await channel.declare_exchange(
            names.notifications_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        ),
    )


def queue_arguments(queue_type: QueueType, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """A durable queue's arguments for ``message_queue.queue_type``. The type is always explicit, so
    that a switch either way is noticed when the queue is declared again (and a vhost's default
    queue type does not decide it)."""
    if queue_type not in ("classic", "quorum"):
        raise ValueError(f"unknown queue type {queue_type!r}: classic or quorum")
    return {"x-queue-type": queue_type, **(arguments or {})}


def worker_queue_arguments(names: Names, *, queue_ttl_ms: int, queue_type: QueueType) -> dict[str, Any]:
    """A dispatch left `queue_ttl_ms` in a worker's queue is dead-lettered to the DLX. On a quorum
    queue that is at-least-once: the queue keeps the message until the dead-letter queue has
    confirmed it, so no node loss drops an expired dispatch (the default, at-most-once, may). The
    broker requires `reject-publish` overflow for that; with no length limit set it refuses nothing."""
    arguments: dict[str, Any] = {"x-message-ttl": queue_ttl_ms, "x-dead-letter-exchange": names.dlx}
    if queue_type == "quorum":
        arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return queue_arguments(queue_type, arguments)


async def _busy(channel: AbstractChannel, name: str) -> str | None:
    """Why the queue must not be deleted now (it holds messages or has a consumer), or None."""
    declared = await (await channel.get_underlay_channel()).queue_declare(name, passive=True)
    if declared.message_count:
        return f"it holds messages ({declared.message_count})"
    if declared.consumer_count:
        return f"it has consumers ({declared.consumer_count})"
    return None


async def delete_queue_if_idle(
    channel: AbstractChannel, name: str, *, bindings: Sequence[tuple[str, str]] = ()
) -> str | None:
    """Delete the queue, of either type, unless it holds messages or has a consumer; returns why it
    was kept, or None once it is deleted.

    Quorum queues refuse `queue.delete` with `if-empty` or `if-unused` (NOT_IMPLEMENTED, an error
    that closes the whole connection), so a passive declare checks instead. The queue is unbound
    from ``bindings`` ((exchange, routing key) pairs) and checked again before the delete, so that
    nothing routed to it in between is lost; a queue found busy keeps its bindings."""
    reason = await _busy(channel, name)
    if reason is None and bindings:
        underlay = await channel.get_underlay_channel()
        for exchange, key in bindings:
            await underlay.queue_unbind(name, exchange, key)
        reason = await _busy(channel, name)  # what was routed to it before the unbind
        if reason is not None:
            for exchange, key in bindings:
                await underlay.queue_bind(name, exchange, key)
    if reason is None:
        await channel.queue_delete(name)
    return reason


async def _declare_durable(
    channel: AbstractChannel,
    name: str,
    arguments: dict[str, Any],
    *,
    bindings: Sequence[tuple[str, str]],
    replace: bool,
    fix: str,
    busy_ok: bool = False,
) -> AbstractQueue:
    """Declare a durable queue and bind it. One that already exists with other arguments (another
    queue type or TTL: the broker refuses the declaration) is, with ``replace``, deleted and declared
    anew if it is empty and has no consumer; one holding messages is never deleted (they would be
    lost), so then this raises, saying why and what to do (``fix``), unless ``busy_ok`` (the old
    arguments will do until it is empty: it is used as it is). Without ``replace`` the existing
    queue is used as it is."""
    try:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        await channel.reopen()
        kept = await delete_queue_if_idle(channel, name, bindings=bindings) if replace else "it is not ours to replace"
        if kept is None:
            queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        elif replace and not busy_ok:
            raise RuntimeError(
                f"queue {name} exists with other arguments than {arguments} ({exc}), and it is not "
                f"declared anew because {kept}. {fix}"
            ) from exc
        else:
            queue = await channel.declare_queue(name, passive=True)
    for exchange, key in bindings:
        await queue.bind(exchange, key)
    return queue


async def declare_requests_queue(
    channel: AbstractChannel, names: Names, *, queue_type: QueueType = "classic", replace: bool = False
) -> AbstractQueue:
    """The request queue, bound to the executions exchange. Publishers declare it too (so that a
    request posted before any executor ran is kept), without ``replace``: if it exists, of whatever
    type, they use it; the executor, which owns it, declares it with ``replace``."""
    await channel.declare_exchange(names.executions_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    return await _declare_durable(
        channel,
        names.requests_queue,
        queue_arguments(queue_type),
        bindings=[(names.executions_exchange, REQUESTED_KEY)],
        replace=replace,
        fix="Stop the clients and executors that use the old message_queue.queue_type, let an executor with it "
        "take what the queue holds, then start them with the new one.",
    )


async def declare_executor_topology(
    channel: AbstractChannel,
    names: Names,
    *,
    rejected_max_length: int,
    rejected_max_bytes: int = 64 * 1024 * 1024,
    queue_type: QueueType = "classic",
) -> tuple[Exchanges, AbstractQueue]:
    """Everything the executor consumes from or publishes to; idempotent. A queue left by another
    `message_queue.queue_type` is declared anew if it is empty and unused."""
    exchanges = await declare_exchanges(channel, names)
    requests = await declare_requests_queue(channel, names, queue_type=queue_type, replace=True)
    await _declare_durable(
        channel,
        names.dead_letters_queue,
        queue_arguments(queue_type),
        bindings=[(names.dlx, names.dead_letters_queue)],  # a fanout ignores the key; this is the one it always had
        replace=True,
        fix="Run the executors with the old message_queue.queue_type until the queue is empty, then switch.",
    )
    # Requests that cannot be tied to an execution are parked here with their reason, for operators,
    # bounded in count and in bytes (the oldest go first). Quorum queues support both limits and
    # `drop-head`, so this one follows the setting too. One still holding parked requests under
    # older limits is kept as it is until an operator empties it.
    await _declare_durable(
        channel,
        names.rejected_requests_queue,
        queue_arguments(
            queue_type,
            {"x-max-length": rejected_max_length, "x-max-length-bytes": rejected_max_bytes, "x-overflow": "drop-head"},
        ),
        bindings=[],  # published to through the default exchange
        replace=True,
        busy_ok=True,
        fix="Read what is parked there, then purge or delete the queue.",
    )
    return exchanges, requests


async def declare_worker_queue(
    channel: AbstractChannel, names: Names, worker: str, *, queue_ttl_ms: int, queue_type: QueueType = "classic"
) -> AbstractQueue:
    """The worker's inbox. Never `x-expires`: an expired queue drops dispatches without dead-lettering.
    A changed `worker.queue_ttl` or `message_queue.queue_type` takes effect on restart: an empty
    queue with the old arguments is declared anew; one still holding dispatches is left alone."""
    await declare_exchanges(channel, names)
    return await _declare_durable(
        channel,
        names.worker_queue(worker),
        worker_queue_arguments(names, queue_ttl_ms=queue_ttl_ms, queue_type=queue_type),
        bindings=[(names.dispatch_exchange, names.worker_routing_key(worker))],
        replace=True,
        fix="Start the worker once with the old worker.queue_ttl and message_queue.queue_type to drain it, or "
        "delete the queue (its executions are rescheduled by the scheduled-timeout monitor).",
    )


async def delete_topology(url: str, names: Names, workers: list[str] | tuple[str, ...] = ()) -> None:
    """Remove every queue and exchange under ``names.prefix`` (and the named workers' queues):
    how tests and benchmarks leave a shared broker as they found it."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queues = [names.requests_queue, names.rejected_requests_queue, names.dead_letters_queue]
        queues += [names.worker_queue(w) for w in workers]
        for queue in queues:
            await best_effort("delete_queue", channel.queue_delete(queue), queue=queue)
        for exchange in (names.executions_exchange, names.dispatch_exchange, names.dlx, names.notifications_exchange):
            await best_effort("delete_exchange", channel.exchange_delete(exchange), exchange=exchange)
    finally:
        await connection.close()


async def ack_all(messages: list[AbstractIncomingMessage]) -> None:
    """Ack a batch taken in delivery order with one `basic.ack(multiple)` per channel. Messages
    already settled (rejected) are skipped by the broker. An ack that fails because the channel
    died is fine: the message is redelivered, and every consumer of Baton's is idempotent to that."""
    last: dict[int, AbstractIncomingMessage] = {}
    for message in messages:
        if message.processed:
            continue
        try:
            last[id(message.channel)] = message
        except aiormq.exceptions.ChannelInvalidStateError:
            continue  # `channel` raises once the channel has closed; the message is redelivered anyway
    for message in last.values():
        await best_effort("ack_deliveries", message.ack(multiple=True))


def _json_message(body: bytes, delivery_mode: aio_pika.DeliveryMode, properties: dict[str, object]) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=delivery_mode,
        **properties,  # type: ignore[arg-type]
    )


def persistent_json(body: bytes, **properties: object) -> aio_pika.Message:
    return _json_message(body, aio_pika.DeliveryMode.PERSISTENT, properties)


def transient_json(body: bytes, **properties: object) -> aio_pika.Message:
    """A message the broker keeps in memory only: for what PostgreSQL already records (a dispatch
    names a `scheduled` row), which a broker restart may drop without losing anything."""
    return _json_message(body, aio_pika.DeliveryMode.NOT_PERSISTENT, properties)


def property_text(value: Any) -> str | None:
    """A message property as text (the AMQP library may hand over anything it decoded)."""
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def short_string(value: Any) -> str | None:
    """``value`` if AMQP can carry it as a short string (at most 255 bytes of UTF-8), else None."""
    text = property_text(value)
    if text is None:
        return None
    try:
        return text if len(text.encode("utf-8")) <= 255 else None
    except UnicodeEncodeError:
        return None
