"""Posting invocations (one by one with the executor's reply, or many in batch messages) and
waiting for their outcome."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import functools
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq.exceptions
from pydantic import ValidationError

from common import amqp
from common.client.base import ClientBase, RequestNotPosted, RequestRejected
from common.errors import describe
from common.ids import MAX_BATCH_REQUESTS, batch_execution_id
from common.logging import get_logger
from common.retry import TRANSIENT_ERRORS
from common.schemas import ANSWERS, ANSWERS_HEADER, TERMINAL_STATUSES, Acceptance
from common.settings import Settings

log = get_logger("baton.client")


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


def fits_a_batch(request: bytes, max_bytes: int) -> bool:
    """Whether an encoded request fits a batch message of ``max_bytes`` (with its brackets)."""
    return len(request) + 2 <= max_bytes


def request_batches(requests: list[bytes], max_count: int, max_bytes: int) -> list[list[bytes]]:
    """Encoded requests grouped into batch messages of at most ``max_count`` and ``max_bytes``."""
    batches: list[list[bytes]] = []
    size = 0
    for request in requests:
        if not fits_a_batch(request, max_bytes):
            raise ValueError(f"a request of {len(request)} bytes is larger than message_queue.max_request_bytes")
        if not batches or len(batches[-1]) >= max_count or size + len(request) + 1 > max_bytes - 2:
            batches.append([])
            size = 0
        batches[-1].append(request)
        size += len(request) + 1
    return batches


def batch_message(requests: list[bytes]) -> tuple[str, list[uuid.UUID], bytes]:
    """A batch message of these encoded requests: its message_id, its executions' ids (in order)
    and its body."""
    message_id = uuid.uuid4().hex
    return message_id, [batch_execution_id(message_id, i) for i in range(len(requests))], b"[" + b",".join(requests) + b"]"


@dataclass(eq=False)
class _Outgoing:
    """A request `submit` hands to the next post: its body, and the futures its submitter awaits."""

    body: bytes
    watch: bool
    posted: asyncio.Future[uuid.UUID]  # its execution id, once the broker has taken its message
    answered: asyncio.Future[Acceptance | None]  # what the executor answered
    #: Posted again alone (its batch refused whole, `_post_alone`): once the broker has taken that.
    reposted: asyncio.Future[uuid.UUID] | None = None


def _own(exc: Exception) -> Exception:
    """A copy of ``exc`` for one submitter: one object raised in many tasks gathers all their
    tracebacks. (One whose class cannot be copied is shared.)"""
    try:
        return copy.copy(exc)
    except Exception:  # noqa: BLE001 - a copy runs the class's own code: aiormq's PublishError
        # is rebuilt from its message alone and fails (AttributeError); the original will do.
        return exc


def _not_posted(exc: Exception, exchange: str) -> Exception:
    """What a submitter whose request could not be posted is told: the broker's own error, or for
    a request it returned (nothing routes requests), what to do about it."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        return RequestNotPosted(
            f"the broker returned the request unrouted: no queue takes requests from exchange {exchange!r} any "
            f"more (removed since this client declared it); start an executor with this message_queue.prefix, "
            f"which declares it again, then submit again"
        )
    return _own(exc)


def _failed(outgoing: list[_Outgoing], exc: BaseException) -> None:
    """Posting these went wrong in a way nothing foresaw: log it, and fail each submitter not yet
    answered."""
    log.error("client_post_failed", error=describe(exc))
    for request in outgoing:
        for future in (request.posted, request.answered):
            if not future.done():
                future.set_exception(RuntimeError(f"posting the request failed: {describe(exc)}"))


def _stopped_waiting(alone: _Outgoing, answered: asyncio.Future[Acceptance | None]) -> None:
    """The submitter of a request posted again alone no longer waits (or was answered otherwise):
    neither does its post, once the broker has taken it."""
    if not alone.answered.done():
        alone.answered.cancel()


def _refused_whole(body: bytes, *, listed: bool) -> bool:
    """Whether the executor's reply to a batch refuses the message as a whole (one refusal for all
    its requests), rather than answering each of them."""
    if not listed or body.lstrip()[:1] == b"[":
        return False
    try:
        return Acceptance.model_validate_json(body).execution_id is None
    except ValidationError:
        return False


