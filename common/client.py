"""The Python client: post invocations, wait for their outcome, read executions and workers.

Posting goes through RabbitMQ like any other client's; reading goes to PostgreSQL, the source of
truth. Waiting listens for the `execution.<id>.<status>` notification and re-reads the row now and
then, so that a notification missed during a broker restart cannot leave a caller waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq.exceptions
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from pydantic import ValidationError

from common import amqp, db, retention, schedules
from common.actions import CORE_ACTIONS, ActionSpec
from common.ids import MAX_BATCH_REQUESTS, batch_execution_id
from common.notifications import publish_terminal
from common.queries import actions as aq
from common.queries import executions as q
from common.queries import schedules as sq
from common.queries import workers as wq
from common.queries import workflows as wfq
from common.retry import TRANSIENT_ERRORS
from common.schemas import TERMINAL_STATUSES, Acceptance, Status, execution_json, jsonable_row
from common.settings import Settings

_TERMINAL = {s.value for s in TERMINAL_STATUSES}

#: What unbinding a notification key may fail with once the channel or the broker has gone.
_UNBIND_ERRORS: tuple[type[BaseException], ...] = (aio_pika.exceptions.AMQPError, *TRANSIENT_ERRORS)


@dataclass
class Submission:
    execution_id: uuid.UUID
    accepted: bool  # an executor has recorded it (False: posted, no executor answered in time)
    status: str | None = None
    duplicate: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # what intake ignored in the request


@dataclass
class ParkedRequest:
    """A request parked in `<prefix>.rejected_requests`, as an operator sees it."""

    key: str  # a digest of its body and message id: how `replay_rejected` names it
    reason: str
    message_id: str | None
    correlation_id: str | None
    body: bytes
    original_bytes: int | None  # set when only the first bytes were kept
    parked_at: str | None

    @property
    def truncated(self) -> bool:
        return self.original_bytes is not None

    @classmethod
    def of(cls, message: aio_pika.abc.AbstractIncomingMessage) -> ParkedRequest:
        headers = message.headers or {}
        digest = hashlib.sha256((message.message_id or "").encode() + b"\0" + message.body).hexdigest()[:16]
        original = headers.get("x-baton-original-bytes")
        return cls(
            key=digest, reason=str(headers.get("x-baton-reason", "")), message_id=message.message_id,
            correlation_id=message.correlation_id, body=message.body,
            original_bytes=int(original) if isinstance(original, int) else None,
            parked_at=message.timestamp.isoformat() if message.timestamp else None,
        )

    def preview(self, limit: int = 200) -> str:
        text = self.body[:limit].decode("utf-8", errors="replace")
        return text + ("..." if len(self.body) > limit else "")


class RequestRejected(Exception):
    """The executor refused the request outright (it could not be tied to an execution)."""


def coerce_key_values(pairs: list[str], schema: dict[str, Any] | None) -> dict[str, Any]:
    """``key=value`` words from a command line as parameters. A value is kept as text where the
    action's schema says the parameter is a string, and read as JSON otherwise (``seconds=1.5``,
    ``cmd='["ls","-l"]'``), falling back to text when it is not JSON."""
    properties = (schema or {}).get("properties", {})
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"parameter {pair!r} is not key=value")
        if properties.get(key, {}).get("type") == "string":
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def request_batches(requests: list[bytes], max_count: int, max_bytes: int) -> list[list[bytes]]:
    """Encoded requests grouped into batch messages of at most ``max_count`` and ``max_bytes``."""
    batches: list[list[bytes]] = []
    size = 0
    for request in requests:
        if len(request) + 2 > max_bytes:
            raise ValueError(f"a request of {len(request)} bytes is larger than message_queue.max_request_bytes")
        if not batches or len(batches[-1]) >= max_count or size + len(request) + 1 > max_bytes - 2:
            batches.append([])
            size = 0
        batches[-1].append(request)
        size += len(request) + 1
    return batches


class BatonClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = amqp.Names(settings.message_queue.prefix)
        self._pool: asyncpg.Pool | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._inbox: AbstractQueue | None = None
        self._replies: dict[str, asyncio.Future[Acceptance]] = {}
        # A notification only wakes a waiter, which then reads the row: anyone who can publish to
        # the exchange could have written one, and PostgreSQL's row is the only truth.
        self._notified: dict[str, asyncio.Event] = {}

    async def __aenter__(self) -> BatonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        if self._pool is not None:
            await self._pool.close()

    # -- connections -------------------------------------------------------------------------

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await db.connect(
                self.settings.database.url, max_size=2, max_wait_s=self.settings.database.startup_wait_s
            )
        return self._pool

    async def _amqp(self) -> tuple[AbstractChannel, AbstractQueue]:
        if self._channel is None or self._inbox is None:
            self._connection = await amqp.connect(
                self.settings.message_queue.url, max_wait_s=self.settings.message_queue.startup_wait_s
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
        future = self._replies.pop(message.correlation_id or "", None)  # a reply to one of our requests
        if future is None or future.done():
            return
        try:
            future.set_result(Acceptance.model_validate_json(message.body))
        except ValidationError as exc:
            future.set_exception(RequestRejected(f"the executor's reply cannot be read: {exc.errors()[0]['msg']}"))

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
        try:
            exchange = await self._channel.get_exchange(self.names.notifications_exchange)
            await self._inbox.unbind(exchange, f"execution.{key}.*")
        except _UNBIND_ERRORS:
            # A closed channel took its exclusive queue, and every binding, with it.
            pass

    # -- posting and waiting ---------------------------------------------------------------

    async def submit(
        self,
        action_ref: str,
        parameters: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
        accept_timeout_s: float = 10.0,
        watch: bool = False,
        max_retries: int | None = None,
        not_before: dt.datetime | None = None,
        delay_s: float | None = None,
    ) -> Submission:
        """Post an invocation and wait (up to ``accept_timeout_s``) for an executor to record it.
        ``delay_s`` or ``not_before`` delay it (it waits as `requested` until then); ``max_retries``
        overrides the action's `retries`.

        Raises :class:`RequestRejected` if the request is refused outright; a request recorded as
        `failed` (unknown action, bad parameters) comes back with that status and its error."""
        channel, inbox = await self._amqp()
        execution_id = uuid.uuid4()
        if watch:
            await self._watch(execution_id)
        body: dict[str, Any] = {"action_ref": action_ref, "parameters": parameters or {}}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if timeout_s is not None:
            body["timeout_seconds"] = timeout_s
        if max_retries is not None:
            body["max_retries"] = max_retries
        if delay_s is not None:
            not_before = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay_s)
        if not_before is not None:
            if not_before.tzinfo is None:
                raise ValueError("not_before must name its time zone")
            body["not_before"] = not_before.isoformat()
        reply = asyncio.get_running_loop().create_future()
        self._replies[str(execution_id)] = reply
        exchange = await channel.get_exchange(self.names.executions_exchange)
        await exchange.publish(
            amqp.persistent_json(
                json.dumps(body).encode(),
                message_id=str(execution_id),
                correlation_id=str(execution_id),
                reply_to=inbox.name,
            ),
            routing_key=amqp.REQUESTED_KEY,
            mandatory=True,
        )
        try:
            acceptance = await asyncio.wait_for(reply, accept_timeout_s)
        except TimeoutError:
            self._replies.pop(str(execution_id), None)
            return Submission(execution_id, accepted=False)
        if acceptance.execution_id is None:
            raise RequestRejected(acceptance.error or "request rejected")
        return Submission(
            acceptance.execution_id,
            accepted=True,
            status=acceptance.status,
            duplicate=acceptance.duplicate,
            error=acceptance.error,
            warnings=acceptance.warnings,
        )

    async def submit_many(
        self, action_ref: str, parameter_sets: Sequence[dict[str, Any]], *, timeout_s: float | None = None,
        max_retries: int | None = None,
    ) -> list[uuid.UUID]:
        """Post one invocation of ``action_ref`` per parameter set, as batch messages (up to
        `MAX_BATCH_REQUESTS` requests and `message_queue.max_request_bytes` each), and return their
        execution ids, in order, once the broker has taken every batch. No executor replies: the
        executions are recorded shortly after, and each can be waited on (:meth:`wait`) or read."""
        channel, _ = await self._amqp()
        exchange = await channel.get_exchange(self.names.executions_exchange)
        requests = []
        for parameters in parameter_sets:
            request: dict[str, Any] = {"action_ref": action_ref, "parameters": parameters}
            if timeout_s is not None:
                request["timeout_seconds"] = timeout_s
            if max_retries is not None:
                request["max_retries"] = max_retries
            requests.append(json.dumps(request).encode())
        ids: list[uuid.UUID] = []
        publishes = []
        for chunk in request_batches(requests, MAX_BATCH_REQUESTS, self.settings.message_queue.max_request_bytes):
            message_id = uuid.uuid4().hex
            ids += [batch_execution_id(message_id, i) for i in range(len(chunk))]
            publishes.append(
                exchange.publish(
                    amqp.persistent_json(b"[" + b",".join(chunk) + b"]", message_id=message_id),
                    routing_key=amqp.REQUESTED_KEY, mandatory=True,
                )
            )
        await asyncio.gather(*publishes)
        return ids

    async def wait(
        self, execution_id: uuid.UUID | str, timeout_s: float | None = None, recheck_s: float = 2.0
    ) -> dict[str, Any]:
        """The execution once it is terminal. Raises TimeoutError after ``timeout_s``."""
        execution_id = uuid.UUID(str(execution_id))
        notified = await self._watch(execution_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                try:
                    current = await self.get(execution_id)
                except TRANSIENT_ERRORS:
                    current = None  # the database is restarting: keep listening, look again soon
                if current is not None and current["status"] in _TERMINAL:
                    return current
                remaining = recheck_s if deadline is None else min(recheck_s, deadline - time.monotonic())
                if remaining <= 0:
                    raise TimeoutError(f"execution {execution_id} did not finish within {timeout_s} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(notified.wait(), remaining)
                notified.clear()
        finally:
            await self._unwatch(execution_id)

    async def run(self, action_ref: str, parameters: dict[str, Any] | None = None, *, timeout_s: float | None = None,
                  wait_timeout_s: float | None = None, **kwargs: Any) -> dict[str, Any]:
        """Submit and wait: the finished execution."""
        submission = await self.submit(action_ref, parameters, timeout_s=timeout_s, watch=True, **kwargs)
        return await self.wait(submission.execution_id, wait_timeout_s)

    # -- reading -------------------------------------------------------------------------------

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

    # -- schedules -------------------------------------------------------------------------------

    async def add_schedule(
        self, name: str, cron_expr: str, action_ref: str, parameters: dict[str, Any] | None = None, *,
        catch_up: str = "latest", timezone: str = "UTC",
    ) -> dict[str, Any]:
        """Add (or change) a schedule; the executors fire it from its next due time on."""
        if not name or len(name) > 200:
            raise ValueError("a schedule name is 1 to 200 characters")
        if catch_up not in ("latest", "all", "none"):
            raise ValueError(f"catch_up is latest, all or none, not {catch_up!r}")
        schedules.check(cron_expr, timezone)
        pool = await self.pool()
        now = await pool.fetchval(q.NOW)
        row = await pool.fetchrow(
            sq.UPSERT, name, cron_expr, action_ref, parameters or {}, catch_up, timezone, "cli",
            schedules.next_after(cron_expr, timezone, now),
        )
        if row is None:
            raise ValueError(f"schedule {name!r} comes from the YAML `schedules:` section: change it there")
        return {k: v for k, v in jsonable_row(row).items() if k != "pg_notify"}

    async def list_schedules(self) -> list[dict[str, Any]]:
        return [jsonable_row(r) for r in await (await self.pool()).fetch(sq.LIST)]

    async def remove_schedule(self, name: str) -> None:
        if await (await self.pool()).fetchval(sq.DELETE, name) is None:
            raise ValueError(f"no schedule {name!r}")

    # -- operator controls ---------------------------------------------------------------------

    async def _explain(self, execution_id: uuid.UUID, verb: str, allowed: str) -> ValueError:
        row = await (await self.pool()).fetchrow(q.GET, execution_id)
        if row is None:
            return ValueError(f"no execution {execution_id}")
        durable = await (await self.pool()).fetchval(wfq.IS_DURABLE, row["action_ref"])
        if "durable" in allowed and not durable:
            return ValueError(
                f"cannot {verb} execution {execution_id}: {row['action_ref']} is not a durable workflow "
                f"(only durable runs can {verb})"
            )
        return ValueError(f"cannot {verb} execution {execution_id}: it is {row['status']} ({verb} takes {allowed})")

    async def _announce(self, rows: list[asyncpg.Record]) -> None:
        """Terminal transitions an operator made: one notification each, as any other has."""
        if not rows:
            return
        channel, _ = await self._amqp()
        exchange = await channel.get_exchange(self.names.notifications_exchange)
        await publish_terminal(exchange, rows)

    async def cancel(self, execution_id: uuid.UUID | str) -> list[dict[str, Any]]:
        """Cancel an execution that has not finished, and the children it started; a running one is
        stopped on its worker within a moment. Returns the executions cancelled."""
        execution_id = await self.resolve_id(execution_id)
        error = {"error": "cancelled by an operator", "failed_by": "operator"}
        async with (await self.pool()).acquire() as conn, conn.transaction():
            await conn.fetchval(wfq.LOCK_EXECUTION, execution_id)
            rows = await conn.fetch(wfq.CANCEL, execution_id, error)
        if not rows:
            raise await self._explain(execution_id, "cancel", "an execution that has not finished")
        await self._announce(rows)
        return [execution_json({k: v for k, v in dict(r).items() if k not in ("control", "wake")}) for r in rows]

    async def pause(self, execution_id: uuid.UUID | str) -> str:
        """Pause a durable run: at once if no worker holds it, else at its next step boundary.
        Returns its status now (`paused`, or `running` until it reaches the boundary)."""
        execution_id = await self.resolve_id(execution_id)
        status = await (await self.pool()).fetchval(wfq.PAUSE, execution_id)
        if status is None:
            raise await self._explain(execution_id, "pause", "a durable run that has not finished")
        return str(status)

    async def resume(self, execution_id: uuid.UUID | str) -> str:
        execution_id = await self.resolve_id(execution_id)
        status = await (await self.pool()).fetchval(wfq.RESUME, execution_id)
        if status is None:
            raise await self._explain(execution_id, "resume", "a paused run, or one asked to pause")
        return str(status)

    async def signal(self, execution_id: uuid.UUID | str, name: str, data: Any = None) -> bool:
        """Deliver a signal; returns whether it woke a run waiting for it (otherwise it waits in
        the run's mailbox for its `ctx.wait_for_signal`)."""
        execution_id = await self.resolve_id(execution_id)
        if not name or len(name) > 200:
            raise ValueError("a signal name is 1 to 200 characters")
        row = await (await self.pool()).fetchrow(wfq.SIGNAL, execution_id, name, data)
        if row is None:
            raise await self._explain(execution_id, "signal", "a durable run that has not finished")
        return bool(row["wakes"])

    async def retry(self, execution_id: uuid.UUID | str) -> uuid.UUID:
        """Rerun a finished run. A durable one that failed, was cancelled or timed out resumes from
        its checkpoint under its own id; any other is rerun from scratch as a new execution linked
        to the old one. Returns the id of the run that will run."""
        execution_id = await self.resolve_id(execution_id)
        pool = await self.pool()
        if await pool.fetchval(wfq.RETRY_DURABLE, execution_id) is not None:
            return execution_id
        new_id = await pool.fetchval(wfq.RETRY_FRESH, execution_id, uuid.uuid4())
        if new_id is None:
            raise await self._explain(execution_id, "retry", "a finished execution")
        return uuid.UUID(str(new_id))

    async def list_executions(
        self, *, status: str | None = None, action_ref: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        if status is not None:
            Status(status)  # a clear ValueError for a status that does not exist
        pool = await self.pool()
        return [jsonable_row(r) for r in await pool.fetch(q.LIST, status, action_ref, limit)]

    async def list_page(
        self, *, status: str | None = None, action_ref: str | None = None, worker: str | None = None,
        since: dt.datetime | None = None, until: dt.datetime | None = None, after: tuple[dt.datetime, uuid.UUID] | None = None,
        id_prefix: str | None = None, limit: int = 50,
    ) -> list[dict[str, Any]]:
        """A page of executions, newest first; ``after`` is the last row of the previous page
        (its `created_at` and `id`): keyset paging, as cheap on page 100 as on page 1."""
        if status is not None and status not in {s.value for s in Status}:
            raise ValueError(f"no status {status!r}: one of {', '.join(s.value for s in Status)}")
        low = high = None
        if id_prefix:
            digits = id_prefix.strip().lower().replace("-", "")
            if not digits or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
                raise ValueError(f"{id_prefix!r} is not an id or a prefix of one")
            low, high = uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
        rows = await (await self.pool()).fetch(
            q.LIST_PAGE, status, action_ref, worker, since, until, after[0] if after else None,
            after[1] if after else None, low, high, limit,
        )
        return [dict(r) for r in rows]

    async def finished_per_minute(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await (await self.pool()).fetch(q.FINISHED_PER_MINUTE)]

    async def count_active(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in await (await self.pool()).fetch(q.COUNT_ACTIVE_BY_STATUS)}

    # -- parked requests -------------------------------------------------------------------------

    async def _parked(self, keep: Callable[[aio_pika.abc.AbstractIncomingMessage], bool] | None = None,
                      limit: int = 1000) -> list[ParkedRequest]:
        """Look at the parked requests (up to ``limit``) without taking them: each is read and put
        back in its place. One that ``keep`` claims is taken off instead (acked)."""
        channel, _ = await self._amqp()
        queue = await channel.get_queue(self.names.rejected_requests_queue, ensure=False)
        seen: list[ParkedRequest] = []
        held: list[aio_pika.abc.AbstractIncomingMessage] = []
        try:
            while len(seen) < limit:
                message = await queue.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                parked = ParkedRequest.of(message)
                if keep is not None and keep(message):
                    await message.ack()
                else:
                    held.append(message)
                seen.append(parked)
        finally:
            for message in held:
                await message.nack(requeue=True)
        return seen

    async def list_rejected(self, limit: int = 100) -> list[ParkedRequest]:
        """The parked requests with their reasons, oldest first; they stay parked."""
        return await self._parked(limit=limit)

    async def replay_rejected(self, key: str) -> ParkedRequest:
        """Post a parked request again, as it came (its body and message id), and take it off the
        parking queue. ``key`` is what `list_rejected` gives it. A request parked only in part (it
        was too large) cannot be replayed."""
        found: list[ParkedRequest] = []

        def claim(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
            if found or ParkedRequest.of(message).key != key:
                return False
            found.append(ParkedRequest.of(message))
            return True

        channel, _ = await self._amqp()
        matches = [p for p in await self._parked(limit=100_000) if p.key == key]
        if not matches:
            raise ValueError(f"no parked request {key!r} (see `baton rejected list`)")
        exchange = await channel.get_exchange(self.names.executions_exchange)
        parked = matches[0]
        if parked.truncated:
            raise ValueError(f"parked request {key} was kept only in part ({parked.original_bytes} bytes): "
                             "it cannot be replayed")
        # Posted first, then taken off: at worst it is posted and still parked, never lost.
        await exchange.publish(
            amqp.persistent_json(parked.body, message_id=parked.message_id, correlation_id=parked.correlation_id),
            routing_key=amqp.REQUESTED_KEY, mandatory=True,
        )
        await self._parked(keep=claim, limit=100_000)
        return parked

    async def prune_workers(self, older_than_s: float) -> tuple[list[str], list[str]]:
        """Remove `inactive` and `lost` workers not seen for ``older_than_s``, with their queues
        if empty: (removed, kept for a queue still holding dispatches)."""
        await self._amqp()
        assert self._connection is not None
        return await retention.prune_workers(
            await self.pool(), self._connection, self.names, older_than_s=older_than_s, batch_size=10_000
        )

    async def list_workers(self) -> list[dict[str, Any]]:
        pool = await self.pool()
        return [jsonable_row(r) for r in await pool.fetch(wq.LIST)]

    async def list_actions(self) -> list[ActionSpec]:
        """Baton's built-ins and every action a worker registered."""
        rows = await (await self.pool()).fetch(aq.LIST)
        return sorted([*CORE_ACTIONS.values(), *(ActionSpec(**dict(r)) for r in rows)], key=lambda a: a.ref)

    async def action(self, action_ref: str) -> ActionSpec | None:
        if action_ref in CORE_ACTIONS:
            return CORE_ACTIONS[action_ref]
        row = await (await self.pool()).fetchrow(aq.GET, action_ref)
        return ActionSpec(**dict(row)) if row is not None else None

    async def action_schema(self, action_ref: str) -> dict[str, Any] | None:
        if action_ref in CORE_ACTIONS:
            return CORE_ACTIONS[action_ref].parameters_schema
        pool = await self.pool()
        row = await pool.fetchrow(aq.GET, action_ref)
        return row["parameters_schema"] if row is not None else None
