"""What a worker's parts share: the work it holds (inbox, running tasks, outcomes to record), the
flags that order its parts (draining, claiming, standing down), its session lock and connections.

Each part is a module of functions over this one object: `claiming` (inbox and fenced claim),
`recording` (running an assignment and recording what became of it), `liveness` (session lock,
registration, heartbeat, audit, standing down); `service` starts them and stops them in order.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import deque
from dataclasses import dataclass

import asyncpg
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    ConsumerTag,
)

from common import amqp
from common.logging import get_logger
from common.recovery import InterruptReason
from common.schemas import Assignment, Dispatch
from common.settings import Settings
from worker.registry import RegisteredAction
from worker.runner import Outcome

log = get_logger("baton.worker")


#: Why a run is interrupted when it is cancelled, unless the worker is standing down.
DRAIN_DEADLINE: tuple[InterruptReason, str] = ("signal", "the worker stopped past its drain deadline")


@dataclass(eq=False)
class Delivery:
    """A dispatch message held unacked: how many of its dispatches are not yet claimed or dropped.
    No message: a dispatch whose message was settled already (`claiming._claim` defers one)."""

    message: AbstractIncomingMessage | None
    pending: int


class WorkerState:
    # Set by `WorkerService.run` as the worker starts, before any of its parts runs.
    pool: asyncpg.Pool
    #: The claim's and the finish's connections, their statements planned once (`db.HOT_PATH_SETTINGS`).
    hot_pool: asyncpg.Pool
    connection: AbstractRobustConnection
    consume_channel: AbstractRobustChannel
    publish_channel: AbstractRobustChannel
    exchanges: amqp.Exchanges
    queue: AbstractQueue
    consumer_tag: ConsumerTag

    def __init__(self, settings: Settings, name: str, actions: dict[str, RegisteredAction]) -> None:
        self.settings = settings
        self.cfg = settings.worker
        self.name = name
        self.names = amqp.Names(settings.message_queue.prefix)
        self.incarnation = uuid.uuid4()
        self.actions = actions
        self.log = log.bind(worker=name)
        # Dispatches received but not yet claimed, each with the message that brought it.
        self.inbox: deque[tuple[Dispatch, Delivery]] = deque()
        self.mail = asyncio.Event()
        self.slots = asyncio.Semaphore(self.cfg.max_concurrent_tasks)
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.running_attempts: dict[uuid.UUID, int] = {}  # the attempt each of `running` is
        # Dispatches of an execution's next attempt (a retry, a wake-up) that came before this
        # worker had let go of the attempt before: back to the inbox once it has. Their messages
        # are settled at once, in delivery order, as one cumulative ack per channel needs.
        self.deferred: dict[uuid.UUID, list[tuple[Dispatch, Delivery]]] = {}
        # Runs stopped here because the database says they no longer run here (an operator
        # cancelled them): their state is already recorded, so stopping them records nothing.
        self.stopped: set[uuid.UUID] = set()
        self.control_checks: set[asyncio.Task[None]] = set()
        # The heartbeat's backstop checks under way (`liveness._checks`): beside the heartbeat loop,
        # never in its way, one round at a time.
        self.heartbeat_checks: asyncio.Task[None] | None = None
        # Hand-backs of unclaimed dispatches after the broker connection came back (`claiming`).
        self.hand_backs: set[asyncio.Task[bool]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.outcomes: asyncio.Queue[tuple[Assignment, Outcome]] = asyncio.Queue()
        self.draining = False
        self.claiming = False
        # Set by a drain that stops waiting for a claim the database holds up; the claim's
        # (execution, attempt) pairs, which it may have committed unseen, are then `abandoned`.
        self.abandon_claim = asyncio.Event()
        self.abandoned: list[tuple[uuid.UUID, int]] = []
        self.abandoned_calls: set[asyncio.Future[list[asyncpg.Record]]] = set()
        # Standing down: the database cannot be reached, or the executor declared this worker lost;
        # it takes no work until it has registered again.
        self.stood_down = False
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.cancel_reason: tuple[InterruptReason, str] = DRAIN_DEADLINE
        # Since when every probe of the pools by the heartbeat's checks has failed (None: the last
        # went through), and whether this worker stopped taking work because they had for a
        # staleness window (`pool_watch`).
        self.pools_failing_since: float | None = None
        self.pools_last_failed_at = 0.0
        self.pools_out = False
        # Held by each change of whether this worker takes work (`pool_watch`, a drain's mark).
        self.pools_transition = asyncio.Lock()
        # PostgreSQL releases this session lock the moment the process dies: the sweeper's signal.
        self.lock_key = secrets.randbits(62)
        self.lock_conn: asyncpg.Connection | None = None
        self.lock_lost = asyncio.Event()

