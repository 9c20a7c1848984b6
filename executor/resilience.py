"""Riding out a database or broker outage inside a loop, instead of letting the loop die."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from tenacity import RetryCallState, wait_exponential, wait_random_exponential

from common.db import close_connection, connect_one
from common.errors import describe
from common.logging import get_logger
from common.retry import TRANSIENT_ERRORS

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

log = get_logger("baton.executor")

#: The pause after the n-th consecutive failure of one loop: "equal jitter", half fixed and half
#: random, so that it grows (0.1-0.2 s, 0.2-0.4 s, 0.4-0.8 s, ...) up to 2.5-5 s, and executors that
#: lost the database at the same moment do not all come back at the same moment.
BACKOFF = wait_exponential(multiplier=0.1, max=2.5) + wait_random_exponential(multiplier=0.1, max=2.5)


class Unavailable(Exception):
    """Something a loop needs (the database, a queue) is failing for everything, not for one message."""


#: PostgreSQL error classes that say the database, not the request, is at fault: connection (08),
#: transaction rollback (40), the schema or the statement (42), resources (53), object state
#: (55), operator intervention (57), system (58), internal (XX). The batch goes back to the queue.
UNWELL_SQLSTATE_CLASSES = frozenset({"08", "40", "42", "53", "55", "57", "58", "XX"})


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` is an outage rather than something wrong with one request."""
    if isinstance(exc, (Unavailable, *TRANSIENT_ERRORS)):
        return True
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] in UNWELL_SQLSTATE_CLASSES


def being_cancelled() -> bool:
    """Whether the current task was asked to stop (rather than hit by a library's own cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Backoff:
    """Consecutive failures of one loop, and the pause after the latest."""

    def __init__(self) -> None:
        self.failures = 0

    def next_delay_s(self) -> float:
        self.failures += 1
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self.failures
        return BACKOFF(state)

    def reset(self) -> None:
        self.failures = 0


# One backoff per loop (``what``) of each running service (its stop event), forgotten with it.
_backoffs: weakref.WeakKeyDictionary[asyncio.Event, dict[str, Backoff]] = weakref.WeakKeyDictionary()


def backoff_for(what: str, stop_event: asyncio.Event) -> Backoff:
    return _backoffs.setdefault(stop_event, {}).setdefault(what, Backoff())


@contextlib.asynccontextmanager
async def riding_out_outages(
    what: str, stop_event: asyncio.Event, pause_s: float | None = None
) -> AsyncIterator[None]:
    """Run one iteration of a loop; on a transient infrastructure error, log it and pause (or stop
    early if the service is stopping). Anything else is a bug and propagates: the supervisor then
    stops the service loudly. Every transition is a compare-and-set, so a half-done iteration is
    safe to repeat.

    The pause grows with the loop's consecutive failures (jittered exponential backoff, see
    ``BACKOFF``) and starts over after an iteration that succeeds; ``pause_s`` fixes it instead."""
    backoff = backoff_for(what, stop_event)
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        delay_s = backoff.next_delay_s()
        if pause_s is not None:
            delay_s = pause_s
        log.warning(
            "infrastructure_unavailable",
            during=what,
            error=describe(exc),
            failures=backoff.failures,
            retry_in_s=round(delay_s, 3),
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop_event.wait(), delay_s)
    else:
        backoff.reset()


async def every(interval_s: float, what: str, stop_event: asyncio.Event, step: Callable[[], Awaitable[Any]]) -> None:
    """The shape of a periodic loop: ``step`` every ``interval_s`` until the service stops, each
    time riding out an outage (see `riding_out_outages`)."""
    while not stop_event.is_set():
        async with riding_out_outages(what, stop_event):
            await step()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_event.wait(), interval_s)


async def periodic(
    log: FilteringBoundLogger, name: str, stop_event: asyncio.Event, *, enabled: bool, every_s: float,
    step: Callable[[], Awaitable[Any]], what: str | None = None, **fields: Any,
) -> None:
    """The whole life of a periodic loop called ``name``: when off, `<name>_disabled`, and it waits
    for the stop; else `<name>_started` (with ``fields``), ``step`` every ``every_s`` (see
    `every`; outages are reported as during ``what``, by default ``name``), and `<name>_stopped`."""
    if not enabled:
        log.info(f"{name}_disabled")
        await stop_event.wait()
        return
    log.info(f"{name}_started", **fields)
    await every(every_s, what or name, stop_event, step)
    log.info(f"{name}_stopped")


#: Past the moment something is due, so that the pass that wakes then finds it due; also the
#: shortest pause, so that something overdue is acted on at once but never in a busy loop.
_DUE_MARGIN_S = 0.01


def next_pause_s(fallback_s: float, next_due_in_s: float | None) -> float:
    """Until the next pass: the fallback interval, or less if something is due sooner (a worker
    turning stale, a timer, a schedule)."""
    if next_due_in_s is None:
        return fallback_s
    return max(min(fallback_s, next_due_in_s + _DUE_MARGIN_S), _DUE_MARGIN_S)


async def until_due(
    *, url: str, channel: str, what: str, stop_event: asyncio.Event, fallback_s: float,
    step: Callable[[], Awaitable[Any]], next_due_in_s: Callable[[], Awaitable[float | None]],
    wakes_on: Callable[[object], bool] = lambda _payload: True,
) -> None:
    """The shape of a loop that acts on what has fallen due: ``step``, then sleep until the next
    due time (``next_due_in_s``, read from an index), a notification on ``channel`` that
    ``wakes_on`` accepts (something new to wait for), or ``fallback_s``; riding out outages, and
    listening again after the database restarts."""
    changed = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        if wakes_on(payload):
            changed.set()

    listener = await connect_one(url)
    await listener.add_listener(channel, on_notify)
    try:
        while not stop_event.is_set():
            pause_s = fallback_s
            changed.clear()
            async with riding_out_outages(what, stop_event):
                await step()
                pause_s = next_pause_s(fallback_s, await next_due_in_s())
                if listener.is_closed():
                    listener = await connect_one(url, max_wait_s=300)
                    await listener.add_listener(channel, on_notify)
                    continue
            waits = [asyncio.ensure_future(stop_event.wait()), asyncio.ensure_future(changed.wait())]
            try:
                await asyncio.wait(waits, timeout=pause_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
    finally:
        if not listener.is_closed():
            await close_connection(listener)
