"""Cron schedules: when each fires, and which due times an executor fires after it was away. Pure.

Cron expressions are read by croniter (five fields, or six with seconds last), in the schedule's
time zone. A due time is fired once: the executor that fires it advances the schedule in the same
transaction that records the executions, and each execution's id is derived from the schedule's
name and due time, so a second firing of the same due time records nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
import zoneinfo
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from croniter import croniter

CatchUp = Literal["latest", "all", "none"]

#: Never more than this many missed runs fired at once (catch_up: all after a very long outage).
MAX_CATCH_UP = 1000

_NAMESPACE = uuid.UUID("2b0f4c61-8d7e-4a2f-9f3c-5e1a6b7c8d90")


def _croniter() -> type[croniter]:
    """croniter, imported when a schedule is first read: every process loads the settings, which
    check schedules, but most have none (and croniter with dateutil is a tenth of a start-up)."""
    from croniter import croniter

    return croniter


def check(cron: str, timezone: str) -> None:
    """Raise ValueError, saying what is wrong, for an expression or a zone that cannot be used."""
    if not _croniter().is_valid(cron):
        raise ValueError(f"{cron!r} is not a cron expression (five fields, or six with seconds last)")
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{timezone!r} is not a time zone (e.g. UTC, Europe/Paris)") from None


def next_after(cron: str, timezone: str, after: dt.datetime) -> dt.datetime:
    """The first due time strictly after ``after``, as an aware UTC time."""
    local = after.astimezone(zoneinfo.ZoneInfo(timezone))
    nxt: dt.datetime = _croniter()(cron, local).get_next(dt.datetime)
    return nxt.astimezone(dt.UTC)


def _before(cron: str, timezone: str, t: dt.datetime) -> dt.datetime:
    """The last due time strictly before ``t``."""
    prev: dt.datetime = _croniter()(cron, t.astimezone(zoneinfo.ZoneInfo(timezone))).get_prev(dt.datetime)
    return prev.astimezone(dt.UTC)


def due_times(
    cron: str, timezone: str, next_fire_at: dt.datetime, now: dt.datetime, catch_up: CatchUp, grace_s: float,
) -> tuple[list[dt.datetime], dt.datetime, int]:
    """Which due times to fire now, the schedule's next due time after them, and how many missed
    due times the policy skips (counted up to MAX_CATCH_UP; more are not walked).

    A due time at most ``grace_s`` old is on time and always fires. Older ones were missed (every
    executor was away): ``all`` fires each of them (at most MAX_CATCH_UP, the latest ones),
    ``latest`` only the most recent, ``none`` none. However long the outage, the work is bounded:
    missed due times are reached backwards from the cut-off, not walked from the first."""
    cutoff = now - dt.timedelta(seconds=grace_s)
    missed: list[dt.datetime] = []
    if next_fire_at < cutoff:
        t = _before(cron, timezone, cutoff)
        while t >= next_fire_at and len(missed) < MAX_CATCH_UP + 1:
            missed.append(t)
            t = _before(cron, timezone, t)
        missed.reverse()
    on_time: list[dt.datetime] = []
    t = next_fire_at if next_fire_at >= cutoff else next_after(cron, timezone, missed[-1] if missed else cutoff)
    while t <= now:
        if t >= cutoff:
            on_time.append(t)
        t = next_after(cron, timezone, t)
    if catch_up == "all":
        fire = missed[-MAX_CATCH_UP:]
    elif catch_up == "latest":
        fire = missed[-1:]
    else:
        fire = []
    return fire + on_time, t, len(missed) - len(fire)


def execution_id(schedule: str, due: dt.datetime) -> uuid.UUID:
    """The one execution a schedule's due time gets, whichever executor fires it."""
    return uuid.uuid5(_NAMESPACE, f"{schedule}|{due.astimezone(dt.UTC).isoformat()}")
