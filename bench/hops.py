"""The pieces of one request's path from post to start, each timed alone on an idle machine.

Post -> start crosses the broker twice (client -> executor, executor -> worker) and commits three
statements on the way (recorded, scheduled, claimed). This times, one at a time with a pause
between samples so that nothing queues:

- a broker hop: publish a persistent message to a durable queue, and its consumer's callback
  runs (aio-pika, which Baton uses, both ends in this process; and py-amqp, Celery's client, if
  the `bench` extra is installed);
- a PostgreSQL round trip (`SELECT 1`) and a committed one-row insert.

    .venv/bin/python bench/hops.py --samples 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import pct

PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: Between samples, so that each one finds every process idle.
PAUSE_S = 0.01


def p50_p99(samples_s: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * pct(samples_s, 50), 3), "p99_ms": round(1000 * pct(samples_s, 99), 3)}


async def aio_pika_hop(url: str, samples: int) -> list[float]:
    queue_name = f"bench_hop_{uuid.uuid4().hex[:8]}"
    publisher = await aio_pika.connect(url)
    consumer = await aio_pika.connect(url)
    try:
        out = await publisher.channel(publisher_confirms=True)
        inbox = await consumer.channel()
        queue = await inbox.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "classic"})
        took: list[float] = []
        arrived = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            took.append(time.perf_counter() - float(message.body))
            await message.ack()
            arrived.set()

        tag = await queue.consume(on_message)
        for _ in range(samples):
            arrived.clear()
            body = str(time.perf_counter()).encode()
            await out.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue_name
            )
            await asyncio.wait_for(arrived.wait(), 10)
            await asyncio.sleep(PAUSE_S)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return took
    finally:
        await consumer.close()
        await publisher.close()


def py_amqp_hop(url: str, samples: int) -> list[float] | None:
    try:
        import amqp  # py-amqp: Celery's client, from the `bench` extra
    except ImportError:
        return None
    host = url.split("@", 1)[-1].split("/", 1)[0]
    queue_name = f"bench_hop_{uuid.uuid4().hex[:8]}"
    publisher, consumer = amqp.Connection(host), amqp.Connection(host)
    publisher.connect()
    consumer.connect()
    try:
        out, inbox = publisher.channel(), consumer.channel()
        inbox.queue_declare(queue_name, durable=True, auto_delete=False)
        took: list[float] = []

        def on_message(message: amqp.Message) -> None:
            took.append(time.perf_counter() - float(message.body))
            inbox.basic_ack(message.delivery_tag)

        tag = inbox.basic_consume(queue_name, callback=on_message)
        for _ in range(samples):
            out.basic_publish(amqp.Message(str(time.perf_counter()), delivery_mode=2), routing_key=queue_name)
            consumer.drain_events(timeout=10)
            time.sleep(PAUSE_S)
        inbox.basic_cancel(tag)
        inbox.queue_delete(queue_name)
        return took
    finally:
        consumer.close()
        publisher.close()


async def timed(call: Callable[[], Awaitable[object]], samples: int) -> list[float]:
    took = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)
        await asyncio.sleep(PAUSE_S)
    return took


async def postgres_steps(url: str, samples: int) -> dict[str, list[float]]:
    connection = await asyncpg.connect(url)
    table = f"bench_hop_{uuid.uuid4().hex[:8]}"
    try:
        await connection.execute(f"CREATE TABLE {table} (id uuid PRIMARY KEY, at timestamptz NOT NULL)")
        return {
            "postgres_round_trip": await timed(lambda: connection.fetchval("SELECT 1"), samples),
            "postgres_committed_insert": await timed(
                lambda: connection.execute(f"INSERT INTO {table} VALUES ($1, now())", uuid.uuid4()), samples
            ),
        }
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--database-url", default=PG_URL)
    parser.add_argument("--amqp-url", default=AMQP_URL)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    results["broker_hop_aio_pika"] = p50_p99(await aio_pika_hop(args.amqp_url, args.samples))
    sync_hop = await asyncio.to_thread(py_amqp_hop, args.amqp_url, args.samples)
    if sync_hop is not None:
        results["broker_hop_py_amqp"] = p50_p99(sync_hop)
    for name, took in (await postgres_steps(args.database_url, args.samples)).items():
        results[name] = p50_p99(took)
    print(f"{'step':28} {'p50':>9} {'p99':>9}   ({args.samples} samples each, one at a time)")
    for name, figures in results.items():
        print(f"{name:28} {figures['p50_ms']:>6.3f} ms {figures['p99_ms']:>6.3f} ms")
    print(json.dumps({"samples": args.samples, **results}))


if __name__ == "__main__":
    asyncio.run(main())
