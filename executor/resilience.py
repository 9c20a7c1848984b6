"""Riding out a database or broker outage inside a loop, instead of letting the loop die."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from common.logging import get_logger
from common.retry import TRANSIENT_ERRORS

log = get_logger("baton.executor")



@contextlib.asynccontextmanager
async def riding_out_outages(what: str, stop_event: asyncio.Event, pause_s: float = 1.0) -> AsyncIterator[None]:
    """Run one iteration of a loop; on a transient infrastructure error, log it and pause (or stop
    early if the service is stopping). Anything else is a bug and propagates: the supervisor then
    stops the service loudly. Every transition is a compare-and-set, so a half-done iteration is
    safe to repeat."""
    try:
        yield
    except TRANSIENT_ERRORS as exc:
        log.warning("infrastructure_unavailable", during=what, error=str(exc) or type(exc).__name__)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop_event.wait(), pause_s)
