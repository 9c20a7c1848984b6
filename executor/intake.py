"""Intake: requests from `<prefix>.execution.requests` become rows in `executions`.

Requests are taken in batches and recorded in one statement; only then are they acked, so a crash
loses nothing (a redelivered request maps to the same execution id and is recorded once). A bad
request is recorded as `failed` when it can be tied to an execution, otherwise parked in
`<prefix>.rejected_requests` with its reason; either way it is acked and never retried in a loop.

Anyone who can reach the broker writes these messages, so no message, whatever its body,
properties or headers, may stop intake: a request PostgreSQL refuses is parked alone (the batch is
recorded again one by one), replies go only to client inboxes, a parked request's headers are
carried only as far as they can be written back to AMQP, and properties that the AMQP library
would fail to decode (invalid UTF-8, out-of-range timestamps, tables nested without end) are
decoded leniently rather than closing the connection. Only an outage (a transient error, or
PostgreSQL refusing everything) puts a batch back, and intake pauses with a jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pamqp import decode as amqp_decode
from pamqp import encode as amqp_encode
from tenacity import RetryCallState, wait_random_exponential

from common import amqp, metrics
from common.amqp import persistent_json
from common.db import until_available
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import executions as q
from common.retry import TRANSIENT_ERRORS
from common.schemas import Acceptance
from executor.requests import (
    NewExecution,
    ParameterValidator,
    Rejection,
    check_action,
    parse_request,
)

if TYPE_CHECKING:
    from common.settings import Settings
    from executor.service import ExecutorContext

log = get_logger("baton.executor.intake")

#: A parked request too large to take in keeps only its first bytes (and its size in a header).
PARKED_BODY_BYTES = 4096
#: A parked request keeps its headers (under `x-baton-original-headers`) only up to this size.
PARKED_HEADERS_BYTES = 16 * 1024
#: How long one reply may take before it is given up (the request is recorded either way).
REPLY_TIMEOUT_S = 5.0

#: PostgreSQL error classes that say the database, not the request, is at fault: connection (08),
#: transaction rollback (40), the schema or the statement (42), resources (53), object state
#: (55), operator intervention (57), system (58), internal (XX). The batch goes back to the queue.
_UNWELL_SQLSTATE_CLASSES = frozenset({"08", "40", "42", "53", "55", "57", "58", "XX"})


class Unavailable(Exception):
    """Something intake needs (the database, the parking queue) is failing for every request."""


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` is an outage rather than something wrong with one request."""
    if isinstance(exc, (Unavailable, *TRANSIENT_ERRORS)):
        return True
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] in _UNWELL_SQLSTATE_CLASSES


def intake_prefetch(settings: Settings) -> int:
    """Deliveries intake holds at once: at most two batches, and at most
    `executor.intake_buffer_bytes` worth of requests of the largest accepted size."""
    by_bytes = settings.executor.intake_buffer_bytes // settings.message_queue.max_request_bytes
    return max(1, min(2 * settings.executor.intake_batch_size, by_bytes))


class Backoff:
    """The pause after consecutive outages: exponential with full jitter (tenacity's
    `wait_random_exponential`), at most ``cap_s``, and back to short once a batch goes through."""

    def __init__(self, first_s: float = 0.25, cap_s: float = 5.0) -> None:
        self._wait = wait_random_exponential(multiplier=first_s, max=cap_s)
        self.failures = 0

    def next_pause(self) -> float:
        self.failures += 1
        state = RetryCallState(None, None, (), {})
        state.attempt_number = self.failures
        return self._wait(state)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class _State:
    """What intake keeps between batches."""

    validator: ParameterValidator = field(default_factory=ParameterValidator)
    backoff: Backoff = field(default_factory=Backoff)


