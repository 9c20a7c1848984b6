"""The pools' watch: a worker whose pool connections stop answering while its lock connection
still does (a partition between one set of connections and PostgreSQL, or every pool connection
held up) can claim nothing and finish nothing, yet its heartbeats say it is alive, so work would go
on being placed on it, to wait there for the scheduled timeout. Its runs may still be running, and
their outcomes will be recorded once the pools are back, so it is not declared lost: it stops
taking work instead.

Each round of the heartbeat's checks probes both pools first (`probe`). Once they have failed
every probe for a staleness window, the heartbeat loop (`reconcile`, on the lock connection)
marks the worker `draining`, so that nothing more is placed on it and the executor puts what
waits for it back in line at once, at no cost; then it lets go of a claim the database holds up
and hands back the dispatches it holds. When a probe goes through again, the checks put back what
the abandoned claim may have committed unseen and the worker claims again (`take_work_again`); the
next heartbeat marks it `active`. The row's status is reconciled with the worker's on every
heartbeat, so a mark that failed or came late is put right."""

from __future__ import annotations

import asyncio
import time

from common.deadline import within
from common.errors import describe
from common.queries import PING
from common.queries import workers as wq
from common.retry import DATABASE_ERRORS
from worker import claiming
from worker.state import WorkerState


async def probe(state: WorkerState, timeout_s: float) -> bool:
    """Whether both pools answer within ``timeout_s`` (bounded as a whole: asyncpg unwinds a query
    the network swallowed only once its cancel request gets through); noted in the state."""
    try:
        await within(
            asyncio.gather(
                state.pool.fetchval(PING, timeout=timeout_s), state.hot_pool.fetchval(PING, timeout=timeout_s)
            ),
            timeout_s + 0.5,
            what="pool_probe",
        )
    except DATABASE_ERRORS as exc:  # a timeout among them
        state.pools_last_failed_at = time.monotonic()
        if state.pools_failing_since is None:
            state.pools_failing_since = state.pools_last_failed_at
        state.log.warning("pool_probe_failed", error=describe(exc), timeout_s=timeout_s)
        return False
    state.pools_failing_since = None
    return True


def failing_for_s(state: WorkerState) -> float:
    """How long the probes have shown the pools failing: from the first failure of the run of
    failures to the last (0: the last probe went through). Not the time since the first: a
    heartbeat outage holds the probes up, and one failure before it is no proof of a window's."""
    since = state.pools_failing_since
    return 0.0 if since is None else state.pools_last_failed_at - since


async def reconcile(state: WorkerState, status: str, *, stale_after_s: float, timeout_s: float) -> None:
    """After a heartbeat (``status`` the row's, as it returned): stop taking work once the pools
    have failed for ``stale_after_s``, and bring the row's status in line with whether this worker
    takes work. Not for a worker stood down (registering again settles its status)."""
    if state.pools_transition.locked():
        return  # taking work again (its unclaim may take seconds): the heartbeats do not wait for it
    async with state.pools_transition:
        if state.stood_down:
            return
        if state.draining:
            # A drain marks the row through the pool; with the pools out, that mark fails, and the
            # row, still `active`, would draw work (and have its hand-backs taken for forgeries)
            # until the process is gone: it is marked here, through the lock connection.
            if status == "active":
                await mark_through_lock(state, wq.STOP_TAKING_WORK, timeout_s=timeout_s, what="mark_draining")
            return
        if not state.pools_out and failing_for_s(state) > stale_after_s:
            state.pools_out = True
            state.resumed.clear()  # the claim loop waits at its top
            state.log.warning(
                "worker_pools_unreachable", failing_s=round(failing_for_s(state), 2), running=len(state.running),
                unclaimed=len(state.inbox),
                detail="the worker's pool connections do not answer while its lock connection does: it takes no "
                "work until they do, and its runs go on; check the network between this worker and PostgreSQL, "
                "or what holds its connections up (pg_stat_activity)",
            )
            status = "active"
        if state.pools_out:
            if status == "active" and not await mark_through_lock(state, wq.STOP_TAKING_WORK, timeout_s=timeout_s, what="stop_taking_work"):
                return  # handed back once marked: a dispatch handed back behind an `active` row would wait
            # Marked `draining`: hand back what is here, and what a claim held up had taken (its
            # dispatches come back to the inbox, and go at the next heartbeat).
            state.abandon_claim.set()
            if state.inbox:
                await claiming.hand_back(state)
        elif status == "draining":
            await mark_through_lock(state, wq.TAKE_WORK_AGAIN, timeout_s=timeout_s, what="take_work_again")


async def take_work_again(state: WorkerState) -> None:
    """The pools answer again (a probe just went through them): put back what an abandoned claim
    may have committed unseen, and claim again (the next heartbeat marks the row `active`)."""
    async with state.pools_transition:
        # A claim let go of is recorded as abandoned only once the claim loop has come back from
        # it: until then, there is nothing to put back yet, and claiming again would claim it twice.
        if not state.pools_out or state.claiming:
            return
        if not await claiming.unclaim_abandoned(state):
            return  # tried again after the next probe: until then, those rows are left alone
        state.abandoned.clear()
        state.abandoned_calls.clear()
        if state.draining or state.stood_down:
            return  # each settles the rest itself
        state.abandon_claim.clear()
        state.pools_out = False
        state.resumed.set()
        state.mail.set()
        state.log.info("worker_pools_back", running=len(state.running))


async def mark_through_lock(state: WorkerState, query: str, *args: object, timeout_s: float, what: str) -> bool:
    """A status change (``query`` of name, incarnation and ``args``) through the lock connection,
    which answers when the pools may not; whether it went through (matched or not: a drain or the
    executor may have changed the status since). Only while nothing else uses that connection:
    the heartbeat loop, or a drain once that loop has stopped."""
    if state.lock_conn is None or timeout_s <= 0:
        return False
    try:
        # asyncpg's own timeout, a little shorter, ends the statement cleanly where it can; `within`
        # bounds it where its cancel request cannot get through either.
        fetch = state.lock_conn.fetch(query, state.name, state.incarnation, *args, timeout=0.9 * timeout_s)
        await within(fetch, timeout_s, what=what)
    except DATABASE_ERRORS as exc:  # the heartbeat's are tried again at the next one
        state.log.warning(f"{what}_failed", error=describe(exc))
        return False
    return True