def _messages(outgoing: list[_Outgoing], max_bytes: int) -> list[list[_Outgoing]]:
    """Requests grouped into messages: batches within the limits, and a request too large for one
    alone (the executor refuses it with the reason, as any request of its size)."""
    fits = [o for o in outgoing if fits_a_batch(o.body, max_bytes)]
    order = iter(fits)
    groups = [[next(order) for _ in batch] for batch in request_batches([o.body for o in fits], MAX_BATCH_REQUESTS, max_bytes)]
    return groups + [[o] for o in outgoing if not fits_a_batch(o.body, max_bytes)]


def _answers(body: bytes, count: int, *, listed: bool) -> list[Acceptance | Exception | None]:
    """The executor's reply to a message of ``count`` requests, as one answer per request: a batch's
    reply lists them (``listed``: the reply says it answers the batch); a lone request's, or a batch
    refused as a whole, is one for all. A batch answered one request at a time (by an executor from
    before the list: no header) is not answered here, as its first reply speaks for one request."""
    try:
        if count > 1 and not listed:
            return [None] * count
        if count > 1 and body.lstrip()[:1] == b"[":
            answers: list[Acceptance | Exception | None] = list(ANSWERS.validate_json(body))
            if len(answers) == count:
                return answers
            raise ValueError(f"{len(answers)} answers to {count} requests")
        one = Acceptance.model_validate_json(body)
        return [one.model_copy(deep=True) for _ in range(count)]
    except ValueError as exc:  # pydantic's ValidationError is one
        problem = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        return [RequestRejected(f"the executor's reply cannot be read: {problem}") for _ in range(count)]


