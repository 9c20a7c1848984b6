"""The worker process: registers, heartbeats, claims dispatches from its own queue, runs them.

A dispatch stays unacked only until its fenced claim (`scheduled` -> `running`) commits; from then
on PostgreSQL owns the execution. The worker claims only when it has a free slot, so what it holds
unacked is exactly what it has received but not started, which is what a drain hands back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import secrets
import socket
import time
import uuid
from collections import deque
from typing import Any

import aiormq.exceptions
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common import amqp, db, health, metrics
from common.actions import CORE_PREFIX, ActionSpec, registration_conflict
from common.logging import get_logger
from common.notifications import publish_terminal
from common.queries import actions as aq
from common.queries import executions as q
from common.queries import workers as wq
from common.recovery import InterruptReason, interrupted_event, resolve_policy
from common.schemas import Assignment, Dispatch
from common.settings import Settings
from worker import builtins
from worker.registry import RegisteredAction, registered
from worker.runner import Outcome, execute
from worker.shell import ShellLimits

log = get_logger("baton.worker")


class WorkerNameInUse(RuntimeError):
    """Another live process holds this worker name."""


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
        self.settings = settings
        self.cfg = settings.worker
        self.name = name
        self.names = amqp.Names(settings.message_queue.prefix)
        self.incarnation = uuid.uuid4()
        load_action_modules(self.cfg.action_modules)
        builtins.configure_shell(
            ShellLimits(
                max_output_bytes=self.cfg.max_output_bytes,
                kill_grace_s=self.cfg.kill_grace_s,
                env_passthrough=tuple(self.cfg.shell_env_passthrough),
                secrets_dir=self.cfg.secrets_dir,
            )
        )
        self.actions: dict[str, RegisteredAction] = {
            ref: a for ref, a in registered().items() if a.spec.runtime in self.cfg.runtimes
        }
        self.log = log.bind(worker=name)
        self.inbox: deque[AbstractIncomingMessage] = deque()
        self.mail = asyncio.Event()
        self.slots = asyncio.Semaphore(self.cfg.max_concurrent_tasks)
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.idle = asyncio.Event()
        self.idle.set()
        self.outcomes: asyncio.Queue[tuple[Assignment, Outcome]] = asyncio.Queue()
        self.draining = False
        self.claiming = False
        # Standing down: the database cannot be reached, or the executor declared this worker lost;
        # it takes no work until it has registered again.
        self.stood_down = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.cancel_reason: tuple[InterruptReason, str] = ("signal", "the worker stopped past its drain deadline")
        # PostgreSQL releases this session lock the moment the process dies: the sweeper's signal.
        self.lock_key = secrets.randbits(62)
        self.lock_conn: asyncpg.Connection | None = None
        self.lock_lost = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop_event: asyncio.Event) -> None:
        # Migrating here too (idempotent, under a lock) lets a worker start before the executor.
        await db.ensure_database(self.settings.database.url)
        self.pool = await db.connect(self.settings.database.url, max_size=4)
        await db.migrate(self.pool)
        self.connection = await amqp.connect(self.settings.message_queue.url)
        try:
            await self._start()
            loops = {
                asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                asyncio.create_task(self._claim_loop(), name="claimer"),
                asyncio.create_task(self._finish_loop(), name="finisher"),
            }
            stopper = asyncio.create_task(stop_event.wait())
            done, _ = await asyncio.wait({stopper, *loops}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopper}:
                self.log.error("loop_died", loop=task.get_name(), error=repr(task.exception()))
            await self._drain(loops)
            await self._delete_queue_if_empty()
            for task in done - {stopper}:
                raise RuntimeError(f"worker loop {task.get_name()!r} stopped unexpectedly") from task.exception()
        finally:
            with contextlib.suppress(Exception):
                await self.connection.close()
            if self.lock_conn is not None:
                with contextlib.suppress(Exception):
                    await self.lock_conn.close()
            await self.pool.close()
            health.remove(self.cfg.health_file)
            self.log.info("worker_stopped")

    async def _register_actions(self) -> None:
        """Enter this worker's actions in the catalogue, or refuse to start if one conflicts with
        what is registered there (see `registration_conflict`). `core.*` is the executor's own."""
        specs = [a.spec for a in self.actions.values() if not a.spec.ref.startswith(CORE_PREFIX)]
        existing = {
            r["ref"]: ActionSpec(**dict(r)) for r in await self.pool.fetch(aq.GET_MANY, [s.ref for s in specs])
        }
        conflicts = [c for s in specs if (c := registration_conflict(existing.get(s.ref), s)) is not None]
        if conflicts:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise CatalogueConflict(f"cannot register its actions: {conflicts[0]}{more}")
        await self.pool.execute(
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
        )

    async def _start(self) -> None:
        cfg = self.cfg
        await self._register_actions()
        self.consume_channel = await self.connection.channel()
        await self.consume_channel.set_qos(prefetch_count=cfg.max_concurrent_tasks)
        # Notifications are announcements of state already in PostgreSQL (waiters re-read it), so
        # they go without publisher confirms: a confirm per outcome costs more than the action.
        self.publish_channel = await self.connection.channel(publisher_confirms=False)
        self.exchanges = await amqp.declare_exchanges(self.publish_channel, self.names)
        # The queue exists before the worker is offered work, so no dispatch is ever unroutable.
        self.queue = await amqp.declare_worker_queue(
            self.consume_channel, self.names, self.name, queue_ttl_ms=cfg.queue_ttl_ms,
            queue_type=self.settings.message_queue.queue_type,
        )
        await self._lock()
        await self._register()
        metrics.serve(cfg.metrics_port, cfg.metrics_host)
        self.consumer_tag = await self.queue.consume(self._on_message)
        self.log.info(
            "worker_registered",
            queue=self.queue.name,
            runtimes=list(cfg.runtimes),
            actions=sorted(self.actions),
            concurrency=cfg.max_concurrent_tasks,
        )

    async def _lock(self) -> None:
        """(Re)open the lock connection and take the session lock on it."""
        if self.lock_conn is not None and not self.lock_conn.is_closed():
            return
        timeout_s = max(self.cfg.heartbeat_interval_s, 1.0)
        conn = await asyncpg.connect(self.settings.database.url, timeout=timeout_s, server_settings=db.SERVER_SETTINGS)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", self.lock_key, timeout=timeout_s)
        except BaseException:
            await conn.close()
            raise
        # Without its lock this process looks dead to the sweeper: take it again at once, not at
        # the next heartbeat.
        conn.add_termination_listener(lambda _conn: self.lock_lost.set())
        self.lock_lost.clear()
        self.lock_conn = conn

    async def _register(self) -> None:
        """Mark this process the worker's live incarnation. What the row says is `running` here but
        this process does not run (a predecessor that died, or work given up while the database
        was away) is interrupted first, so that recovery takes it over."""
        cfg = self.cfg
        async with self.pool.acquire() as conn, conn.transaction():
            previous = await conn.fetchrow(wq.PREVIOUS, self.name, self.incarnation)
            if previous is not None and previous["held"]:
                raise WorkerNameInUse(
                    f"worker name {self.name!r} is held by a live process (host {previous['hostname']}, "
                    f"pid {previous['pid']}): stop that process, or start this one under another --name"
                )
            for row in await conn.fetch(q.SELECT_RUNNING_ON, self.name):
                if row["id"] not in self.running:
                    await self._interrupt_orphan(conn, row, "the worker restarted or lost contact while running it")
            await conn.fetch(
                wq.REGISTER,
                self.name,
                list(cfg.runtimes),
                sorted(self.actions),
                cfg.max_concurrent_tasks,
                cfg.heartbeat_interval_s,
                socket.gethostname(),
                os.getpid(),
                self.incarnation,
                self.lock_key,
            )

    async def _audit(self, *, grace_s: float) -> None:
        """Interrupt what the database says runs here but does not (another process under this
        name claimed it and died, say): nothing stays `running` with nobody running it."""
        if self.claiming:  # a claim committed but not yet a task here would look orphaned
            return
        with contextlib.suppress(OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            rows = await self.pool.fetch(q.SELECT_RUNNING_SINCE, self.name, grace_s, timeout=grace_s)
            for row in rows:
                if row["id"] not in self.running and not self.claiming:
                    await self._interrupt_orphan(
                        self.pool, row, "recorded as running on this worker, which is not running it"
                    )

    async def _interrupt_orphan(self, conn: db.Executor, row: asyncpg.Record, error: str) -> None:
        """A run recorded as `running` here that this process does not run: hand it to recovery."""
        action = self.actions.get(row["action_ref"])
        event = interrupted_event(
            reason="worker_lost",
            worker=self.name,
            error=error,
            policy=resolve_policy(action.spec if action else None, self.settings.recovery),
            recovery_attempts=row["recovery_attempts"],
        )
        # Any incarnation's: a predecessor's runs, or runs this process gave up while away.
        if await conn.fetchrow(q.INTERRUPT, row["id"], row["attempt"], self.name, event, None):
            self.log.warning(
                "execution_interrupted", execution_id=str(row["id"]), attempt=row["attempt"], reason="worker_lost"
            )

    async def _stand_down(self, why: str) -> None:
        """Stop taking work and give up what runs here: it is about to be recovered elsewhere."""
        if self.stood_down:
            return
        self.stood_down = True
        self.resumed.clear()
        self.log.warning("worker_standing_down", reason=why, cancelling=len(self.running), handing_back=len(self.inbox))
        await self._hand_back()
        self.cancel_reason = ("worker_lost", f"the worker stood down: {why}")
        for task in list(self.running.values()):
            task.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _resume(self) -> None:
        await self._register()
        self.stood_down = False
        self.cancel_reason = ("signal", "the worker stopped past its drain deadline")
        self.resumed.set()
        self.mail.set()
        self.log.info("worker_reregistered")

    async def _hand_back(self) -> int:
        handed_back = 0
        while self.inbox:
            message = self.inbox.popleft()
            with contextlib.suppress(Exception):
                # Dead-lettered at once; the executor reschedules it on another worker.
                await message.reject(requeue=False)
                handed_back += 1
        if handed_back:
            self.log.info("dispatches_handed_back", count=handed_back)
        return handed_back

    async def _delete_queue_if_empty(self) -> None:
        """A cleanly stopped worker leaves no empty queue behind; one still holding dispatches is
        kept (its TTL dead-letters them) and removed later by the executor's retention."""
        channel = await self.connection.channel()
        try:
            reason = await amqp.delete_queue_if_idle(
                channel,
                self.queue.name,
                bindings=[(self.names.dispatch_exchange, self.names.worker_routing_key(self.name))],
            )
        except aiormq.exceptions.AMQPError as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            if not channel.is_closed:
                await channel.close()
        if reason is None:
            self.log.info("worker_queue_deleted", queue=self.queue.name)
        else:
            self.log.info("worker_queue_kept", queue=self.queue.name, reason=reason)

    async def _drain(self, loops: set[asyncio.Task[Any]]) -> None:
        """DESIGN section 5: draining, consumer cancelled, unstarted handed back, in-flight finished
        (or interrupted past the deadline), then inactive."""
        self.draining = True
        self.mail.set()
        self.log.info("worker_draining", in_flight=len(self.running), unstarted=len(self.inbox))
        with contextlib.suppress(Exception):
            await self.pool.fetch(wq.SET_STATUS, self.name, self.incarnation, "draining")
        with contextlib.suppress(Exception):
            await self.queue.cancel(self.consumer_tag)
        self.resumed.set()
        claimer = next((t for t in loops if t.get_name() == "claimer"), None)
        if claimer is not None:
            # Waiting for a slot can last as long as the longest run: stop waiting. A claim under
            # way is let finish, so that what it claimed is started and tracked.
            if not self.claiming:
                claimer.cancel()
            with contextlib.suppress(BaseException):
                await claimer
        await self._hand_back()
        try:
            await asyncio.wait_for(self.idle.wait(), self.cfg.shutdown_timeout_s)
        except TimeoutError:
            self.log.warning("drain_deadline_passed", interrupting=len(self.running))
            for task in list(self.running.values()):
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)
        # Bounded: if the recorder itself died, what it did not record is recovered by the executor.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.outcomes.join(), self.cfg.shutdown_timeout_s)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.pool.fetch(wq.SET_STATUS, self.name, self.incarnation, "inactive")
        self.log.info("worker_inactive")

    # -- receiving and claiming -------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self.draining or self.stood_down:
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)
            return
        self.inbox.append(message)
        self.mail.set()

    async def _claim_loop(self) -> None:
        while not self.draining:
            await self.resumed.wait()
            await self.slots.acquire()
            while not self.inbox and not self.draining:
                self.mail.clear()
                await self.mail.wait()
            if self.draining or self.stood_down:
                self.slots.release()
                continue
            self.claiming = True
            try:
                batch = [self.inbox.popleft()]
                while self.inbox and not self.slots.locked():
                    await self.slots.acquire()  # free: returns at once
                    batch.append(self.inbox.popleft())
                await self._claim(batch)
            finally:
                self.claiming = False

    async def _claim(self, batch: list[AbstractIncomingMessage]) -> None:
        dispatches: dict[uuid.UUID, Dispatch] = {}
        for message in batch:
            try:
                dispatch = Dispatch.model_validate_json(message.body)
            except ValidationError as exc:
                self.log.error("dispatch_invalid", error=str(exc), message_id=message.message_id)
                with contextlib.suppress(Exception):  # a dead channel redelivers it; it is rejected again
                    await message.reject(requeue=False)
                continue
            twin = dispatches.get(dispatch.execution_id)
            if twin is not None or dispatch.execution_id in self.running:
                # A redelivery, or an older attempt beside a newer one: only the newest can match.
                stale = dispatch if twin is None or twin.attempt >= dispatch.attempt else twin
                self.log.info("dispatch_stale", execution_id=str(stale.execution_id), attempt=stale.attempt, twin=True)
                if stale is dispatch:
                    continue
            dispatches[dispatch.execution_id] = dispatch
        ordered = sorted(dispatches.values(), key=lambda d: d.execution_id)  # one lock order: no deadlocks
        rows = await db.until_available(
            lambda: self.pool.fetch(
                q.CLAIM, [d.execution_id for d in ordered], [d.attempt for d in ordered], self.name, self.incarnation
            ),
            what="claim",
        )
        # What runs is what PostgreSQL recorded, never what the message says.
        claimed = {
            r["id"]: Assignment(
                execution_id=r["id"], attempt=r["attempt"], action_ref=r["action_ref"],
                parameters=r["parameters"], timeout_s=r["timeout_s"],
            )
            for r in rows
        }
        await amqp.ack_all(batch)
        for execution_id, dispatch in dispatches.items():
            fields = {"execution_id": str(execution_id), "attempt": dispatch.attempt}
            assignment = claimed.get(execution_id)
            if assignment is not None and execution_id not in self.running:
                self.log.info("execution_started", action_ref=assignment.action_ref, **fields)
                self.idle.clear()
                self.running[execution_id] = asyncio.create_task(self._run_one(assignment))
            else:
                self.log.info("dispatch_stale", **fields)
        for _ in range(len(batch) - len(claimed)):
            self.slots.release()

    # -- running and recording --------------------------------------------------------------

    async def _run_one(self, dispatch: Assignment) -> None:
        try:
            outcome = await execute(
                self.actions.get(dispatch.action_ref),
                dispatch,
                default_timeout_s=self.cfg.task_timeout_s,
                max_output_bytes=self.cfg.max_output_bytes,
                max_timeout_s=self.cfg.max_task_timeout_s,
            )
        except asyncio.CancelledError:
            reason, error = self.cancel_reason
            await self._interrupt(dispatch, reason=reason, error=error)
            self._release(dispatch.execution_id)
            raise
        await self.outcomes.put((dispatch, outcome))

    async def _interrupt(self, dispatch: Assignment, *, reason: InterruptReason, error: str) -> None:
        """Fenced: only if the run is still this worker's at this attempt. If the database cannot be
        reached, the executor interrupts it instead once this worker is declared lost."""
        action = self.actions.get(dispatch.action_ref)
        policy = resolve_policy(action.spec if action else None, self.settings.recovery)
        with contextlib.suppress(Exception):
            recovery_attempts = await self.pool.fetchval(q.RECOVERY_ATTEMPTS, dispatch.execution_id, timeout=2)
            data = interrupted_event(
                reason=reason, worker=self.name, error=error, policy=policy, recovery_attempts=recovery_attempts or 0
            )
            await self.pool.fetch(
                q.INTERRUPT, dispatch.execution_id, dispatch.attempt, self.name, data, self.incarnation, timeout=2
            )
        self.log.warning(
            "execution_interrupted", execution_id=str(dispatch.execution_id), attempt=dispatch.attempt, reason=reason
        )

    def _release(self, execution_id: uuid.UUID) -> None:
        if self.running.pop(execution_id, None) is not None:
            self.slots.release()
        if not self.running:
            self.idle.set()

    async def _finish_loop(self) -> None:
        while True:
            batch = [await self.outcomes.get()]
            while not self.outcomes.empty():
                batch.append(self.outcomes.get_nowait())
            try:
                await self._record(batch)
            finally:
                for dispatch, _ in batch:
                    self._release(dispatch.execution_id)
                    self.outcomes.task_done()

    async def _finish(self, batch: list[tuple[Assignment, Outcome]]) -> list[asyncpg.Record]:
        batch = sorted(batch, key=lambda item: item[0].execution_id)  # rows locked in one order: no deadlocks
        return await db.until_available(
            lambda: self.pool.fetch(
                q.FINISH,
                [d.execution_id for d, _ in batch],
                [d.attempt for d, _ in batch],
                [o.status for _, o in batch],
                [json.dumps(o.result) if o.result is not None else None for _, o in batch],
                [json.dumps(o.error) if o.error is not None else None for _, o in batch],
                self.name,
                self.incarnation,
            ),
            what="record_outcomes",
        )

    async def _record(self, batch: list[tuple[Assignment, Outcome]]) -> None:
        try:
            rows = await self._finish(batch)
        except asyncpg.exceptions.DataError:
            # Something PostgreSQL refuses to store (a NUL in a string): one by one, so that only
            # the offending outcome is replaced by a failure that says why.
            rows = []
            for dispatch, outcome in batch:
                try:
                    rows += await self._finish([(dispatch, outcome)])
                except asyncpg.exceptions.DataError as exc:
                    unstorable = Outcome(
                        "failed", error={"error": f"the outcome cannot be stored: {exc}", "failed_by": "worker"}
                    )
                    rows += await self._finish([(dispatch, unstorable)])
        recorded = {r["id"] for r in rows}
        for dispatch, outcome in batch:
            fields = {"execution_id": str(dispatch.execution_id), "attempt": dispatch.attempt}
            if dispatch.execution_id not in recorded:
                # Fencing: the execution moved on (recovered elsewhere); this late outcome is dropped.
                self.log.warning("outcome_fenced", status=outcome.status, **fields)
            elif outcome.status == "completed":
                metrics.FINISHED.labels("completed").inc()
                self.log.info("execution_completed", **fields)
            else:
                metrics.FINISHED.labels(outcome.status).inc()
                self.log.warning(
                    f"execution_{outcome.status}", error=(outcome.error or {}).get("error"), **fields
                )
        await publish_terminal(self.exchanges.notifications, rows)

    # -- liveness ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval_s = self.cfg.heartbeat_interval_s
        stale_after_s = interval_s * self.settings.executor.heartbeat_staleness_multiplier
        last_ok = time.monotonic()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.lock_lost.wait(), interval_s)
            if self.lock_lost.is_set():
                self.lock_conn = None
            metrics.IN_FLIGHT.set(len(self.running))
            try:
                await self._lock()
                assert self.lock_conn is not None
                status = await self.lock_conn.fetchval(
                    wq.HEARTBEAT, self.name, self.incarnation, len(self.running), timeout=max(interval_s, 1.0)
                )
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self.lock_conn is not None and self.lock_conn.is_closed():
                    self.lock_conn = None
                silent_s = time.monotonic() - last_ok
                metrics.OWN_HEARTBEAT_AGE.set(silent_s)
                self.log.warning("heartbeat_failed", error=str(exc) or type(exc).__name__, silent_s=round(silent_s, 2))
                if silent_s > stale_after_s:
                    await self._stand_down("its heartbeat could not be recorded for longer than the staleness threshold")
                continue
            last_ok = time.monotonic()
            metrics.OWN_HEARTBEAT_AGE.set(0)
            health.write(
                self.cfg.health_file, service="worker", worker=self.name, status=status,
                amqp_connected=self.connection.connected.is_set(), stood_down=self.stood_down,
            )
            if status is None:
                raise RuntimeError(
                    f"worker row {self.name!r} now belongs to another process: two workers share this name"
                )
            if status == "lost":
                await self._stand_down("the executor declared it lost")
            elif not self.stood_down:
                await self._audit(grace_s=max(2 * interval_s, 1.0))
            if self.stood_down and not self.draining:
                try:
                    await self._resume()
                except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self.log.warning("reregister_failed", error=str(exc))