async def run(ctx: ExecutorContext, stop_event: asyncio.Event) -> None:
    install_lenient_amqp_decoding()
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    channel = await ctx.amqp.channel()
    prefetch = intake_prefetch(ctx.settings)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(ctx.names.requests_queue)
    tag = await queue.consume(inbox.put)
    state = _State()
    log.info("intake_started", queue=ctx.names.requests_queue, prefetch=prefetch)
    stop_waiter = asyncio.ensure_future(stop_event.wait())
    try:
        while not stop_event.is_set():
            getter = asyncio.ensure_future(inbox.get())
            await asyncio.wait({getter, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            batch = [getter.result()]
            while len(batch) < ctx.settings.executor.intake_batch_size and not inbox.empty():
                batch.append(inbox.get_nowait())
            try:
                await _process_guarded(ctx, batch, state)
            except Exception as exc:  # noqa: BLE001 - only outages get here (see _process_guarded)
                # Back to the queue; a request recorded before the failure maps to the same id again.
                pause = state.backoff.next_pause()
                log.warning(
                    "infrastructure_unavailable", during="intake", error=_describe(exc), retry_in_s=round(pause, 2)
                )
                for message in batch:
                    if not message.processed:
                        with contextlib.suppress(Exception):
                            await message.nack(requeue=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_event.wait(), pause)
            else:
                state.backoff.reset()
    finally:
        stop_waiter.cancel()
        # Unacked deliveries go back to the queue when the channel closes; another replica takes them.
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        with contextlib.suppress(Exception):
            await channel.close()
        log.info("intake_stopped")


async def _process_guarded(ctx: ExecutorContext, batch: list[AbstractIncomingMessage], state: _State) -> None:
    """Process ``batch``; raise only for an outage. Anything else that goes wrong is a request's
    fault until shown otherwise: the batch is taken again one request at a time, and a request
    that still fails is parked with the error (or, if even that fails, counted as an outage)."""
    try:
        await _process(ctx, batch, state)
        return
    except Exception as exc:
        if unavailable(exc):
            raise
        log.exception("intake_batch_failed", error=_describe(exc), batch=len(batch))
    for message in batch:
        if message.processed:
            continue
        try:
            await _process(ctx, [message], state)
        except Exception as exc:
            if unavailable(exc):
                raise
            await _park(ctx, message, f"intake failed on this request: {_describe(exc)}", bare=True)
            await amqp.ack_all([message])


async def _process(ctx: ExecutorContext, batch: list[AbstractIncomingMessage], state: _State) -> None:
    max_bytes = ctx.settings.message_queue.max_request_bytes
    parsed: list[tuple[AbstractIncomingMessage, NewExecution | Rejection]] = []
    for message in batch:
        try:
            result = parse_request(
                message.body,
                message_id=_text(message.message_id),
                correlation_id=_text(message.correlation_id),
                max_bytes=max_bytes,
            )
        except Exception as exc:  # noqa: BLE001 - say, JSON nested deeper than the parser's recursion
            result = Rejection(f"request cannot be parsed: {_describe(exc)}")
        if isinstance(result, NewExecution):
            result.reply_to = _text(message.reply_to)
        parsed.append((message, result))

    executions = [r for _, r in parsed if isinstance(r, NewExecution)]
    specs = await ctx.catalogue.resolve({e.action_ref for e in executions if e.action_ref and not e.error})
    for execution in executions:
        try:
            check_action(execution, specs.get(execution.action_ref or ""), state.validator)
        except Exception as exc:  # noqa: BLE001 - a schema a worker registered that cannot be used
            execution.fail(f"parameters cannot be checked against the action's schema: {_describe(exc)}")

    inserted, unstorable = await _record(ctx.pool, executions)
    if unstorable:
        parsed = [
            (m, Rejection(unstorable[r.id]) if isinstance(r, NewExecution) and r.id in unstorable else r)
            for m, r in parsed
        ]
    same, duplicates = await _existing(
        ctx.pool, [e for e in executions if e.id not in inserted and e.id not in unstorable]
    )
    await _reply_and_notify(ctx, parsed, inserted, same, duplicates)
    for message, result in parsed:
        if isinstance(result, Rejection):
            await _park(ctx, message, result.reason)
    await amqp.ack_all(batch)
    metrics.REQUESTS.labels("recorded").inc(sum(1 for r in inserted.values() if r["status"] == "requested"))
    metrics.REQUESTS.labels("failed").inc(sum(1 for r in inserted.values() if r["status"] == "failed"))
    metrics.REQUESTS.labels("redelivered").inc(len(same))
    metrics.REQUESTS.labels("duplicate").inc(len(duplicates))
    metrics.REQUESTS.labels("parked").inc(sum(1 for _, r in parsed if isinstance(r, Rejection)))
    if any(row["status"] == "requested" for row in [*inserted.values(), *same.values()]):
        ctx.wake.set()


async def _record(pool: asyncpg.Pool, executions: list[NewExecution]) -> tuple[dict, dict]:
    """Insert all in one statement. If PostgreSQL refuses it for anything but an outage (a NUL in
    a string, a value too large for an index, any other error a request's data can cause), insert
    one by one, so that only the requests that cannot be stored are rejected."""
    if not executions:
        return {}, {}
    try:
        return await _insert(pool, executions), {}
    except Exception as exc:
        if unavailable(exc):
            raise
        if len(executions) > 1:
            log.warning("record_batch_refused", error=_describe(exc), batch=len(executions))
    inserted: dict = {}
    unstorable: dict = {}
    for execution in executions:
        try:
            inserted.update(await _insert(pool, [execution]))
        except Exception as exc:
            if unavailable(exc):
                raise
            unstorable[execution.id] = f"request cannot be stored: {_describe(exc)}"
    return inserted, unstorable


async def _insert(pool: asyncpg.Pool, executions: list[NewExecution]) -> dict:
    args = (
        [e.id for e in executions],
        [e.action_ref for e in executions],
        [json.dumps(e.parameters) for e in executions],
        [e.status for e in executions],
        [e.idempotency_key for e in executions],
        [e.message_id for e in executions],
        [e.correlation_id for e in executions],
        [e.timeout_s for e in executions],
        [json.dumps(e.error) if e.error else None for e in executions],
    )
    # The batch stays unacked while the database is away; nothing is dropped.
    rows = await until_available(lambda: pool.fetch(q.INSERT_REQUESTS, *args), what="record_requests")
    for row in rows:
        fields = {"execution_id": str(row["id"]), "action_ref": row["action_ref"]}
        if row["status"] == "failed":
            log.warning("execution_rejected", error=row["error"]["error"], **fields)
        else:
            log.info("execution_requested", **fields)
    return {row["id"]: dict(row) for row in rows}


async def _existing(pool: asyncpg.Pool, repeated: list[NewExecution]) -> tuple[dict, dict]:
    """For requests not inserted: the execution each one is. By its own id, it is the same request
    seen again (its first recording committed, but the reply or the ack was lost); by its
    idempotency key only, it is another request that duplicates an earlier one."""
    if not repeated:
        return {}, {}
    rows = await pool.fetch(
        q.FIND_EXISTING, [e.id for e in repeated], [e.idempotency_key for e in repeated if e.idempotency_key]
    )
    by_id = {r["id"]: dict(r) for r in rows}
    by_key = {r["idempotency_key"]: dict(r) for r in rows if r["idempotency_key"]}
    same: dict = {}
    duplicates: dict = {}
    for e in repeated:
        if e.id in by_id:
            same[e.id] = by_id[e.id]
            log.info("execution_redelivered", execution_id=str(e.id), status=by_id[e.id]["status"])
        elif e.idempotency_key in by_key:
            row = by_key[e.idempotency_key]
            duplicates[e.id] = row
            log.info("execution_duplicate", execution_id=str(row["id"]), idempotency_key=e.idempotency_key[:100])
    return same, duplicates


def _failed_at_intake(row: dict) -> bool:
    return row["status"] == "failed" and (row.get("error") or {}).get("failed_by") == "executor_intake"


async def _reply_and_notify(ctx: ExecutorContext, parsed, inserted: dict, same: dict, duplicates: dict) -> None:
    replies = []
    for message, result in parsed:
        reply_to = _text(message.reply_to)
        if not reply_to:
            continue
        if isinstance(result, Rejection):
            reply = Acceptance(error=result.reason)
        elif result.id in inserted or result.id in same:
            row = inserted.get(result.id) or same[result.id]
            reply = Acceptance(execution_id=row["id"], status=row["status"], error=(row["error"] or {}).get("error"))
        elif result.id in duplicates:
            row = duplicates[result.id]
            reply = Acceptance(execution_id=row["id"], status=row["status"], duplicate=True)
        else:
            continue
        replies.append(_reply(ctx, message, reply_to, reply))
    await asyncio.gather(*replies)
    # A request seen again that had failed at intake may have lost its notification with its ack.
    failed = [r for r in inserted.values() if r["status"] == "failed"]
    failed += [r for r in same.values() if _failed_at_intake(r)]
    await publish_terminal(ctx.exchanges.notifications, failed)


def reply_allowed(reply_to: str, prefix: str) -> bool:
    """Replies go only to a client's inbox: a queue named `<prefix>.reply.*` or a server-named
    `amq.gen-*` one. Never to Baton's own queues (a worker would take a reply as a dispatch, the
    request queue as a request), nor to RabbitMQ's direct reply-to names, a malformed one of which
    makes the broker close the publishing connection: the executor's own."""
    return reply_to.startswith((f"{prefix}.reply.", "amq.gen-")) and _shortstr(reply_to) is not None


async def _reply(ctx: ExecutorContext, message: AbstractIncomingMessage, reply_to: str, reply: Acceptance) -> None:
    """Send one reply; never raises (the request is recorded either way, and the client can read
    it from PostgreSQL)."""
    if not reply_allowed(reply_to, ctx.names.prefix):
        log.warning("reply_refused", reply_to=reply_to[:300], message_id=_text(message.message_id))
        return
    outgoing = persistent_json(reply.model_dump_json().encode(), correlation_id=_shortstr(message.correlation_id))
    try:
        await asyncio.wait_for(
            ctx.publish_channel.default_exchange.publish(
                outgoing,
                routing_key=reply_to,
                mandatory=False,  # the client may be gone; that is its business
            ),
            REPLY_TIMEOUT_S,
        )
    except asyncio.CancelledError:
        if _being_cancelled():
            raise
        log.warning("reply_publish_failed", reply_to=reply_to[:300], error="cancelled by the AMQP library")
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("reply_publish_failed", reply_to=reply_to[:300], error=_describe(exc))


async def _park(ctx: ExecutorContext, message: AbstractIncomingMessage, reason: str, *, bare: bool = False) -> None:
    """Keep a request that fits no execution, with its reason, before acking it. Its body is kept
    whole unless it is over the size limit (then only its first bytes); its headers are kept under
    `x-baton-original-headers` when they can be written back to AMQP and are not too large.
    If the broker refuses even a bare copy (no headers, first bytes only), raises :class:`Unavailable`."""
    max_bytes = ctx.settings.message_queue.max_request_bytes
    size = len(message.body)
    log.warning("request_rejected", reason=reason[:500], message_id=_text(message.message_id), body_bytes=size)
    attempts = [] if bare else [False]
    attempts.append(True)
    for bare_copy in attempts:
        truncated = bare_copy or size > max_bytes
        headers: dict[str, Any] = {} if bare_copy else _parked_headers(message)
        headers["x-baton-reason"] = reason[:1000]
        if truncated and size > PARKED_BODY_BYTES:
            headers["x-baton-original-bytes"] = size
        try:
            await ctx.publish_channel.default_exchange.publish(
                persistent_json(
                    message.body[:PARKED_BODY_BYTES] if truncated else message.body,
                    message_id=_shortstr(message.message_id),
                    correlation_id=_shortstr(message.correlation_id),
                    headers=headers,
                ),
                routing_key=ctx.names.rejected_requests_queue,
                mandatory=True,  # the parking queue must exist: a return raises, and the request is not acked
            )
            return
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            error: BaseException = Unavailable("publishing was cancelled by the AMQP library")
        except Exception as exc:  # noqa: BLE001
            error = exc
        log.warning("park_failed", message_id=_text(message.message_id), bare=bare_copy, error=_describe(error))
        if unavailable(error):
            raise error
    raise Unavailable(f"the parking queue refuses requests: {_describe(error)}") from error


def _parked_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The original headers, nested (so that the broker acts on none of them: `CC` and `BCC`
    would route the parked copy elsewhere), as far as AMQP can carry them back."""
    try:
        original = message.headers or {}
        if not original:
            return {}
        headers = {"x-baton-original-headers": _writable(original)}
        encoded = amqp_encode.field_table(headers)
        if len(encoded) > PARKED_HEADERS_BYTES:
            return {"x-baton-headers-dropped": f"{len(encoded)} bytes of headers, more than {PARKED_HEADERS_BYTES}"}
        return headers
    except Exception as exc:  # noqa: BLE001 - whatever the headers are, the request is still parked
        return {"x-baton-headers-dropped": f"headers cannot be written back: {_describe(exc)}"[:500]}


def _writable(value: Any, depth: int = 0) -> Any:
    """``value`` as something pamqp can encode again (what it decoded is not always that)."""
    if depth > 32:
        return "(nested too deep)"
    if isinstance(value, dict):
        return {(_shortstr(str(k)) or "?")[:128]: _writable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_writable(v, depth + 1) for v in value]
    if isinstance(value, bytes):  # a long string that was not UTF-8
        return bytearray(value)
    if isinstance(value, (bool, int, float, str, bytearray, decimal.Decimal, dt.datetime)) or value is None:
        try:
            amqp_encode.encode_table_value(value)
            return value
        except Exception:  # noqa: BLE001 - an int too large, a Decimal out of AMQP's range
            return repr(value)[:200]
    return repr(value)[:200]


def _text(value: Any) -> str | None:
    """A message property as text (the AMQP library may hand over anything it decoded)."""
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _shortstr(value: Any) -> str | None:
    """``value`` if AMQP can carry it as a short string (at most 255 bytes of UTF-8), else None."""
    text = _text(value)
    if text is None:
        return None
    try:
        return text if len(text.encode("utf-8")) <= 255 else None
    except UnicodeEncodeError:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _being_cancelled() -> bool:
    """Whether the current task was asked to stop (rather than hit by a library's own cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# -- lenient AMQP decoding ----------------------------------------------------------------------
#
# pamqp (under aio-pika) raises while decoding a frame whose properties hold invalid UTF-8 in a
# short string (message_id, correlation_id, reply_to, a header name) or a timestamp past year
# 9999, and recurses without bound into nested header tables. RabbitMQ relays all of these, and
# the AMQP client then closes the whole connection, gets the message redelivered, and closes it
# again, for ever. Decoding them leniently instead keeps one message from cutting the executor off.

_DEEPEST_TABLE = 32
_UNDECODABLE = "x-baton-undecodable"


def _lenient_short_str(value: bytes) -> tuple[int, str]:
    try:
        length = value[0]
    except IndexError as exc:
        raise ValueError("Could not unpack short string value") from exc
    return length + 1, bytes(value[1 : length + 1]).decode("utf-8", "replace")


def _lenient_timestamp(value: bytes) -> tuple[int, dt.datetime | None]:
    try:
        return amqp_decode._baton_original_timestamp(value)  # type: ignore[attr-defined]
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from None
        return 8, None  # a time no datetime holds


def _lenient_value(value: bytes, depth: int) -> tuple[int, Any]:
    kind = value[0:1]
    if kind == b"F":
        consumed, item = _lenient_table(value[1:], depth)
    elif kind == b"A":
        consumed, item = _lenient_array(value[1:], depth)
    elif kind == b"T":
        consumed, item = _lenient_timestamp(value[1:])
    else:
        decoder = amqp_decode._baton_original_table_mapping.get(kind)  # type: ignore[attr-defined]
        if decoder is None:
            raise ValueError(f"Unknown type: {kind!r}")
        consumed, item = decoder(value[1:])
    return consumed + 1, item


def _container(value: bytes) -> tuple[int, bytes]:
    try:
        length = struct.unpack_from(">I", value, 0)[0]
    except struct.error as exc:
        raise ValueError("Could not unpack table length") from exc
    if 4 + length > len(value):
        raise ValueError("Field table length exceeds available data")
    return 4 + length, bytes(value[4 : 4 + length])


def _lenient_table(value: bytes, depth: int = 0) -> tuple[int, dict[str, Any]]:
    end, body = _container(value)
    if depth >= _DEEPEST_TABLE:
        return end, {_UNDECODABLE: f"nested deeper than {_DEEPEST_TABLE} levels"}
    data: dict[str, Any] = {}
    offset = 0
    try:
        while offset < len(body):
            key_length = body[offset]
            key = body[offset + 1 : offset + 1 + key_length].decode("utf-8", "replace")
            offset += 1 + key_length
            consumed, data[key] = _lenient_value(body[offset:], depth + 1)
            offset += consumed
    except Exception as exc:  # noqa: BLE001 - the rest of this table is skipped, not the frame
        data[_UNDECODABLE] = f"{type(exc).__name__}: {exc}"[:200]
    return end, data


def _lenient_array(value: bytes, depth: int = 0) -> tuple[int, list[Any]]:
    end, body = _container(value)
    if depth >= _DEEPEST_TABLE:
        return end, [f"{_UNDECODABLE}: nested deeper than {_DEEPEST_TABLE} levels"]
    data: list[Any] = []
    offset = 0
    try:
        while offset < len(body):
            consumed, item = _lenient_value(body[offset:], depth + 1)
            data.append(item)
            offset += consumed
    except Exception as exc:  # noqa: BLE001 - the rest of this array is skipped, not the frame
        data.append(f"{_UNDECODABLE}: {type(exc).__name__}: {exc}"[:200])
    return end, data


def install_lenient_amqp_decoding() -> None:
    """Make pamqp decode what it would otherwise raise on (see above); idempotent, process-wide."""
    if getattr(amqp_decode, "_baton_lenient", False):
        return
    amqp_decode._baton_original_timestamp = amqp_decode.timestamp  # type: ignore[attr-defined]
    amqp_decode._baton_original_table_mapping = dict(amqp_decode.TABLE_MAPPING)  # type: ignore[attr-defined]

    def table(value: bytes) -> tuple[int, dict[str, Any]]:
        return _lenient_table(value)

    def array(value: bytes) -> tuple[int, list[Any]]:
        return _lenient_array(value)

    amqp_decode.short_str = _lenient_short_str
    amqp_decode.timestamp = _lenient_timestamp
    amqp_decode.field_table = table
    amqp_decode.field_array = array
    amqp_decode.METHODS.update(shortstr=_lenient_short_str, timestamp=_lenient_timestamp, table=table, array=array)
    amqp_decode.TABLE_MAPPING.update({b"T": _lenient_timestamp, b"F": table, b"A": array})
    amqp_decode._baton_lenient = True  # type: ignore[attr-defined]
