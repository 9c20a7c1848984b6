"""No message stops intake, whatever its body, properties or headers (a live executor, fuzzed with
Hypothesis), and intake's own guarantees: what PostgreSQL refuses is parked alone, the same request
seen again is not a duplicate, oversized requests are parked truncated."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import string
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import encode as amqp_encode
from pamqp.commands import Basic

from common import amqp
from common.schemas import Acceptance
from executor.requests import execution_id_for
from tests.harness import AMQP_URL, wait_until

pytestmark = pytest.mark.integration

MAX_REQUEST_BYTES = 65_536


# -- publishing anything a client could write -------------------------------------------------


class Raw(bytes):
    """Bytes put on the wire as they are in place of an encoded property (with its length
    prefix): what a client in another language could send, that pamqp would never encode."""


def raw_shortstr(data: bytes) -> Raw:
    return Raw(bytes([len(data)]) + data)


def raw_table(entries: bytes) -> Raw:
    return Raw(struct.pack(">I", len(entries)) + entries)


def raw_timestamp(seconds: int) -> Raw:
    return Raw(struct.pack(">Q", seconds))


def nested_table(depth: int) -> Raw:
    """A header table nested ``depth`` levels deep: {"a": {"a": {...}}}."""
    inner = b""
    for _ in range(depth):
        inner = b"\x01aF" + struct.pack(">I", len(inner)) + inner
    return raw_table(inner)


@contextlib.contextmanager
def raw_encoding() -> Iterator[None]:
    """Let :class:`Raw` values through pamqp's encoders (in this test process only)."""
    saved = {kind: amqp_encode.METHODS[kind] for kind in ("shortstr", "table", "timestamp")}
    for kind, original in saved.items():

        def encode(value: Any, _original=original) -> bytes:
            return bytes(value) if isinstance(value, Raw) else _original(value)

        amqp_encode.METHODS[kind] = encode
    try:
        yield
    finally:
        amqp_encode.METHODS.update(saved)


@dataclass
class Publisher:
    """A plain AMQP connection that publishes exactly what it is given to the request exchange."""

    names: amqp.Names
    connection: aiormq.abc.AbstractConnection | None = None
    channel: aiormq.abc.AbstractChannel | None = None
    declared: bool = False
    sent: int = 0

    async def open(self) -> None:
        if not self.declared:  # the exchange and queue, as a client would find them
            declaring = await aio_pika.connect(AMQP_URL)
            try:
                await amqp.declare_requests_queue(await declaring.channel(), self.names)
            finally:
                await declaring.close()
            self.declared = True
        if self.connection is None or self.connection.is_closed:
            self.connection = await aiormq.connect(AMQP_URL)
            self.channel = None
        if self.channel is None or self.channel.is_closed:
            self.channel = await self.connection.channel()

    async def publish(self, body: bytes, **properties: Any) -> bool:
        """False if the broker refused the message (it validates some properties itself, e.g. a
        `reply_to` of `amq.rabbitmq.reply-to` from a channel that does not consume from it)."""
        await self.open()
        properties.setdefault("delivery_mode", 2)
        try:
            await self.channel.basic_publish(
                body,
                exchange=self.names.executions_exchange,
                routing_key=amqp.REQUESTED_KEY,
                properties=Basic.Properties(**properties),
            )
        except aiormq.exceptions.AMQPError:
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.connection = None
            return False
        self.sent += 1
        return True

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()


@pytest.fixture
async def publisher(baton):
    p = Publisher(baton.names)
    with raw_encoding():
        yield p
    await p.close()


async def _recorded(baton, execution_id: Any, timeout_s: float = 20) -> dict[str, Any]:
    async def row() -> Any:
        return await (await baton.pool()).fetchrow("SELECT * FROM executions WHERE id = $1", uuid.UUID(str(execution_id)))

    return dict(await wait_until(row, timeout_s=timeout_s, what=f"execution {execution_id} to be recorded"))


