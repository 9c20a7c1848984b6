"""Requests parked in `<prefix>.rejected_requests`: listed without being taken, and replayed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika

from common import amqp
from common.client.base import ClientBase


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


class Parking(ClientBase):
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
