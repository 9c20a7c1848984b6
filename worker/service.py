"""The worker process: registers, heartbeats, claims dispatches from its own queue, runs them.

A dispatch stays unacked only until its fenced claim (`scheduled` -> `running`) commits; from then
on PostgreSQL owns the execution. The worker claims only when it has a free slot, so what it holds
unacked is exactly what it has received but not started, which is what a drain hands back.

This module is the process's lifecycle: start, the three loops, and the stop in its order. The
parts it runs share one `WorkerState`: `claiming` (inbox, claim loop, fenced claim), `recording`
(running an assignment, recording its outcome or interruption), `liveness` (session lock,
registration, heartbeat, audit, standing down and resuming).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
import socket
from typing import Any

import aiormq.exceptions

from common import amqp, db, health, metrics
from common.actions import CORE_PREFIX, ActionSpec, registration_conflict
from common.best_effort import best_effort
from common.deadline import STOP_AFTERMATH_S, STOP_STEP_TIMEOUT_S, Allowance, wait_unwound
from common.errors import describe, loop_stopped
from common.queries import actions as aq
from common.queries import workers as wq
from common.settings import Settings
from worker import builtins, claiming, liveness, pool_watch, recording, threads
from worker.liveness import WorkerNameInUse
from worker.registry import registered
from worker.shell import ShellLimits
from worker.state import WorkerState

# What `cli` (and anyone starting a worker) imports from here; `WorkerNameInUse` is raised by
# registration, in `liveness`.
__all__ = ["CatalogueConflict", "WorkerNameInUse", "WorkerService", "default_name", "load_action_modules"]


#: Kept for the last status mark by the steps of a stop before it (`Allowance`): when they use up
#: the rest, the row still says the worker is gone rather than leaving the executor to find out.
LAST_MARK_S = 2.0


def _went_through(mark: asyncio.Future[bool], state: WorkerState) -> bool:
    """Whether a status mark that ended went through (one that failed unexpectedly is logged)."""
    if mark.cancelled():
        return False
    if (exc := mark.exception()) is not None:
        state.log.warning("mark_worker_inactive_failed", error=describe(exc), exc_info=exc)
        return False
    return mark.result()


class CatalogueConflict(RuntimeError):
    """An action this worker serves conflicts with the catalogue's entry for it."""


