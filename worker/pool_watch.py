"""The pools' watch: a worker whose pool connections stop answering while its lock connection
still does (a partition between one set of connections and PostgreSQL, or every pool connection
held up) can claim nothing and finish nothing, yet its heartbeats say it is alive, so work would go
on being placed on it, to wait there for the scheduled timeout. Its runs may still be running, and
their outcomes will be recorded once the pools are back, so it is not declared lost: it stops
taking work instead. Once the pools have not answered the heartbeat's probe for a staleness window,
it abandons a claim the database holds up, hands its unclaimed dispatches back, and marks itself
`draining` (through the lock connection): nothing more is placed on it, and the executor puts
what waits for it back in line at once. When the pools answer again, it puts back what the
abandoned claim may have committed unseen and takes work again."""

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
    """Whether both pools answer within ``timeout_s`` (as a whole: asyncpg unwinds a query the
    network swallowed only once its cancel request gets through); noted in the state."""
    try:
        await within(
            asyncio.gather(
                state.pool.fetchval(PING, timeout=timeout_s), state.hot_pool.fetchval(PING, timeout=timeout_s)
            ),
            timeout_s + 0.5,
            what="pool_probe",
        )
    except DATABASE_ERRORS as exc:  # a timeout among them
        state.log.warning("pool_probe_failed", error=describe(exc), timeout_s=timeout_s)
        return False
    state.pools_answered_at = time.monotonic()
    return True


def silent_s(state: WorkerState) -> float:
    """How long the pools have not answered the probe."""
    return time.monotonic() - state.pools_answered_at


async def stop_taking_work(state: WorkerState, lock_timeout_s: float) -> None:
    """The pools have not answered for a staleness window: claim nothing more, let go of a claim
    the database holds up, hand back what waits here, and be `draining` so that nothing more comes.
    (From the heartbeat loop, which uses the lock connection one query at a time.)"""
    async with state.pools_transition:
        if state.pools_out or state.draining or state.stood_down:
            return
        state.pools_out = True
        state.resumed.clear()  # the claim loop waits at its top
        state.abandon_claim.set()  # a claim under way gives its dispatches back (`claiming._claim`)
        state.log.warning(
            "worker_pools_unreachable", silent_s=round(silent_s(state), 2), running=len(state.running),
            handing_back=len(state.inbox),
            detail="the worker's pool connections do not answer while its lock connection does: it takes no "
            "work until they do, and its runs go on; check the network between this worker and PostgreSQL, "
            "or what holds its connections up (pg_stat_activity)",
        )
        await claiming.hand_back(state)
        if state.lock_conn is None:
            return  # the heartbeat loop retakes the lock, and the executor moves what waits here
        try:
            await within(
                state.lock_conn.fetch(wq.STOP_TAKING_WORK, state.name, state.incarnation, timeout=lock_timeout_s),
                lock_timeout_s + 0.5, what="stop_taking_work",
            )
        except DATABASE_ERRORS as exc:  # dispatches still come: each is handed back as it arrives
            state.log.warning("stop_taking_work_failed", error=describe(exc))


async def take_work_again(state: WorkerState) -> None:
    """The pools answer again (the probe just went through them): put back what an abandoned claim
    may have committed unseen, and take work again, unless a drain or a stand-down began meanwhile
    (each settles that itself). Through the pools; from the heartbeat's checks."""
    async with state.pools_transition:
        if not state.pools_out:
            return
        await claiming.unclaim_abandoned(state)
        state.abandoned.clear()
        state.abandoned_calls.clear()
        if state.draining or state.stood_down:
            return
        try:
            await state.pool.fetch(wq.TAKE_WORK_AGAIN, state.name, state.incarnation, timeout=5.0)
        except DATABASE_ERRORS as exc:  # tried again after the next probe
            state.log.warning("take_work_again_failed", error=describe(exc))
            return
        state.abandon_claim.clear()
        state.pools_out = False
        state.resumed.set()
        state.mail.set()
        state.log.info("worker_pools_back", running=len(state.running))
