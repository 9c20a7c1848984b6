"""Liveness: the session lock whose release tells the sweeper this process died, registration as
the name's live incarnation (refused while another live process holds the name), the heartbeat,
the audit of runs recorded here that nobody runs, and standing down and resuming."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid

import asyncpg

from common import db, health, metrics
from common.deadline import wait_unwound, within
from common.errors import describe
from common.interruption import interrupt
from common.queries import CONTROL_CHANNEL
from common.queries import executions as q
from common.queries import workers as wq
from common.recovery import resolve_policy
from common.retry import DATABASE_ERRORS
from worker import claiming, pool_watch, recording, threads
from worker.state import DRAIN_DEADLINE, WorkerState


class WorkerNameInUse(RuntimeError):
    """Another live process holds this worker name."""


class _HolderExiting(RuntimeError):
    """The name's lock is still held, but by a process of this host that no longer exists."""

    def __init__(self, hostname: str, pid: int) -> None:
        super().__init__(f"{hostname} pid {pid}")
        self.hostname, self.pid = hostname, pid


#: How long registration waits for PostgreSQL to release a dead predecessor's lock: it does once
#: it notices the closed connection, a moment after the process died.
HOLDER_EXIT_WAIT_S = 10.0


def holder_gone(hostname: str | None, pid: int | None, *, this_host: str, this_pid: int) -> bool:
    """Whether the process recorded as holding a name is certainly gone: it ran on this host and
    no process has its pid, or the pid is this process's own (a container restarted as pid 1)."""
    if hostname != this_host or pid is None:
        return False
    if pid == this_pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a live process of another user
        return False
    return False


async def lock(state: WorkerState) -> None:
    """(Re)open the lock connection and take the session lock on it."""
    if state.lock_conn is not None and not state.lock_conn.is_closed():
        return
    timeout_s = max(state.cfg.heartbeat_interval_s, 1.0)
    conn = await asyncpg.connect(state.settings.database.url, timeout=timeout_s, server_settings=db.SERVER_SETTINGS)
    try:
        await conn.execute(wq.LOCK, state.lock_key, timeout=timeout_s)
        # An operator's cancel reaches a running run within a moment (the heartbeat's audit is the
        # backstop for a notification missed while this connection was down).
        await conn.add_listener(CONTROL_CHANNEL, functools.partial(_on_control, state))
    except BaseException:
        # Dropped, not closed: a close waits on a network that swallows packets, and a session
        # left holding the lock would keep this process from taking it again.
        conn.terminate()
        raise
    # Without its lock this process looks dead to the sweeper: take it again at once, not at
    # the next heartbeat.
    conn.add_termination_listener(lambda _conn: state.lock_lost.set())
    state.lock_lost.clear()
    state.lock_conn = conn


def _on_control(state: WorkerState, _conn: object, _pid: int, _channel: str, payload: object) -> None:
    """A run was cancelled: if it runs here, check the row (the payload only names it) and stop it."""
    try:
        execution_id = uuid.UUID(str(payload))
    except ValueError:
        return
    if execution_id in state.running:
        task = asyncio.create_task(recording.stop_if_moved_on(state, [execution_id]))
        state.control_checks.add(task)
        task.add_done_callback(state.control_checks.discard)


async def register(state: WorkerState) -> None:
    """Mark this process the worker's live incarnation. What the row says is `running` here but
    this process does not run (a predecessor that died, or work given up while the database
    was away) is interrupted first, so that recovery takes it over. A predecessor killed a moment
    ago may still hold the name's lock: if it ran on this host and is gone, wait for the lock."""
    deadline = time.monotonic() + HOLDER_EXIT_WAIT_S
    while True:
        try:
            await _register_once(state)
            return
        except _HolderExiting as holder:
            if time.monotonic() > deadline:
                # Its pid looked gone from here, yet the lock is still held: a process with that pid
                # in another pid namespace (a container under the same hostname), or its
                # connection left open.
                raise WorkerNameInUse(
                    f"worker name {state.name!r} is still held after {HOLDER_EXIT_WAIT_S:.0f} s by the process "
                    f"recorded as its holder (host {holder.hostname}, pid {holder.pid}), or by its database "
                    f"connection: stop that process (or end its connection, see pg_stat_activity), or start "
                    f"this one under another --name"
                ) from None
            await asyncio.sleep(0.1)


