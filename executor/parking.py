"""Parking: a request that cannot be tied to an execution goes to `<prefix>.rejected_requests`
with its reason (`x-baton-reason`), for operators, instead of being retried or lost.

Its body is kept whole unless it is over `message_queue.max_request_bytes` (then only its first
bytes, with `x-baton-original-bytes`); its headers are nested under `x-baton-original-headers`, so
that the broker acts on none of them (`CC` and `BCC` would route the copy straight back), and kept
only as far as AMQP can carry them back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage
from pamqp import encode as amqp_encode

from common.amqp import persistent_json, property_text, short_string
from common.errors import describe
from common.logging import get_logger
from executor.resilience import Unavailable, being_cancelled, unavailable

if TYPE_CHECKING:
    from executor.context import ExecutorContext

log = get_logger("baton.executor.parking")

#: A parked request too large to take in keeps only its first bytes (and its size in a header).
PARKED_BODY_BYTES = 4096
#: A parked request keeps its headers (under `x-baton-original-headers`) only up to this size.
PARKED_HEADERS_BYTES = 16 * 1024

async def park(ctx: ExecutorContext, message: AbstractIncomingMessage, reason: str, *, bare: bool = False) -> None:
    """Keep a request that fits no execution, with its reason, before acking it. Its body is kept
    whole unless it is over the size limit (then only its first bytes); its headers are kept under
    `x-baton-original-headers` when they can be written back to AMQP and are not too large.
    If the broker refuses even a bare copy (no headers, first bytes only), raises :class:`Unavailable`."""
    max_bytes = ctx.settings.message_queue.max_request_bytes
    size = len(message.body)
    log.warning("request_rejected", reason=reason[:500], message_id=property_text(message.message_id), body_bytes=size)
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
                    message_id=short_string(message.message_id),
                    correlation_id=short_string(message.correlation_id),
                    headers=headers,
                ),
                routing_key=ctx.names.rejected_requests_queue,
                mandatory=True,  # the parking queue must exist: a return raises, and the request is not acked
            )
            return
        except asyncio.CancelledError:
            if being_cancelled():
                raise
            error: BaseException = Unavailable("publishing was cancelled by the AMQP library")
        except Exception as exc:  # noqa: BLE001
            error = exc
        log.warning("park_failed", message_id=property_text(message.message_id), bare=bare_copy, error=describe(error))
        if unavailable(error):
            raise error
    raise Unavailable(f"the parking queue refuses requests: {describe(error)}") from error


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
        return {"x-baton-headers-dropped": f"headers cannot be written back: {describe(exc)}"[:500]}


def _writable(value: Any, depth: int = 0) -> Any:
    """``value`` as something pamqp can encode again (what it decoded is not always that)."""
    if depth > 32:
        return "(nested too deep)"
    if isinstance(value, dict):
        return {(short_string(str(k)) or "?")[:128]: _writable(v, depth + 1) for k, v in value.items()}
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


