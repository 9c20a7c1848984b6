"""Posting invocations (one by one with the executor's reply, or many in batch messages) and
waiting for their outcome."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from common import amqp
from common.client.base import ClientBase, RequestRejected
from common.ids import MAX_BATCH_REQUESTS, batch_execution_id
from common.retry import TRANSIENT_ERRORS
from common.schemas import TERMINAL_STATUSES


@dataclass
class Submission:
    execution_id: uuid.UUID
    accepted: bool  # an executor has recorded it (False: posted, no executor answered in time)
    status: str | None = None
    duplicate: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # what intake ignored in the request


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


class Posting(ClientBase):
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
            raise RequestRejected(
                acceptance.error or "the executor gave no reason: see its log (request_rejected) for this request"
            )
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
                if current is not None and current["status"] in TERMINAL_STATUSES:
                    return current
                remaining = recheck_s if deadline is None else min(recheck_s, deadline - time.monotonic())
                if remaining <= 0:
                    raise TimeoutError(
                        f"execution {execution_id} did not finish within {timeout_s} s; it goes on: "
                        f"follow it with `baton executions tail {execution_id}`"
                    )
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
