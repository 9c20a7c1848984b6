"""RabbitMQ topology (DESIGN section 2), connection and publishing helpers."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from common.retry import connect_retrying

REQUESTED_KEY = "execution.requested"


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

    def worker_queue(self, worker: str) -> str:
        return f"{self.prefix}.worker.{worker}"

    @staticmethod
    def worker_routing_key(worker: str) -> str:
        return f"worker.{worker}"

    @staticmethod
    def notification_key(execution_id: object, status: str) -> str:
        return f"execution.{execution_id}.{status}"


async def connect(url: str, *, max_wait_s: float = 60.0) -> AbstractRobustConnection:
    """A robust connection (it reconnects and re-declares by itself), waiting for the broker first."""
    async for attempt in connect_retrying(max_wait_s):
        with attempt:
            return await aio_pika.connect_robust(url)
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


async def declare_requests_queue(channel: AbstractChannel, names: Names) -> AbstractQueue:
    exchange = await channel.declare_exchange(names.executions_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(names.requests_queue, durable=True)
    await queue.bind(exchange, REQUESTED_KEY)
    return queue


async def declare_executor_topology(
    channel: AbstractChannel, names: Names, *, rejected_max_length: int
) -> tuple[Exchanges, AbstractQueue]:
    """Everything the executor consumes from or publishes to; idempotent."""
    exchanges = await declare_exchanges(channel, names)
    requests = await declare_requests_queue(channel, names)
    dead_letters = await channel.declare_queue(names.dead_letters_queue, durable=True)
    await dead_letters.bind(exchanges.dlx)
    # Requests that cannot be tied to an execution are parked here with their reason, for operators.
    await channel.declare_queue(
        names.rejected_requests_queue,
        durable=True,
        arguments={"x-max-length": rejected_max_length, "x-overflow": "drop-head"},
    )
    return exchanges, requests


async def declare_worker_queue(
    channel: AbstractChannel, names: Names, worker: str, *, queue_ttl_ms: int
) -> AbstractQueue:
    """The worker's inbox. Never `x-expires`: an expired queue drops dispatches without dead-lettering."""
    exchanges = await declare_exchanges(channel, names)
    name = names.worker_queue(worker)
    arguments = {"x-message-ttl": queue_ttl_ms, "x-dead-letter-exchange": names.dlx}
    try:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        # The queue exists with other arguments: `worker.queue_ttl` was changed. An empty queue is
        # simply declared anew; one still holding dispatches is left alone (they would be lost).
        await channel.reopen()
        try:
            await channel.queue_delete(name, if_empty=True)
        except aiormq.exceptions.ChannelPreconditionFailed:
            raise RuntimeError(
                f"queue {name} exists with other arguments than worker.queue_ttl = {queue_ttl_ms} ms asks for, "
                f"and still holds dispatches: start the worker once with the old value to drain it, "
                f"or delete the queue (its executions are rescheduled by the scheduled-timeout monitor)"
            ) from exc
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    await queue.bind(exchanges.dispatch, names.worker_routing_key(worker))
    return queue


async def delete_topology(url: str, names: Names, workers: list[str] | tuple[str, ...] = ()) -> None:
    """Remove every queue and exchange under ``names.prefix`` (and the named workers' queues):
    how tests and benchmarks leave a shared broker as they found it."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queues = [names.requests_queue, names.rejected_requests_queue, names.dead_letters_queue]
        queues += [names.worker_queue(w) for w in workers]
        for queue in queues:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in (names.executions_exchange, names.dispatch_exchange, names.dlx, names.notifications_exchange):
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def ack_all(messages: list[AbstractIncomingMessage]) -> None:
    """Ack a batch taken in delivery order with one `basic.ack(multiple)` per channel. Messages
    already settled (rejected) are skipped by the broker. An ack that fails because the channel
    died is fine: the message is redelivered, and every consumer of Baton's is idempotent to that."""
    last: dict[int, AbstractIncomingMessage] = {}
    for message in messages:
        # `channel` raises once the channel has closed; such a message is redelivered anyway.
        with contextlib.suppress(Exception):
            if not message.processed:
                last[id(message.channel)] = message
    for message in last.values():
        with contextlib.suppress(Exception):
            await message.ack(multiple=True)


def persistent_json(body: bytes, **properties: object) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **properties,  # type: ignore[arg-type]
    )
