"""The executor process: connects, migrates, declares topology, and supervises its loops.

Each loop is a module with ``run(ctx, stop_event)``. If one of them ends while the service is not
stopping, the service stops loudly (non-zero exit) rather than limp on with a part missing.
"""

from __future__ import annotations

import asyncio
import signal

import asyncpg
from aio_pika.abc import AbstractRobustConnection

from common import amqp, db, metrics
from common.best_effort import best_effort
from common.deadline import STOP_AFTERMATH_S, Allowance, wait_unwound
from common.errors import describe, loop_stopped
from common.logging import get_logger
from common.settings import Settings
from executor import (
    dead_letters,
    health,
    intake,
    maintenance,
    requested_timeout,
    retention,
    scheduler,
    schedules,
    sweeper,
    timeout_monitor,
    timers,
)
from executor.catalogue import Catalogue
from executor.context import ExecutorContext, Loop

log = get_logger("baton.executor")

class LoopDied(RuntimeError):
    pass


LOOPS: dict[str, Loop] = {
    "intake": intake.run,
    "scheduler": scheduler.run,
    "timeout_monitor": timeout_monitor.run,
    "requested_timeout": requested_timeout.run,
    "retention": retention.run,
    "maintenance": maintenance.run,
    "health": health.run,
    "sweeper": sweeper.run,
    "dead_letters": dead_letters.run,
    "timers": timers.run,
    "schedules": schedules.run,
}


async def serve(settings: Settings, stop_event: asyncio.Event) -> None:
    names = amqp.Names(settings.message_queue.prefix)
    wait_db_s, wait_mq_s = settings.database.startup_wait_s, settings.message_queue.startup_wait_s
    await db.ensure_database(settings.database.url, max_wait_s=wait_db_s)
    pool = await db.connect(settings.database.url, max_size=settings.database.pool_max_size, max_wait_s=wait_db_s)
    hot_pool: asyncpg.Pool | None = None
    connection: AbstractRobustConnection | None = None
    ctx: ExecutorContext | None = None
    try:
        await db.migrate(pool)
        hot_pool = await db.connect(settings.database.url, max_size=2, max_wait_s=wait_db_s, hot_path=True)
        connection = await amqp.connect(
            settings.message_queue.url, max_wait_s=wait_mq_s,
            reconnect_interval_s=settings.message_queue.reconnect_interval_s,
        )
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges, _ = await amqp.declare_executor_topology(
            publish_channel, names, rejected_max_length=settings.message_queue.rejected_requests_max_length,
            rejected_max_bytes=settings.message_queue.rejected_requests_max_bytes,
            queue_type=settings.message_queue.queue_type,
        )
        ctx = ExecutorContext(
            settings=settings,
            names=names,
            pool=pool,
            hot_pool=hot_pool,
            amqp=connection,
            publish_channel=publish_channel,
            exchanges=exchanges,
            catalogue=Catalogue(pool),
        )
        metrics.serve(settings.executor.metrics_port, settings.executor.metrics_host)
        log.info("executor_started", prefix=names.prefix)
        await supervise(ctx, LOOPS, stop_event)
    finally:
        # What follows the loops' deadline shares what is left of the stop's time (each close
        # bounded on its own if the executor stops before its loops ran).
        stopping = ctx.stopping if ctx is not None and ctx.stopping is not None else Allowance(STOP_AFTERMATH_S)
        if connection is not None:
            await best_effort("close_broker_connection", connection.close(), timeout_s=stopping.left_s())
        await asyncio.gather(
            db.close_pool(pool, timeout_s=stopping.left_s()),
            *([db.close_pool(hot_pool, timeout_s=stopping.left_s())] if hot_pool is not None else []),
        )
        log.info("executor_stopped")


async def supervise(ctx: ExecutorContext, loops: dict[str, Loop], stop_event: asyncio.Event) -> None:
    tasks: dict[asyncio.Task[object], str] = {
        asyncio.create_task(loop(ctx, stop_event), name=name): name for name, loop in loops.items()
    }
    stopper = asyncio.create_task(stop_event.wait())
    done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    # A loop that returns when told to stop (a disabled one waits for that) has not died.
    stopping = stopper in done
    died = [t for t in done if t is not stopper and (not stopping or t.exception() is not None)]
    stop_event.set()
    ctx.stopping = Allowance(ctx.settings.executor.shutdown_timeout_s + STOP_AFTERMATH_S)
    # Each loop finishes its pass and returns; one stuck on an outage (waiting for a connection
    # that does not come back) is cancelled after the deadline, so that the executor always stops.
    _, stuck = await asyncio.wait(tasks, timeout=ctx.settings.executor.shutdown_timeout_s)
    for task in stuck:
        log.warning("loop_cancelled", loop=tasks[task], after_s=ctx.settings.executor.shutdown_timeout_s)
        task.cancel()
    # Bounded too: a loop whose query the network swallowed unwinds only once asyncpg's cancel
    # request gets through (a minute). What is left behind, the process's runner gives one more
    # bound once the pool is closed or terminated (`cli.app.run_on_uvloop`).
    # (One that died is reported below.)
    await wait_unwound(set(tasks) - set(died), log, "loops", timeout_s=ctx.stopping.left_s())
    stopper.cancel()
    for task in died:
        exc = task.exception()
        log.error("loop_died", loop=tasks[task], error=describe(exc) if exc else "returned", exc_info=exc)
    if died:
        first = died[0].exception()
        stopped = loop_stopped("executor", tasks[died[0]], first, aftermath="the executor stopped with it")
        raise LoopDied(stopped) from first


def install_signal_handlers(stop_event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)


async def main(settings: Settings) -> None:
    stop_event = asyncio.Event()
    install_signal_handlers(stop_event)
    await serve(settings, stop_event)