async def _register_once(state: WorkerState) -> None:
    cfg = state.cfg
    async with state.pool.acquire() as conn, conn.transaction():
        previous = await conn.fetchrow(wq.PREVIOUS, state.name, state.incarnation)
        if previous is not None and previous["held"]:
            if holder_gone(previous["hostname"], previous["pid"], this_host=socket.gethostname(), this_pid=os.getpid()):
                raise _HolderExiting(previous["hostname"], previous["pid"])
            raise WorkerNameInUse(
                f"worker name {state.name!r} is held by a live process (host {previous['hostname']}, "
                f"pid {previous['pid']}): stop that process, or start this one under another --name"
            )
        # Not while a claim is under way (re-registering after a stand-down, say): a run it has
        # committed but not yet started here would look orphaned. The audit finds real ones later.
        for row in await conn.fetch(q.SELECT_RUNNING_ON, state.name):
            if row["id"] not in state.running and not state.claiming:
                await _interrupt_orphan(state, conn, row, "the worker restarted or lost contact while running it")
        await conn.fetch(
            wq.REGISTER,
            state.name,
            list(cfg.runtimes),
            sorted(state.actions),
            cfg.max_concurrent_tasks,
            cfg.heartbeat_interval_s,
            socket.gethostname(),
            os.getpid(),
            state.incarnation,
            state.lock_key,
            cfg.queue_ttl_s,
        )


async def _audit(state: WorkerState, *, grace_s: float) -> None:
    """Interrupt what the database says runs here but does not (another process under this
    name claimed it and died, say): nothing stays `running` with nobody running it."""
    if state.claiming:  # a claim committed but not yet a task here would look orphaned
        return
    with contextlib.suppress(*DATABASE_ERRORS):
        rows = await state.pool.fetch(q.SELECT_RUNNING_SINCE, state.name, grace_s, timeout=grace_s)
        for row in rows:
            if row["id"] not in state.running and not state.claiming:
                await _interrupt_orphan(
                    state, state.pool, row, "recorded as running on this worker, which is not running it"
                )


async def _checks(state: WorkerState, *, grace_s: float) -> None:
    """The heartbeat's backstops (`pool_watch.probe`, then `_audit` and `recording.stop_if_moved_on`),
    run beside the heartbeat loop (on a database that swallows the pool's packets they would hold
    up the heartbeats, and the count of silence that makes a cut-off worker stand down), each
    bounded as a whole, a little past its own query's timeout, so that the next round is not
    skipped for long. Pools that answer again after a silence take work again here."""
    if not await pool_watch.probe(state, grace_s):
        return  # the checks go through the pools too
    if state.pools_out:
        await pool_watch.take_work_again(state)
    bound_s = grace_s + 0.5
    try:
        await within(_audit(state, grace_s=grace_s), bound_s, what="audit")
    except TimeoutError as exc:
        state.log.warning("heartbeat_check_skipped", check="audit", error=describe(exc))
    try:
        await within(recording.stop_if_moved_on(state, list(state.running), timeout_s=grace_s), bound_s, what="control_check")
    except TimeoutError as exc:
        state.log.warning("heartbeat_check_skipped", check="control_check", error=describe(exc))