class Replies:
    """A reply queue of our own, and the replies that arrive on it, by correlation id."""

    def __init__(self) -> None:
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None
        self.received: dict[str, list[Acceptance]] = {}
        self.arrived = asyncio.Event()

    async def open(self) -> str:
        self.connection = await aio_pika.connect(AMQP_URL)
        channel = await self.connection.channel()
        self.queue = await channel.declare_queue(exclusive=True, auto_delete=True)

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                self.received.setdefault(message.correlation_id, []).append(
                    Acceptance.model_validate_json(message.body)
                )
                self.arrived.set()

        await self.queue.consume(take)
        return self.queue.name

    async def wait(self, correlation_id: str, count: int = 1) -> list[Acceptance]:
        async def enough() -> list[Acceptance] | None:
            got = self.received.get(correlation_id, [])
            return got if len(got) >= count else None

        return await wait_until(enough, what=f"{count} replies to {correlation_id}")

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


@pytest.fixture
async def replies():
    r = Replies()
    yield r
    await r.close()


async def _notifications(baton, execution_id: Any) -> asyncio.Queue:
    """Every notification published about the execution from now on."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(baton.names.notifications_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, f"execution.{execution_id}.*")
    received: asyncio.Queue = asyncio.Queue()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await received.put(json.loads(message.body))

    await queue.consume(take, no_ack=True)
    received.connection = connection  # type: ignore[attr-defined]
    return received


async def _still_works(baton) -> None:
    done = await (await baton.client()).run("core.noop", wait_timeout_s=30)
    assert done["status"] == "completed", done


def _request(**fields: Any) -> bytes:
    return json.dumps({"action_ref": "core.noop", **fields}).encode()


# -- what PostgreSQL refuses is that request's problem alone ----------------------------------


async def test_an_idempotency_key_too_long_to_index_fails_only_its_request(baton, publisher):
    """A key over the envelope's limit used to be stored anyway; the unique index refused it
    (ProgramLimitExceededError), intake did not expect that, and every executor that took the
    message in turn exited."""
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    key = "".join(random.choices(string.ascii_letters + string.digits, k=3000))
    execution_id = uuid.uuid4()
    await publisher.publish(_request(idempotency_key=key), message_id=str(execution_id))
    row = await _recorded(baton, execution_id)
    assert row["status"] == "failed" and "idempotency_key" in row["error"]["error"]
    assert row["idempotency_key"] is None
    assert executor.process.poll() is None
    await _still_works(baton)


async def test_any_error_storing_one_request_parks_that_request_alone(baton, publisher):
    """Not only a DataError: a request PostgreSQL refuses for any reason of its own (here a check
    constraint, an IntegrityConstraintViolation) is parked with the reason; its batch is recorded."""
    pool = await baton.pool()
    await pool.execute("ALTER TABLE executions ADD CONSTRAINT no_poison CHECK (correlation_id IS DISTINCT FROM 'poison')")
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    good = [uuid.uuid4() for _ in range(5)]
    bad = uuid.uuid4()
    for execution_id in good[:2]:
        await publisher.publish(_request(), message_id=str(execution_id))
    await publisher.publish(_request(), message_id=str(bad), correlation_id="poison")
    for execution_id in good[2:]:
        await publisher.publish(_request(), message_id=str(execution_id))
    for execution_id in good:
        await _recorded(baton, execution_id)
        await baton.wait_status(execution_id, "completed")
    parked = await baton.take_parked(1)
    assert [m.message_id for m in parked] == [str(bad)]
    assert "cannot be stored: CheckViolationError" in parked[0].headers["x-baton-reason"]
    assert await pool.fetchval("SELECT count(*) FROM executions WHERE id = $1", bad) == 0
    assert executor.process.poll() is None
    await _still_works(baton)


async def test_a_database_that_refuses_everything_is_an_outage_not_a_bad_request(baton, publisher):
    """An error that says the database is unwell (here a full disk, SQLSTATE 53100, raised by a
    trigger while a flag is set) parks nothing: the batch goes back to the queue, intake backs
    off, and the request is recorded once the database is well again."""
    pool = await baton.pool()
    await pool.execute("""
        CREATE TABLE disk_full (flag int);
        INSERT INTO disk_full VALUES (1);
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM disk_full) THEN
                RAISE EXCEPTION 'could not extend file' USING ERRCODE = '53100';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON executions FOR EACH ROW EXECUTE FUNCTION refuse();
    """)
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    execution_id = uuid.uuid4()
    await publisher.publish(_request(), message_id=str(execution_id))

    async def backing_off() -> bool:
        return len(executor.events("infrastructure_unavailable")) >= 3

    await wait_until(backing_off, what="intake to put the batch back three times")
    assert "DiskFullError" in executor.events("infrastructure_unavailable")[0]["error"]
    await pool.execute("DELETE FROM disk_full")
    await _recorded(baton, execution_id)
    await baton.wait_status(execution_id, "completed")
    assert await baton.queue_depth(baton.names.rejected_requests_queue) == 0
    assert executor.process.poll() is None


# -- the same request seen again is not a duplicate ------------------------------------------


async def test_the_same_request_seen_again_is_not_a_duplicate(baton, publisher, replies):
    """When the first recording commits but its reply (or ack) is lost, the request comes again:
    it is the same request, answered with its status, not `duplicate`."""
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    reply_to = await replies.open()
    execution_id = str(uuid.uuid4())
    body = _request(idempotency_key="nightly-1")
    await publisher.publish(body, message_id=execution_id, reply_to=reply_to, correlation_id="first")
    (first,) = await replies.wait("first")
    assert (str(first.execution_id), first.duplicate) == (execution_id, False)
    await baton.wait_status(execution_id, "completed")
    await publisher.publish(body, message_id=execution_id, reply_to=reply_to, correlation_id="again")
    (again,) = await replies.wait("again")
    assert (str(again.execution_id), again.status, again.duplicate) == (execution_id, "completed", False)
    # Another request with the same idempotency key is a duplicate.
    await publisher.publish(body, message_id=str(uuid.uuid4()), reply_to=reply_to, correlation_id="other")
    (other,) = await replies.wait("other")
    assert (str(other.execution_id), other.duplicate) == (execution_id, True)


async def test_a_request_failed_at_intake_seen_again_is_notified_again(baton, publisher, replies):
    """Its first notification may have been lost with the ack; publishing it again is harmless."""
    await baton.start_executor()
    reply_to = await replies.open()
    execution_id = uuid.uuid4()
    notified = await _notifications(baton, execution_id)
    try:
        body = _request(action_ref="nosuch.action")
        await publisher.publish(body, message_id=str(execution_id), reply_to=reply_to, correlation_id="first")
        assert (await asyncio.wait_for(notified.get(), 20))["status"] == "failed"
        await publisher.publish(body, message_id=str(execution_id), reply_to=reply_to, correlation_id="again")
        (again,) = await replies.wait("again")
        assert (again.status, again.duplicate) == ("failed", False) and "unknown action" in again.error
        assert (await asyncio.wait_for(notified.get(), 20))["status"] == "failed"
    finally:
        await notified.connection.close()


# -- memory bounded by bytes ------------------------------------------------------------------


async def test_an_oversized_request_is_parked_truncated(baton, publisher, replies):
    executor = await baton.start_executor(BATON__MESSAGE_QUEUE__MAX_REQUEST_BYTES="2048")
    reply_to = await replies.open()
    big = _request(parameters={"blob": "x" * 200_000})
    await publisher.publish(big, message_id="big-1", reply_to=reply_to, correlation_id="big", headers={"trace": "t-1"})
    (parked,) = await baton.take_parked(1)
    assert parked.message_id == "big-1"
    assert "larger than the limit of 2048" in parked.headers["x-baton-reason"]
    assert parked.headers["x-baton-original-bytes"] == len(big)
    assert parked.body == big[: len(parked.body)] and len(parked.body) <= 4096
    assert parked.headers["x-baton-original-headers"] == {"trace": "t-1"}
    (reply,) = await replies.wait("big")
    assert reply.execution_id is None and "larger than the limit" in reply.error
    assert executor.events("intake_started")[0]["prefetch"] == 1000  # 256 MiB / 2 KiB, capped at 2 batches


# -- properties and headers the AMQP library cannot take as they are --------------------------


async def test_properties_that_are_not_utf8_do_not_cut_the_executor_off(baton, publisher):
    """pamqp raised on these while decoding the delivery, the executor's connection closed, the
    message came back, and again, for ever: nothing else was taken in or dispatched."""
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    bad_id = raw_shortstr(b"id-\xff\xfe")
    await publisher.publish(_request(), message_id=bad_id, correlation_id=raw_shortstr(b"\xc3\x28"))
    await publisher.publish(_request(), message_id=str(uuid.uuid4()), headers=raw_table(b"\x02\xff\xfeS\x00\x00\x00\x01a"))
    await publisher.publish(_request(), message_id=str(uuid.uuid4()), timestamp=raw_timestamp(2**63 - 1))
    await publisher.publish(b"\"x\"", message_id="nested-1", headers=nested_table(5000))
    await publisher.publish(b"\"x\"", reply_to=raw_shortstr(b"\xff" * 255), message_id=raw_shortstr(b"\xfe" * 255))
    # The one with a message_id that is not UTF-8 is recorded under the id its lenient reading maps to.
    row = await _recorded(baton, execution_id_for("id-\ufffd\ufffd"))
    assert row["message_id"] == "id-\ufffd\ufffd" and row["error"] is None
    parked = {m.message_id: m for m in await baton.take_parked(2)}
    assert len(parked) == 2 and "nested-1" in parked  # a message_id AMQP cannot carry back is left out
    nested = parked["nested-1"].headers["x-baton-original-headers"]
    for _ in range(20):
        nested = nested["a"]
    assert executor.events("reply_refused")  # a reply_to too long once read is no queue
    assert executor.process.poll() is None
    await _still_works(baton)
    assert not executor.events("loop_died")


async def test_replies_go_only_to_client_inboxes(baton, publisher, replies):
    """A reply to a worker's queue would be taken as a dispatch, to the request queue as a request;
    to a malformed direct reply-to name, RabbitMQ closes the publishing connection (the executor's
    own, every time the request is redelivered). Replies go only to `<prefix>.reply.*` and
    server-named `amq.gen-*` queues."""
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    inbox = await replies.open()
    assert inbox.startswith("amq.gen-")
    crashing = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMzM3NjM2Mg==.abc"
    refused = [crashing, baton.names.worker_queue("w1"), baton.names.requests_queue, crashing, "some-queue"]
    for reply_to in refused:
        await publisher.publish(_request(), message_id=str(uuid.uuid4()), reply_to=reply_to)
    await publisher.publish(b"not json", message_id="nj", reply_to=baton.names.rejected_requests_queue)
    await publisher.publish(_request(), message_id=str(uuid.uuid4()), reply_to=inbox, correlation_id="mine")
    (mine,) = await replies.wait("mine")
    assert mine.status == "requested"
    (parked,) = await baton.take_parked(1)
    assert parked.message_id == "nj"
    assert executor.process.poll() is None
    await _still_works(baton)
    assert len(executor.events("reply_refused")) == len(refused) + 1
    assert not executor.events("loop_died")


async def test_headers_a_broker_acts_on_are_not_acted_on_when_parked(baton, publisher):
    """`CC` names more queues to route a message to: copied onto the parked request, it would put
    it back in the request queue, to be parked again, for ever."""
    executor = await baton.start_executor()
    headers = {"CC": [baton.names.requests_queue], "BCC": [baton.names.requests_queue]}
    await publisher.publish(b"not json", message_id="cc-1", headers=headers)
    await _still_works_without_worker(baton, executor)
    # A copy routed back by `CC` would enter the queue when the request was parked, which may be
    # after the first probe was recorded; a probe posted after that one is behind any such copy,
    # and the queue is then waited empty, so that a copy would have been parked (again) by now.
    await _still_works_without_worker(baton, executor)
    await wait_until(
        lambda: _queue_empty(baton, baton.names.requests_queue), what="the request queue to be empty"
    )
    parked = await baton.take_parked(1)
    assert [m.message_id for m in parked] == ["cc-1"]
    assert parked[0].headers["x-baton-original-headers"]["CC"] == [baton.names.requests_queue]
    assert len(executor.events("request_rejected")) == 1


async def test_headers_that_cannot_be_written_back_do_not_stop_parking(baton, publisher):
    """A long-string header that is not UTF-8 is decoded as bytes, which pamqp cannot encode
    again; headers near the frame size leave no room for the reason. Parking such a request used
    to raise, and intake with it."""
    executor = await baton.start_executor()
    await publisher.publish(b"not json", message_id="bytes-1", headers=raw_table(b"\x01kS\x00\x00\x00\x02\xff\xfe"))
    await publisher.publish(b"not json", message_id="huge-1", headers={"big": "h" * 130_000})
    await publisher.publish(b"not json", message_id="odd-1", headers={"d": 2**62, "when": dt.datetime(2020, 1, 2)})
    await _still_works_without_worker(baton, executor)
    parked = {m.message_id: m for m in await baton.take_parked(3)}
    assert parked["bytes-1"].headers["x-baton-original-headers"] == {"k": bytearray(b"\xff\xfe")}
    assert "more than 16384" in parked["huge-1"].headers["x-baton-headers-dropped"]
    assert parked["odd-1"].headers["x-baton-original-headers"]["d"] == 2**62
    assert all("not JSON" in m.headers["x-baton-reason"] for m in parked.values())


async def _queue_empty(baton, queue: str) -> bool:
    return await baton.queue_depth(queue) == 0


async def _still_works_without_worker(baton, executor) -> None:
    execution_id = uuid.uuid4()
    await baton.publish_raw(_request(action_ref="core.echo"), message_id=str(execution_id))
    row = await _recorded(baton, execution_id)
    assert row["status"] == "failed"  # parameters missing: but recorded, so intake is taking requests
    assert executor.process.poll() is None


# -- the fuzzer --------------------------------------------------------------------------------


def _shortstrs(prefix_names: list[str]) -> st.SearchStrategy:
    """Values for a short-string property: text, names that mean something, bytes that are not UTF-8."""
    text = st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255)
    return st.one_of(
        st.none(),
        st.just(""),
        text,
        st.uuids().map(str),
        st.text(alphabet="ab", min_size=255, max_size=255),
        st.sampled_from(prefix_names),
        st.binary(max_size=255).map(raw_shortstr),
    )


header_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(width=32),  # what pamqp writes a float as
    st.text(max_size=50),
    st.binary(max_size=50).map(bytearray),
    st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False),
    st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(9999, 1, 1)),
)
header_tables = st.recursive(
    header_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)


def _headers(names: list[str]) -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=20), header_tables, max_size=5),
        st.builds(lambda to: {"CC": to, "BCC": to}, st.lists(st.sampled_from(names), min_size=1, max_size=3)),
        st.just({"big": "h" * 100_000}),
        st.integers(1, 5000).map(nested_table),
        st.sampled_from([
            raw_table(b"\x02\xff\xfeS\x00\x00\x00\x01a"),  # a name that is not UTF-8
            raw_table(b"\x01kT" + struct.pack(">Q", 2**63 - 1)),  # a time past year 9999
            raw_table(b"\x01kS\x00\x00\x00\x02\xff\xfe"),  # a value that is not UTF-8
            raw_table(b"\x01kD\x05\xff\xff\xff\xff"),  # a decimal out of pamqp's range
        ]),
    )


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "action_ref": st.sampled_from(["core.noop", "core.echo", "core.sleep", "core.local", "nosuch.action", "bad ref"])
        | json_values,
        "parameters": st.dictionaries(st.sampled_from(["message", "seconds", "cmd", "x"]), json_values) | json_values,
        "idempotency_key": st.text(max_size=10) | st.text(min_size=490, max_size=3000) | json_values,
        "timeout_seconds": st.floats() | json_values,
        "surprise": json_values,
    },
)


def _deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + closer * depth


bodies = st.one_of(
    envelopes.map(lambda e: json.dumps(e).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 30_000).map(lambda n: _deep(n, b"[", b"]")),  # within the size limit: the parser's problem
    st.integers(1, 20_000).map(lambda n: b'{"action_ref": "core.echo", "parameters": {"message": ' + _deep(n, b"[", b"]") + b"}}"),
    st.just(_deep(100_000, b"[", b"]")),
    st.integers(MAX_REQUEST_BYTES - 50, 3 * MAX_REQUEST_BYTES).map(lambda n: _request(parameters={"message": "x" * n})),
    st.sampled_from([
        b'{"action_ref": "core.echo", "parameters": {"message": "nul\\u0000"}}',
        b'{"action_ref": "core.echo", "parameters": {"message": "\\ud800"}}',
        b'{"action_ref": "core.echo", "parameters": {"message": "ok"}, "idempotency_key": "k\\u0000"}',
        b'{"action_ref": "core.echo", "parameters": {"message": "ok"}, "idempotency_key": "\\udfff"}',
        b'{"action_ref": "core.sleep", "parameters": {"seconds": NaN}}',
        b'{"action_ref": "core.sleep", "parameters": {"seconds": 1e999}}',
        b'{"action_ref": "core.noop", "timeout_seconds": 1e-320}',
        b'{"action_ref": "core.noop", "parameters": {"n": 1' + b"0" * 5000 + b"}}",
        b"\xef\xbb\xbf{}",
        b"",
        # Batches: mixed entries, an entry that would be refused alone, and the empty one.
        b'[{"action_ref": "core.echo", "parameters": {"message": "ok"}}, 1, null, [], {"action_ref": 3}]',
        b'[{"action_ref": "core.echo", "parameters": {"message": "ok"}, "idempotency_key": "k\\u0000"}]',
        b"[]",
    ]),
)


@dataclass
class Fuzzing:
    baton: Any
    executor: Any
    publisher: Publisher
    loop: asyncio.AbstractEventLoop
    examples: int = 0
    failure: str | None = None

    def example(self, body: bytes, props: dict[str, Any], copies: int) -> None:
        """One example, run on the test's event loop. The first failure is kept (with what was
        sent) and the rest are skipped: a live executor cannot be shrunk against, since after a
        failure every example fails."""
        if self.failure is not None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._example(body, props, copies), self.loop).result(60)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            shown = {k: (bytes(v) if isinstance(v, Raw) else v) for k, v in props.items()}
            self.failure = (
                f"example {self.examples + 1} stopped intake: {type(exc).__name__}: {exc}\n"
                f"body ({len(body)} bytes): {body[:300]!r}\nproperties: {str(shown)[:2000]}\ncopies: {copies}\n"
                f"executor log:\n{self.executor.log_path.read_text()[-3000:]}"
            )

    async def _example(self, body: bytes, props: dict[str, Any], copies: int) -> None:
        for _ in range(copies):
            await self.publisher.publish(body, **props)
        # A probe behind it: once it is recorded, intake has taken in everything before it.
        probe = str(uuid.uuid4())
        await self.publisher.publish(_request(), message_id=probe)
        await _recorded(self.baton, probe, timeout_s=15)
        assert self.executor.process.poll() is None, "the executor exited"
        self.examples += 1
        if self.examples % 40 == 0:
            await _still_works(self.baton)


async def test_no_message_stops_intake(baton):
    executor, _ = await baton.started(
        baton.spawn_executor(BATON__MESSAGE_QUEUE__MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES)),
        baton.spawn_worker("w1"),
    )
    publisher = Publisher(baton.names)
    await publisher.open()
    names = [
        baton.names.requests_queue,
        baton.names.rejected_requests_queue,
        baton.names.worker_queue("w1"),
        baton.names.dead_letters_queue,
        "no-such-queue",
        "amq.rabbitmq.reply-to",
        "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMzM3NjM2Mg==.abc",
        amqp.REQUESTED_KEY,
    ]
    fuzzing = Fuzzing(baton, executor, publisher, asyncio.get_running_loop())
    properties = st.fixed_dictionaries(
        {},
        optional={
            "message_id": _shortstrs(names),
            "correlation_id": _shortstrs(names),
            "reply_to": _shortstrs(names),
            "headers": _headers(names),
            "content_type": _shortstrs(names),
            "content_encoding": _shortstrs(names),
            "message_type": _shortstrs(names),
            "app_id": _shortstrs(names),
            "priority": st.integers(0, 255),
            "delivery_mode": st.sampled_from([1, 2]),
            "expiration": st.sampled_from(["0", "1", "60000"]),
            "timestamp": st.one_of(
                st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(9999, 1, 1)),
                st.integers(0, 2**64 - 1).map(raw_timestamp),
            ),
        },
    )

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies, props=properties, copies=st.integers(1, 2))
    def one(body: bytes, props: dict[str, Any], copies: int) -> None:
        fuzzing.example(body, props, copies)

    started = time.monotonic()
    try:
        with raw_encoding():
            await asyncio.to_thread(one)  # Hypothesis runs in a thread; the examples, on this loop
        assert fuzzing.failure is None, fuzzing.failure
        await _still_works(baton)
        assert executor.process.poll() is None
        assert not executor.events("loop_died")
    finally:
        await publisher.close()
    print(f"fuzzed {fuzzing.examples} examples in {time.monotonic() - started:.1f} s")


# -- intake's pieces ---------------------------------------------------------------------------


def test_prefetch_is_bounded_by_bytes_and_by_batches():
    from common.settings import Settings
    from executor.intake import intake_prefetch

    def prefetch(batch: int, buffer: int, largest: int) -> int:
        return intake_prefetch(
            Settings(
                executor={"intake_batch_size": batch, "intake_buffer_bytes": buffer},
                message_queue={"max_request_bytes": largest},
            )
        )

    assert prefetch(500, 256 << 20, 1 << 20) == 256
    assert prefetch(50, 256 << 20, 1 << 20) == 100
    assert prefetch(500, 1 << 20, 4 << 20) == 1  # never nothing


def test_lenient_decoding_reads_what_pamqp_cannot():
    from pamqp import decode as amqp_decode

    from common import amqp_decoding

    amqp_decoding.install()
    amqp_decoding.install()  # idempotent
    assert amqp_decode.by_type(b"\x02\xff\xfe", "shortstr") == (3, "\ufffd\ufffd")
    assert amqp_decode.by_type(struct.pack(">Q", 2**64 - 1), "timestamp") == (8, None)
    consumed, table = amqp_decode.by_type(bytes(nested_table(10_000)), "table")
    assert consumed == len(nested_table(10_000))
    depth = 0
    while "a" in table:
        table, depth = table["a"], depth + 1
    assert depth < 40 and "x-baton-undecodable" in table
    assert amqp_decode.by_type(bytes(raw_table(b"\x02\xff\xfeS\x00\x00\x00\x01a")), "table")[1] == {"\ufffd\ufffd": "a"}
    assert amqp_decode.by_type(b"\x01a", "shortstr") == (2, "a")
    assert amqp_decode.by_type(bytes(raw_table(b"\x01kI\x00\x00\x00\x07")), "table")[1] == {"k": 7}
