"""What every executor loop is given: the settings, the connections, and the state the loops share
(`run(ctx, stop_event)`, supervised together by `executor.service`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from common.amqp import Exchanges, Names
from common.deadline import Allowance
from common.settings import Settings
from executor.catalogue import Catalogue

Loop = Callable[["ExecutorContext", asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class ExecutorContext:
    # Names and Exchanges are imported by name: in this class body `amqp` is the field below.
    settings: Settings
    names: Names
    pool: asyncpg.Pool
    #: Intake's connections, their statements planned once (`common.db.HOT_PATH_SETTINGS`).
    hot_pool: asyncpg.Pool
    amqp: AbstractRobustConnection
    publish_channel: AbstractChannel
    exchanges: Exchanges
    catalogue: Catalogue
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Work was left `requested` (no room, or not yet looked at): intake does not place what it
    #: records ahead of it, and freed capacity wakes the scheduler. Until the scheduler's first
    #: pass, whatever an earlier run left is assumed to wait.
    backlog: bool = True
    #: Held by each placement (a scheduler pass, intake placing what it recorded) while it counts
    #: the workers' room and marks what it placed: the next one counts those too.
    placing: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Dispatches being published in the background (`executor.dispatching.hand_over`).
    handovers: set[asyncio.Task[None]] = field(default_factory=set)
    #: Once the executor stops: the time its stop may take (`supervise`), its loops' deadline and
    #: `common.deadline.STOP_AFTERMATH_S` after it, shared by what follows the deadline.
    stopping: Allowance | None = None
