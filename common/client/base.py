"""What every part of the client shares: its settings, its connections (a PostgreSQL pool, an AMQP
channel with an exclusive inbox for replies and notifications), and reading one execution."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar, cast

import aio_pika
import aiormq.exceptions
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from common import amqp, db
from common.best_effort import best_effort
from common.queries import executions as q
from common.queries import workflows as wfq
from common.retry import TRANSIENT_ERRORS
from common.schemas import ANSWERS_HEADER, execution_json, jsonable_row
from common.settings import Settings

#: How long closing each connection may take before it is dropped.
CLOSE_TIMEOUT_S = 5.0

#: What unbinding a notification key may fail with once the channel or the broker has gone.
_UNBIND_ERRORS: tuple[type[BaseException], ...] = (aio_pika.exceptions.AMQPError, *TRANSIENT_ERRORS)


_T = TypeVar("_T")


class RequestRejected(Exception):
    """The executor refused the request outright (it could not be tied to an execution)."""


class RequestNotPosted(Exception):
    """The broker did not take the request: no execution exists under its id."""


class ClientBase:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = amqp.Names(settings.message_queue.prefix)
        self._pool: asyncpg.Pool | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._inbox: AbstractQueue | None = None
        self._connecting: dict[str, asyncio.Future[Any]] = {}  # by kind: the connect under way
        # The executor's reply to each message posted, by its correlation id (the message's id): its
        # body, and whether it answers a batch as a whole (`ANSWERS_HEADER`).
        self._replies: dict[str, asyncio.Future[tuple[bytes, bool]]] = {}
        # A notification only wakes a waiter, which then reads the row: anyone who can publish to
        # the exchange could have written one, and PostgreSQL's row is the only truth.
        self._notified: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close both connections, each within `CLOSE_TIMEOUT_S`, so that a command never hangs on
        its way out (interrupted by Ctrl-C in the middle of a read, say)."""
        if self._connection is not None:
            await best_effort("close_broker_connection", asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S))
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                self._pool.terminate()

    # -- connections -------------------------------------------------------------------------

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            return await self._once("pool", self._connect_pool)
        return self._pool

    async def _amqp(self) -> tuple[AbstractChannel, AbstractQueue]:
        if self._channel is not None and self._inbox is not None:
            return self._channel, self._inbox
        return await self._once("amqp", self._connect_amqp)

    async def _once(self, kind: str, connect: Callable[[], Awaitable[_T]]) -> _T:
        """Connect once for every caller waiting at the time: tasks that all start on a new client
        share one connection (each opening its own left the broker out of file descriptors), and
        one failure, which each of them gets."""
        attempt = self._connecting.get(kind)
        if attempt is None:
            attempt = self._connecting[kind] = asyncio.ensure_future(connect())
            attempt.add_done_callback(functools.partial(self._connected, kind))
        return cast(_T, await asyncio.shield(attempt))

    def _connected(self, kind: str, done: asyncio.Future[Any]) -> None:
        """The connect is over: the next caller that finds no connection tries again. How it ended
        is read, so that a failure nobody awaited any more is not reported."""
        self._connecting.pop(kind, None)
        if not done.cancelled():
            done.exception()

    async def _connect_pool(self) -> asyncpg.Pool:
        # Kept here, not by the caller: one that is cancelled meanwhile would leave it unclosed.
        self._pool = await db.connect(
            self.settings.database.url, max_size=2, max_wait_s=self.settings.database.startup_wait_s
        )
        return self._pool

    async def _connect_amqp(self) -> tuple[AbstractChannel, AbstractQueue]:
        if self._channel is None or self._inbox is None:
            mq = self.settings.message_queue
            self._connection = await amqp.connect(
                mq.url, max_wait_s=mq.startup_wait_s, reconnect_interval_s=mq.reconnect_interval_s
            )
            # Declared here too, so that a request posted before any executor ever ran is kept. A
            # submitter's credentials may not configure Baton's topology (README, trust model):
            # then the executor has declared it, and this client only uses it.
            setup = await self._connection.channel()
            try:
                await amqp.declare_exchanges(setup, self.names)
                await amqp.declare_requests_queue(setup, self.names, queue_type=self.settings.message_queue.queue_type)
            except aiormq.exceptions.ChannelAccessRefused:
                pass
            finally:
                if not setup.is_closed:
                    await setup.close()
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            # Exclusive, and named under `<prefix>.reply.` so that the executor answers it (it
            # answers no other kind of queue, a worker's above all).
            self._inbox = await self._channel.declare_queue(
                self.names.reply_queue(uuid.uuid4().hex), exclusive=True, auto_delete=True
            )
            await self._inbox.consume(self._on_inbox, no_ack=True)
        return self._channel, self._inbox

    async def _on_inbox(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        routing_key = message.routing_key or ""
        if routing_key.startswith("execution."):  # execution.<id>.<status>: wake its waiter
            woken = self._notified.get(routing_key.split(".")[1] if routing_key.count(".") == 2 else "")
            if woken is not None:
                woken.set()
            return
        future = self._replies.pop(message.correlation_id or "", None)  # a reply to one of our messages
        if future is not None and not future.done():
            future.set_result((message.body, (message.headers or {}).get(ANSWERS_HEADER) == "list"))

    async def _watch(self, execution_id: uuid.UUID) -> asyncio.Event:
        """Subscribe to the execution's terminal notification (before looking at its state)."""
        channel, inbox = await self._amqp()
        key = str(execution_id)
        if key not in self._notified:
            self._notified[key] = asyncio.Event()
            exchange = await channel.get_exchange(self.names.notifications_exchange)
            await inbox.bind(exchange, f"execution.{key}.*")
        return self._notified[key]

    async def _unwatch(self, execution_id: uuid.UUID) -> None:
        """Forget the execution and unbind its key: a long-lived client does not pile up bindings."""
        key = str(execution_id)
        if self._notified.pop(key, None) is None or self._channel is None or self._inbox is None:
            return
        channel, inbox = self._channel, self._inbox

        async def unbind() -> None:
            exchange = await channel.get_exchange(self.names.notifications_exchange)
            await inbox.unbind(exchange, f"execution.{key}.*")

        try:
            # Bounded: a robust channel waits for the broker to come back. (Left bound, a key is
            # bound for an execution that is over: its notification, if any, is dropped here.)
            await asyncio.wait_for(unbind(), CLOSE_TIMEOUT_S)
        except _UNBIND_ERRORS:  # a timeout among them
            # A closed channel took its exclusive queue, and every binding, with it.
            pass

    # -- reading one execution --------------------------------------------------------------

    async def resolve_id(self, execution_id: uuid.UUID | str) -> uuid.UUID:
        """A whole id, or a unique prefix of one (as `executions list` prints them). Read through
        the primary key's range: a prefix is every id between it padded with 0s and with fs."""
        if isinstance(execution_id, uuid.UUID):
            return execution_id
        text = execution_id.strip().lower()
        with contextlib.suppress(ValueError):
            return uuid.UUID(text)
        digits = text.replace("-", "")
        if not digits or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
            raise ValueError(f"{execution_id!r} is not an execution id or a prefix of one (hex digits and dashes)")
        pool = await self.pool()
        rows = await pool.fetch(
            q.BY_ID_RANGE, uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
        )
        if not rows:
            raise ValueError(f"no execution has an id starting with {execution_id!r}")
        if len(rows) > 1:
            raise ValueError(f"more than one execution has an id starting with {execution_id!r}: give more of it")
        return uuid.UUID(str(rows[0]["id"]))

    async def get(self, execution_id: uuid.UUID | str) -> dict[str, Any] | None:
        """The execution with its events (and a workflow's steps), as `baton executions show
        --json` prints it."""
        pool = await self.pool()
        try:
            execution_id = await self.resolve_id(execution_id)
        except ValueError:
            return None
        row = await pool.fetchrow(q.GET, execution_id)
        if row is None:
            return None
        events = [dict(e) for e in await pool.fetch(q.EVENTS, [execution_id])]
        out = execution_json(dict(row), events)
        steps = await pool.fetch(wfq.STEP_TIMELINE, execution_id)
        if steps:
            out["steps"] = [jsonable_row(s) for s in steps]
        return out