class Posting(ClientBase):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Requests submitted since the event loop last came round, to be posted together, and
        # the posts under way.
        self._outbox: list[_Outgoing] = []
        self._posting: set[asyncio.Task[None]] = set()

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
        `failed` (unknown action, bad parameters) comes back with that status and its error.

        Requests submitted at once (from tasks run together, say) are posted together, in batch
        messages: the executor records and answers them a message at a time, which costs it, the
        broker and this client far less than a message each. A request submitted alone is posted
        alone, at once; its execution id is its message's id."""
        await self._amqp()  # connected first, so that what is submitted together is posted together
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
        loop = asyncio.get_running_loop()
        outgoing = _Outgoing(json.dumps(body).encode(), watch, loop.create_future(), loop.create_future())
        self._outbox.append(outgoing)
        if len(self._outbox) == 1:
            # What else is submitted before the event loop comes round goes out in the same message.
            loop.call_soon(self._post_outbox)
        try:
            execution_id = await outgoing.posted
            try:
                acceptance = await asyncio.wait_for(asyncio.shield(outgoing.answered), accept_timeout_s)
            except TimeoutError:
                acceptance = None
                if outgoing.reposted is not None:  # "posted" once it is, again: or why it is not
                    await asyncio.shield(outgoing.reposted)
        finally:
            for future in (outgoing.posted, outgoing.answered):
                if future.done() and not future.cancelled():
                    future.exception()  # read: one settled as this submitter was cancelled is not reported
                future.cancel()  # a submitter gone (cancelled) takes no answer, and is not posted
        if acceptance is None:
            return Submission(execution_id, accepted=False)
        if acceptance.execution_id is None:
            if watch:  # refused: no execution will ever be notified under this id
                await self._unwatch(execution_id)
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

    def _post_outbox(self) -> None:
        outgoing, self._outbox = self._outbox, []
        task = asyncio.create_task(self._post(outgoing))
        self._posting.add(task)
        task.add_done_callback(functools.partial(self._posted, outgoing))

    def _posted(self, outgoing: list[_Outgoing], task: asyncio.Task[None]) -> None:
        """A post is over. One that failed unexpectedly before any message went out fails every
        submitter: none of them waits for good."""
        self._posting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _failed(outgoing, exc)

    async def _post(self, outgoing: list[_Outgoing]) -> None:
        """Post requests submitted together: a lone one as a message of its own, more as batch
        messages (one reply each, an answer per request); then hand each submitter its answer."""
        max_bytes = self.settings.message_queue.max_request_bytes
        await asyncio.gather(*(self._post_group(group) for group in _messages(outgoing, max_bytes)))

    async def _post_group(self, group: list[_Outgoing]) -> None:
        """Post one message's requests; one that fails unexpectedly fails the submitters it had not
        answered yet, and no others (another message's may have been posted)."""
        try:
            await self._post_message(group)
        except Exception as exc:  # noqa: BLE001 - anything unforeseen: said, and its submitters told
            _failed(group, exc)

    async def _post_message(self, group: list[_Outgoing], execution_id: uuid.UUID | None = None) -> None:
        """Post one message of ``group``'s requests (a lone one under ``execution_id``, if given)
        and hand each submitter its answer."""
        reply = asyncio.get_running_loop().create_future()
        message_id = ""
        watched: list[uuid.UUID] = []
        try:
            channel, inbox = await self._amqp()
            group = [r for r in group if not r.posted.done()]  # a submitter cancelled by now is not posted
            if not group:
                return
            if len(group) == 1:
                message_id = str(execution_id or uuid.uuid4())  # the execution's id too
                ids, body, headers = [uuid.UUID(message_id)], group[0].body, None
            else:
                message_id, ids, body = batch_message([o.body for o in group])
                headers = {ANSWERS_HEADER: "list"}
            for request, execution_id in zip(group, ids, strict=True):
                if request.watch:
                    watched.append(execution_id)
                    await self._watch(execution_id)
            self._replies[message_id] = reply
            exchange = await channel.get_exchange(self.names.executions_exchange)
            await exchange.publish(
                amqp.persistent_json(
                    body, message_id=message_id, correlation_id=message_id, reply_to=inbox.name, headers=headers
                ),
                routing_key=amqp.REQUESTED_KEY,
                mandatory=True,
            )
        except BaseException as exc:
            self._replies.pop(message_id, None)
            for request in group:
                if not request.posted.done():
                    request.posted.set_exception(
                        _not_posted(exc, self.names.executions_exchange) if isinstance(exc, Exception)
                        else RuntimeError("the client stopped before posting the request")
                    )
            if not isinstance(exc, Exception):
                raise  # (a client that stops closes its inbox, and every binding goes with it)
            # Nothing was posted under these ids: their keys stay bound for nobody.
            for execution_id in watched:
                await self._unwatch(execution_id)
            return
        for request, execution_id in zip(group, ids, strict=True):
            if not request.posted.done():
                request.posted.set_result(execution_id)
        # Until the reply comes, or every submitter has stopped waiting for it (each for as long as
        # it was told to: it then cancels its `answered`).
        while not reply.done() and (waiting := [r.answered for r in group if not r.answered.done()]):
            await asyncio.wait([reply, *waiting], return_when=asyncio.FIRST_COMPLETED)
        self._replies.pop(message_id, None)
        if not reply.done():
            return
        body, listed = reply.result()
        if len(group) > 1 and _refused_whole(body, listed=listed):
            # What refused the message (its size, over an executor's limit lower than this
            # client's, say) need not concern its requests: each is posted again alone, under the
            # execution id it has (and is watched under), and answered for itself. Those whose
            # submitters no longer wait too: they were told the request was posted.
            await asyncio.gather(*(self._post_alone(r, i) for r, i in zip(group, ids, strict=True)))
            return
        for request, answer in zip(group, _answers(body, len(group), listed=listed), strict=True):
            if request.answered.done():
                continue
            if isinstance(answer, Exception):
                request.answered.set_exception(answer)
            else:
                request.answered.set_result(answer)

    async def _post_alone(self, request: _Outgoing, execution_id: uuid.UUID) -> None:
        """Post ``request`` again, as a message of its own under ``execution_id``, and hand its
        submitter what that post comes to; a submitter that stops waiting stops it."""
        loop = asyncio.get_running_loop()
        alone = _Outgoing(request.body, request.watch, loop.create_future(), loop.create_future())
        request.reposted = alone.posted
        stop = functools.partial(_stopped_waiting, alone)
        request.answered.add_done_callback(stop)
        try:
            await self._post_message([alone], execution_id)
        except Exception as exc:  # noqa: BLE001 - anything unforeseen fails this request alone
            log.error("client_post_failed", error=describe(exc))
            if not alone.posted.done():
                alone.posted.set_exception(RuntimeError(f"posting the request failed: {describe(exc)}"))
        finally:
            request.answered.remove_done_callback(stop)
        # Each read here, so that none is reported as never read (a submitter that stopped waiting
        # reads `reposted` itself).
        failures = [f.exception() for f in (alone.posted, alone.answered) if f.done() and not f.cancelled()]
        if request.answered.done():
            return
        if (failure := next((exc for exc in failures if exc is not None), None)) is not None:
            request.answered.set_exception(failure)
            return
        if alone.answered.done() and not alone.answered.cancelled():
            request.answered.set_result(alone.answered.result())
        else:  # posted, and no answer came before the submitter stopped waiting
            request.answered.cancel()

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
            message_id, chunk_ids, body = batch_message(chunk)
            ids += chunk_ids
            publishes.append(
                exchange.publish(
                    amqp.persistent_json(body, message_id=message_id),
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