def _checks_ended(state: WorkerState, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        state.log.error("heartbeat_checks_failed", error=describe(exc), exc_info=exc)


async def _interrupt_orphan(state: WorkerState, conn: db.Executor, row: asyncpg.Record, error: str) -> None:
    """A run recorded as `running` here that this process does not run: hand it to recovery."""
    action = state.actions.get(row["action_ref"])
    event = await interrupt(
        conn,
        execution_id=row["id"],
        attempt=row["attempt"],
        worker=state.name,
        incarnation=None,  # any incarnation's: a predecessor's runs, or runs this process gave up while away
        reason="worker_lost",
        error=error,
        policy=resolve_policy(action.spec if action else None, state.settings.recovery),
        recovery_attempts=row["recovery_attempts"],
    )
    if event is not None:
        state.log.warning(
            "execution_interrupted", execution_id=str(row["id"]), attempt=row["attempt"], reason="worker_lost"
        )


async def _stand_down(state: WorkerState, why: str) -> None:
    """Stop taking work and give up what runs here: it is about to be recovered elsewhere."""
    if state.stood_down:
        return
    state.stood_down = True
    state.resumed.clear()
    state.log.warning("worker_standing_down", reason=why, cancelling=len(state.running), handing_back=len(state.inbox))
    await claiming.hand_back(state)
    state.cancel_reason = ("worker_lost", f"the worker stood down: {why}")
    for task in list(state.running.values()):
        task.cancel()
    # Each records its interruption within its own bound; an action slow to honour its cancel is
    # not waited for past `STOP_STEP_TIMEOUT_S` (its outcome, should it come, is fenced).
    await wait_unwound(set(state.running.values()), state.log, "runs")


async def _resume(state: WorkerState) -> None:
    await register(state)
    # Registered through the pool: it answers. What a claim it held up may have taken, registering
    # interrupted (`_register_once`); what it handed back, the executor moved on.
    state.pools_failing_since, state.pools_out = None, False
    state.abandoned.clear()
    state.abandoned_calls.clear()
    state.abandon_claim.clear()
    state.stood_down = False
    state.cancel_reason = DRAIN_DEADLINE
    state.resumed.set()
    state.mail.set()
    state.log.info("worker_reregistered")


#: The first pause before trying again to retake a lost session lock; doubled on each failure.
FIRST_RETAKE_S = 0.05


def after_failed_heartbeat(
    *, interval_s: float, stale_after_s: float, silent_s: float, lock_held: bool, retake_s: float
) -> tuple[float, float]:
    """How long to wait before the next try, and the retake pause to remember. Without its session
    lock a worker looks dead to the sweeper once its last heartbeat is half an interval old, so a
    lost lock is tried again soon: from `FIRST_RETAKE_S`, doubling up to a quarter interval (not in
    a loop, for the database may refuse connections for a while). With the lock still held, the
    next try is the next heartbeat. Never later than the moment the worker turns stale, when it
    has to stand down."""
    if lock_held:
        wait_s, retake_s = interval_s, 0.0
    else:
        retake_s = min(max(2 * retake_s, FIRST_RETAKE_S), interval_s / 4)
        wait_s = retake_s
    if silent_s < stale_after_s:
        wait_s = min(wait_s, stale_after_s - silent_s + 0.01)
    return wait_s, retake_s


async def heartbeat_loop(state: WorkerState) -> None:
    interval_s = state.cfg.heartbeat_interval_s
    stale_after_s = interval_s * state.settings.executor.heartbeat_staleness_multiplier
    last_ok = time.monotonic()
    wait_s, retake_s = interval_s, 0.0
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.lock_lost.wait(), wait_s)
        wait_s = interval_s
        if state.lock_lost.is_set():
            state.lock_conn = None
        metrics.IN_FLIGHT.set(len(state.running))
        try:
            beat_s = max(interval_s, 1.0)
            # (Connecting and locking have a timeout each; the LISTEN has none.)
            await within(lock(state), 2 * beat_s + 0.5, what="take_name_lock")
            assert state.lock_conn is not None
            # Bounded as a whole too: a query the network swallowed unwinds only once asyncpg's
            # cancel request gets through, and this loop must go on counting the silence.
            status = await within(
                state.lock_conn.fetchval(wq.HEARTBEAT, state.name, state.incarnation, len(state.running), timeout=beat_s),
                beat_s + 0.5, what="heartbeat",
            )
        except DATABASE_ERRORS as exc:
            if state.lock_conn is not None and state.lock_conn.is_closed():
                state.lock_conn = None
            # A lost lock is retaken at once; after a failed retake, the next comes after a pause
            # (the event stays set otherwise, and the loop would spin on a refused connection).
            state.lock_lost.clear()
            silent_s = time.monotonic() - last_ok
            wait_s, retake_s = after_failed_heartbeat(
                interval_s=interval_s, stale_after_s=stale_after_s, silent_s=silent_s,
                lock_held=state.lock_conn is not None, retake_s=retake_s,
            )
            metrics.OWN_HEARTBEAT_AGE.set(silent_s)
            state.log.warning("heartbeat_failed", error=describe(exc), silent_s=round(silent_s, 2))
            if silent_s > stale_after_s:
                await _stand_down(state, "its heartbeat could not be recorded for longer than the staleness threshold")
            continue
        last_ok, retake_s = time.monotonic(), 0.0
        metrics.OWN_HEARTBEAT_AGE.set(0)
        health.write(
            state.cfg.health_file, service="worker", worker=state.name, status=status,
            amqp_connected=state.connection.connected.is_set(), stood_down=state.stood_down,
        )
        if status is None:
            raise RuntimeError(
                f"worker row {state.name!r} now belongs to another process: two workers share this name; "
                "give each worker its own --name"
            )
        if status == "lost":
            await _stand_down(state, "the executor declared it lost")
        elif not state.stood_down:
            await pool_watch.reconcile(state, status, stale_after_s=stale_after_s, timeout_s=beat_s)
        if not state.stood_down and (state.heartbeat_checks is None or state.heartbeat_checks.done()):
            state.heartbeat_checks = asyncio.create_task(
                _checks(state, grace_s=max(2 * interval_s, 1.0)), name="heartbeat_checks"
            )
            state.heartbeat_checks.add_done_callback(functools.partial(_checks_ended, state))
        if state.stood_down and not state.draining:
            if threads.in_flight():
                # A synchronous action given up on standing down still runs (a thread cannot be
                # cancelled) while its run is recovered elsewhere: not back until it has ended.
                state.log.info("resume_waits_for_sync_actions", running=threads.in_flight())
                continue
            try:
                # Bounded as a whole: a pool the network swallows, or one whose connections are all
                # held up, would otherwise hold this loop, and every heartbeat after, for good. Past
                # the staleness window the executor has declared this worker lost again anyway.
                await within(_resume(state), stale_after_s, what="reregister")
            except DATABASE_ERRORS as exc:  # a timeout among them: tried again at the next heartbeat
                state.log.warning("reregister_failed", error=describe(exc))