def default_name() -> str:
    """Unique per host (and so per container): a second process on the same host gets another pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def load_action_modules(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise RuntimeError(f"cannot import action module {module!r} (worker.action_modules): {exc}") from exc


class WorkerService:
    def __init__(self, settings: Settings, name: str) -> None:
        cfg = settings.worker
        load_action_modules(cfg.action_modules)
        builtins.configure_shell(
            ShellLimits(
                max_output_bytes=cfg.max_output_bytes,
                kill_grace_s=cfg.kill_grace_s,
                env_passthrough=tuple(cfg.shell_env_passthrough),
                secrets_dir=cfg.secrets_dir,
            )
        )
        actions = {ref: a for ref, a in registered().items() if a.spec.runtime in cfg.runtimes}
        self.state = WorkerState(settings, name, actions)
        #: What is left of the stop's time (the drain's deadline and `STOP_AFTERMATH_S`), once one began.
        self._stop: Allowance | None = None

    async def run(self, stop_event: asyncio.Event) -> None:
        state = self.state
        # Migrating here too (idempotent, under a lock) lets a worker start before the executor.
        wait_db_s = state.settings.database.startup_wait_s
        await db.ensure_database(state.settings.database.url, max_wait_s=wait_db_s)
        state.pool = await db.connect(state.settings.database.url, max_size=4, max_wait_s=wait_db_s)
        await db.migrate(state.pool)
        state.hot_pool = await db.connect(state.settings.database.url, max_size=2, max_wait_s=wait_db_s, hot_path=True)
        mq = state.settings.message_queue
        state.connection = await amqp.connect(
            mq.url, max_wait_s=mq.startup_wait_s, reconnect_interval_s=mq.reconnect_interval_s
        )
        try:
            await self._start()
            loops = {
                asyncio.create_task(liveness.heartbeat_loop(state), name="heartbeat"),
                asyncio.create_task(claiming.claim_loop(state), name="claimer"),
                asyncio.create_task(recording.finish_loop(state), name="finisher"),
            }
            stopper = asyncio.create_task(stop_event.wait())
            done, _ = await asyncio.wait({stopper, *loops}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopper}:
                exc = task.exception()
                state.log.error(
                    "loop_died", loop=task.get_name(), error=describe(exc) if exc else "returned", exc_info=exc
                )
            await self._drain(loops)
            await best_effort(
                "delete_worker_queue", self._delete_queue_if_empty(), timeout_s=self._left_s(), worker=state.name
            )
            for task in done - {stopper}:
                first = task.exception()
                stopped = loop_stopped(
                    "worker", task.get_name(), first, aftermath="the worker drained and stopped with it"
                )
                raise RuntimeError(stopped) from first
        finally:
            for hand_back in state.hand_backs:
                hand_back.cancel()
            await best_effort(
                "close_broker_connection", state.connection.close(), timeout_s=self._left_s(), worker=state.name
            )
            if state.lock_conn is not None:
                # (A close that fails aborts the connection; one that does not end in time drops it.)
                await best_effort(
                    "close_name_lock_connection",
                    db.close_connection(state.lock_conn, timeout_s=self._left_s()),
                    worker=state.name,
                )
            await asyncio.gather(
                db.close_pool(state.pool, timeout_s=self._left_s(), worker=state.name),
                db.close_pool(state.hot_pool, timeout_s=self._left_s(), worker=state.name),
            )
            health.remove(state.cfg.health_file)
            state.log.info("worker_stopped")

    async def _register_actions(self) -> None:
        """Enter this worker's actions in the catalogue, or refuse to start if one conflicts with
        what is registered there (see `registration_conflict`). `core.*` is the executor's own."""
        state = self.state
        specs = [a.spec for a in state.actions.values() if not a.spec.ref.startswith(CORE_PREFIX)]
        existing = {
            r["ref"]: ActionSpec(**dict(r)) for r in await state.pool.fetch(aq.GET_MANY, [s.ref for s in specs])
        }
        conflicts = [c for s in specs if (c := registration_conflict(existing.get(s.ref), s)) is not None]
        if conflicts:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise CatalogueConflict(f"cannot register its actions: {conflicts[0]}{more}")
        await state.pool.execute(
            aq.UPSERT,
            [s.ref for s in specs],
            [s.runtime for s in specs],
            [json.dumps(s.parameters_schema) for s in specs],
            [s.timeout_s for s in specs],
            [s.description for s in specs],
            [s.durable for s in specs],
            [s.recover_on_worker_loss for s in specs],
            [s.max_recovery_attempts for s in specs],
            [s.version for s in specs],
            [s.retries for s in specs],
            [s.retry_delay_s for s in specs],
            [s.retry_backoff for s in specs],
            [s.max_concurrency for s in specs],
        )

    async def _start(self) -> None:
        state = self.state
        cfg = state.cfg
        await self._register_actions()
        state.consume_channel = await state.connection.channel()
        await state.consume_channel.set_qos(prefetch_count=cfg.max_concurrent_tasks)
        # Notifications are announcements of state already in PostgreSQL (waiters re-read it), so
        # they go without publisher confirms: a confirm per outcome costs more than the action.
        state.publish_channel = await state.connection.channel(publisher_confirms=False)
        state.exchanges = await amqp.declare_exchanges(state.publish_channel, state.names)
        # The queue exists before the worker is offered work, so no dispatch is ever unroutable.
        state.queue = await amqp.declare_worker_queue(
            state.consume_channel, state.names, state.name, queue_ttl_ms=cfg.queue_ttl_ms,
            queue_type=state.settings.message_queue.queue_type,
        )
        await liveness.lock(state)
        await liveness.register(state)
        metrics.serve(cfg.metrics_port, cfg.metrics_host)
        if claiming.dispatches_may_be_lost(state):
            # What a process before this one under the name was dispatched, a broker restart since
            # may have dropped; and so may one while this process runs.
            await claiming.hand_back_unclaimed(state, "a worker started under this name")
            state.connection.reconnect_callbacks.add(functools.partial(claiming.on_reconnected, state))
        state.consumer_tag = await state.queue.consume(functools.partial(claiming.on_message, state))
        state.log.info(
            "worker_registered",
            queue=state.queue.name,
            runtimes=list(cfg.runtimes),
            actions=sorted(state.actions),
            concurrency=cfg.max_concurrent_tasks,
        )

    async def _delete_queue_if_empty(self) -> None:
        """A cleanly stopped worker leaves no empty queue behind; one still holding dispatches is
        kept (its TTL dead-letters them) and removed later by the executor's retention."""
        state = self.state
        channel = await state.connection.channel()
        try:
            reason = await amqp.delete_queue_if_idle(
                channel,
                state.queue.name,
                bindings=[(state.names.dispatch_exchange, state.names.worker_routing_key(state.name))],
            )
        except aiormq.exceptions.AMQPError as exc:
            reason = describe(exc)
        finally:
            if not channel.is_closed:
                await channel.close()
        if reason is None:
            state.log.info("worker_queue_deleted", queue=state.queue.name)
        else:
            state.log.info("worker_queue_kept", queue=state.queue.name, reason=reason)

    async def _drain(self, loops: set[asyncio.Task[Any]]) -> None:
        """DESIGN section 5: draining, consumer cancelled, unstarted handed back, in-flight finished
        (or interrupted past the deadline), then inactive."""
        state = self.state
        deadline_s = asyncio.get_running_loop().time() + state.cfg.shutdown_timeout_s
        self._stop = Allowance(state.cfg.shutdown_timeout_s + STOP_AFTERMATH_S)
        runs_left_behind = False
        state.draining = True
        state.mail.set()
        state.log.info("worker_draining", in_flight=len(state.running), unstarted=len(state.inbox))
        async with state.pools_transition:  # after a change `pool_watch` has under way, never before it
            await self._mark("draining")
        await best_effort(
            "cancel_dispatch_consumer", state.queue.cancel(state.consumer_tag), timeout_s=self._left_s(), worker=state.name
        )
        state.resumed.set()
        claimer = next((t for t in loops if t.get_name() == "claimer"), None)
        if claimer is not None:
            # Waiting for a slot can last as long as the longest run: stop waiting. A claim under
            # way is let finish, so that what it claimed is started and tracked, but not past the
            # drain's deadline (the database away, it would wait as long as `until_available`).
            if not state.claiming:
                claimer.cancel()
            # Waited for, not awaited: how it ended is collected with the other loops' below.
            try:
                left_s = deadline_s - asyncio.get_running_loop().time()
                if not (await asyncio.wait({claimer}, timeout=max(left_s, 0)))[0]:
                    state.abandon_claim.set()  # the claim loop hands its batch back at once
                    await asyncio.wait({claimer})
                    state.log.warning("drain_claim_abandoned", dispatches=len(state.abandoned))
            except asyncio.CancelledError:
                for task in loops:  # this drain itself was cancelled: its loops go with it
                    task.cancel()
                raise
        await claiming.hand_back(state)
        await claiming.unclaim_abandoned(state)
        try:
            if not state.idle.is_set():  # (with no time left, wait_for times out even on a set event)
                await asyncio.wait_for(state.idle.wait(), max(deadline_s - asyncio.get_running_loop().time(), 0))
        except TimeoutError:
            state.log.warning("drain_deadline_passed", interrupting=len(state.running))
            for task in list(state.running.values()):
                task.cancel()
            # Each records its interruption within its own bound (`recording.INTERRUPT_TIMEOUT_S`).
            if await wait_unwound(set(state.running.values()), state.log, "runs", timeout_s=self._left_s(reserve_s=LAST_MARK_S)):
                # Something still runs: `inactive` would tell the executor nothing does. Left
                # `draining`, the worker is declared lost once its heartbeat stops, as a dead one is.
                runs_left_behind = True
        # Bounded: if the recorder itself died, what it did not record is recovered by the executor.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.outcomes.join(), self._left_s(state.cfg.shutdown_timeout_s, reserve_s=LAST_MARK_S))
        checks = state.heartbeat_checks
        for task in (*loops, *([checks] if checks is not None else [])):
            task.cancel()
        # (One that died is reported already.)
        await wait_unwound(
            {t for t in (*loops, checks) if t is not None and not t.done()}, state.log, "loops",
            timeout_s=self._left_s(reserve_s=LAST_MARK_S),
        )
        if state.heartbeat_checks is not None:  # (a round the heartbeat loop started as it was cancelled)
            state.heartbeat_checks.cancel()
        if threads.in_flight():  # a synchronous action goes on after its run's cancel
            state.log.warning("tasks_left_behind", kind="sync_actions", count=threads.in_flight())
            runs_left_behind = True
        if runs_left_behind:
            return
        if await self._mark_inactive(self._left_s()):
            state.log.info("worker_inactive")

    def _left_s(self, cap_s: float = STOP_STEP_TIMEOUT_S, *, reserve_s: float = 0.0) -> float:
        """What the next step of the stop may take (`Allowance`; the steps' own bound if the stop
        began before a drain)."""
        if self._stop is None:
            self._stop = Allowance(STOP_AFTERMATH_S)
        return self._stop.left_s(cap_s, reserve_s=reserve_s)

    async def _mark(self, status: str, timeout_s: float = STOP_STEP_TIMEOUT_S) -> bool:
        """Record this process's status while it stops, if the database answers in time."""
        state = self.state
        mark = state.pool.fetch(wq.SET_STATUS, state.name, state.incarnation, status)
        return await best_effort(f"mark_worker_{status}", mark, timeout_s=timeout_s, worker=state.name)

    async def _mark_inactive(self, timeout_s: float) -> bool:
        """The last mark, through the pool and through the lock connection at once (the loops that
        share it have stopped by now): either may be what does not answer. Through the pool alone,
        it failed while only the pools were cut off (`pool_watch`), which left the row `draining`
        and the worker, once gone, declared lost; one after the other, they took twice as long
        when neither answered. Whether either went through."""
        state = self.state
        pending = {
            asyncio.ensure_future(self._mark("inactive", timeout_s)),
            asyncio.ensure_future(
                pool_watch.mark_through_lock(
                    state, wq.SET_STATUS, "inactive", timeout_s=timeout_s, what="mark_worker_inactive_through_lock"
                )
            ),
        }
        marked = False
        try:
            while pending and not marked:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                marked = any([_went_through(task, state) for task in done])  # (each one read)
            if pending:
                # The other most likely waits for the row the first one updated: let it end rather
                # than cancel a statement in flight (a cancel request, and a line in PostgreSQL's log).
                done, pending = await asyncio.wait(pending, timeout=LAST_MARK_S / 4)
                for task in done:
                    _went_through(task, state)
            return marked
        finally:
            for task in pending:  # (each bounded, and abandoned past its bound: `within`)
                task.cancel()
