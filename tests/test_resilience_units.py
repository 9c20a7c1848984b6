"""Units of executor.resilience: the pause after an outage grows per loop and starts over after a
success. No services needed."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from executor.resilience import Backoff, backoff_for, riding_out_outages


def _window(failures: int) -> tuple[float, float]:
    """Equal jitter: between the exponential base and twice it, capped at 5 s."""
    base = min(0.1 * 2 ** (failures - 1), 2.5)
    return base, 2 * base


def test_backoff_grows_within_its_window_and_is_capped():
    backoff = Backoff()
    for failures in range(1, 13):
        delay = backoff.next_delay_s()
        low, high = _window(failures)
        assert low <= delay <= high, (failures, delay)
        assert delay <= 5.0
    assert backoff.failures == 12
    backoff.reset()
    assert _window(1)[0] <= backoff.next_delay_s() <= _window(1)[1]


async def _fail(what: str, stop_event: asyncio.Event, exc: BaseException | None = None) -> None:
    async with riding_out_outages(what, stop_event):
        if exc is not None:
            raise exc


async def test_delays_grow_with_consecutive_failures_per_loop_and_reset_after_success():
    stop_event = asyncio.Event()
    stop_event.set()  # a stopping service: the pause is logged but not waited out
    with capture_logs() as logs:
        for _ in range(6):
            await _fail("schedule", stop_event, OSError("connection refused"))
        await _fail("sweep", stop_event, OSError("connection refused"))  # another loop: its own count
        await _fail("schedule", stop_event)  # success
        await _fail("schedule", stop_event, ConnectionResetError())
    events = [e for e in logs if e["event"] == "infrastructure_unavailable"]
    schedule = [e for e in events if e["during"] == "schedule"]
    assert [e["failures"] for e in schedule] == [1, 2, 3, 4, 5, 6, 1]
    for event in schedule:
        low, high = _window(event["failures"])
        assert low - 0.001 <= event["retry_in_s"] <= high + 0.001, event
    # Consecutive failures only ever widen the window: the sixth pause is longer than the first.
    assert schedule[5]["retry_in_s"] > schedule[0]["retry_in_s"]
    [sweep] = [e for e in events if e["during"] == "sweep"]
    assert sweep["failures"] == 1 and sweep["retry_in_s"] <= _window(1)[1] + 0.001
    assert schedule[-1]["error"] == "ConnectionResetError"


async def test_pause_ends_early_when_the_service_stops():
    stop_event = asyncio.Event()

    async def down_for_an_hour() -> None:
        async with riding_out_outages("timeout_check", stop_event, pause_s=3600):
            raise OSError("down")

    with capture_logs() as logs:
        pausing = asyncio.create_task(down_for_an_hour())

        async def paused() -> None:
            while not any(e["event"] == "infrastructure_unavailable" for e in logs):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(paused(), timeout=10)
    assert not pausing.done()
    stop_event.set()
    await asyncio.wait_for(pausing, timeout=10)  # ends on the stop event, not after the hour


async def test_anything_else_propagates_and_keeps_the_count():
    stop_event = asyncio.Event()
    stop_event.set()
    await _fail("schedule", stop_event, OSError())
    with pytest.raises(ValueError):
        await _fail("schedule", stop_event, ValueError("a bug"))
    assert backoff_for("schedule", stop_event).failures == 1



def test_a_failed_heartbeat_retakes_a_lost_lock_soon_backing_off_and_never_past_staleness():
    from worker.liveness import FIRST_RETAKE_S, after_failed_heartbeat

    def wait(silent_s: float, lock_held: bool, retake_s: float = 0.0) -> tuple[float, float]:
        return after_failed_heartbeat(
            interval_s=10.0, stale_after_s=30.0, silent_s=silent_s, lock_held=lock_held, retake_s=retake_s
        )

    # The lock still held: the next heartbeat, as usual.
    assert wait(3.0, True, retake_s=1.0) == (10.0, 0.0)
    # The lock lost: soon, doubling, up to a quarter interval (well inside the half interval after
    # which the sweeper takes a free lock for a dead process).
    pauses, retake_s = [], 0.0
    for _ in range(10):
        pause, retake_s = wait(1.0, False, retake_s)
        pauses.append(pause)
    assert pauses[0] == FIRST_RETAKE_S and pauses == sorted(pauses) and max(pauses) == 2.5
    # Never past the moment the worker turns stale, when it stands down.
    assert wait(29.0, True)[0] == pytest.approx(1.01)
    assert wait(29.9, False, retake_s=2.5)[0] == pytest.approx(0.11)


def test_a_name_holder_is_gone_only_when_this_host_shows_its_process_is():
    import os
    import subprocess
    import sys

    from worker.liveness import holder_gone

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    here = {"this_host": "h1", "this_pid": os.getpid()}
    assert holder_gone("h1", child.pid, **here)  # exited and reaped: nothing has that pid
    assert holder_gone("h1", os.getpid(), **here)  # our own pid: a restarted container's pid 1
    assert not holder_gone("h1", os.getppid(), **here)  # alive
    assert not holder_gone("h2", child.pid, **here)  # another host's process: cannot tell, so held
    assert not holder_gone("h1", None, **here)


async def test_a_journal_out_of_reach_for_too_long_is_the_workers_failure_not_the_workflows():
    from worker.durable import JournalUnavailable, _journal

    calls = []

    async def refused():
        calls.append(1)
        raise ConnectionRefusedError("PostgreSQL is away")

    with pytest.raises(JournalUnavailable, match="checkpoint: PostgreSQL stayed unreachable"):
        await _journal(refused, what="checkpoint", max_wait_s=0.3)
    assert len(calls) > 1  # waited it out first

    async def refused_by_the_data():
        raise ValueError("not an outage")

    with pytest.raises(ValueError):  # anything else is what it is
        await _journal(refused_by_the_data, what="checkpoint", max_wait_s=0.3)


@pytest.fixture
def debug_logging():
    """Baton's events at every level (a process that has not configured logging shows warnings and up)."""
    import logging

    import structlog

    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)


async def test_a_best_effort_step_logs_what_it_did_not_expect_and_raises_nothing(debug_logging):
    import aiormq.exceptions

    from common.best_effort import best_effort

    async def closed() -> None:
        raise aiormq.exceptions.ChannelInvalidStateError("channel closed")

    async def broken() -> None:
        raise KeyError("a bug")

    async def fine() -> None:
        return None

    async def wrong_statement() -> None:
        import asyncpg

        raise asyncpg.exceptions.UndefinedColumnError('column "stauts" does not exist')

    with capture_logs() as logs:
        assert await best_effort("close_channel", closed(), worker="w1") is False
        assert await best_effort("close_channel", broken(), worker="w1") is False
        assert await best_effort("mark_worker_inactive", wrong_statement(), worker="w1") is False
        assert await best_effort("close_channel", fine()) is True
    assert [(e["event"], e["log_level"], e["step"], e["worker"]) for e in logs] == [
        ("best_effort_step_failed", "debug", "close_channel", "w1"),
        ("best_effort_step_failed_unexpectedly", "warning", "close_channel", "w1"),
        ("best_effort_step_failed_unexpectedly", "warning", "mark_worker_inactive", "w1"),
    ]
    assert logs[1]["error"] == "KeyError: 'a bug'"

    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await best_effort("close_channel", cancelled())


def test_no_service_code_swallows_every_error():
    """Catch-alls hide bugs: service code names what it expects (`common.best_effort` for steps
    whose failure changes nothing) and logs the rest."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    catch_all = re.compile(r"suppress\((?:[^)]*\b)?(?:Base)?Exception\b")
    found = [
        f"{path.relative_to(root)}:{number}"
        for package in ("common", "executor", "worker", "cli", "dashboard")
        for path in sorted((root / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if catch_all.search(line)
    ]
    assert found == []


async def test_a_loop_that_dies_stops_the_executor_with_one_line_naming_the_cause_and_the_remedy():
    from types import SimpleNamespace

    from executor.service import LoopDied, supervise

    async def broken(ctx, stop_event):
        raise KeyError("a bug")

    async def steady(ctx, stop_event):
        await stop_event.wait()

    ctx = SimpleNamespace(settings=SimpleNamespace(executor=SimpleNamespace(shutdown_timeout_s=1.0)))
    stop_event = asyncio.Event()
    with capture_logs() as logs, pytest.raises(LoopDied) as died:
        await supervise(ctx, {"intake": broken, "scheduler": steady}, stop_event)  # type: ignore[arg-type]
    assert stop_event.is_set()  # the other loops were told to stop
    message = str(died.value)
    assert "\n" not in message
    assert message.startswith("executor loop 'intake' stopped unexpectedly (KeyError: 'a bug'); ")
    assert "start it again" in message and "loop_died" in message
    [died_event] = [e for e in logs if e["event"] == "loop_died"]
    assert died_event["loop"] == "intake" and isinstance(died_event["exc_info"], KeyError)  # its traceback is logged


def test_an_error_is_described_in_one_line():
    from common.errors import describe

    class Detailed(Exception):
        pass

    assert describe(Detailed("unsupported Unicode escape sequence\nDETAIL:  \\u0000 cannot be converted to text.")) == (
        "Detailed: unsupported Unicode escape sequence; DETAIL:  \\u0000 cannot be converted to text."
    )
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("x" * 500), max_chars=10) == "ValueError: xxxxxxxxxx"


def test_what_pydantic_found_wrong_is_one_line_without_the_values():
    """A message that fails its schema is logged or stored by where and why, never by what it held
    (anyone may have written it, and it may carry a request's secrets); pydantic's own text spans
    several lines and quotes the input."""
    from pydantic import ValidationError

    from common.errors import MAX_PROBLEMS, describe_invalid, validation_problems
    from common.schemas import DispatchBatch

    forged = b'{"dispatches": [{"execution_id": "hunter2", "attempt": "x"}], "n": 1}'
    with pytest.raises(ValidationError) as caught:
        DispatchBatch.model_validate_json(forged)
    assert "\n" in str(caught.value) and "hunter2" in str(caught.value)  # what the logs once carried
    line = describe_invalid(caught.value, root="message")
    assert "\n" not in line and "hunter2" not in line
    assert line.startswith("dispatches.0.execution_id: Input should be a valid UUID")
    assert "dispatches.0.attempt: Input should be a valid integer" in line
    with pytest.raises(ValidationError) as caught:
        DispatchBatch.model_validate_json(b"not JSON")
    assert describe_invalid(caught.value, root="message").startswith("message: Invalid JSON")
    many = b'{"dispatches": [' + b",".join([b"{}"] * 30) + b"]}"
    with pytest.raises(ValidationError) as caught:
        DispatchBatch.model_validate_json(many)
    problems = validation_problems(caught.value, root="message")
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1] == f"... and {60 - MAX_PROBLEMS} more"


class _LockConnection:
    """A worker's lock connection whose heartbeats get these answers in turn (an exception is raised)."""

    def __init__(self, answers: list[object]) -> None:
        self.answers, self.calls = answers, 0

    def is_closed(self) -> bool:
        return False

    async def fetchval(self, *_args: object, **_kwargs: object) -> object:
        answer = self.answers[self.calls]
        self.calls += 1
        if isinstance(answer, BaseException):
            raise answer
        return answer


async def test_a_heartbeat_left_mid_operation_by_a_timeout_is_tried_again_not_fatal():
    """During a PostgreSQL restart a heartbeat that timed out can leave its connection mid-operation,
    and the next query on it fails with asyncpg's InternalClientError. The heartbeat loop must ride
    that out like any other database trouble; it once killed the loop, and the worker with it."""
    import uuid
    from types import SimpleNamespace

    import asyncpg

    from worker.liveness import heartbeat_loop

    # The next heartbeat is answered: "this row is another process's" ends the loop.
    conn = _LockConnection(
        [asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"), None]
    )
    state = SimpleNamespace(
        cfg=SimpleNamespace(heartbeat_interval_s=0.05, health_file=None),
        settings=SimpleNamespace(executor=SimpleNamespace(heartbeat_staleness_multiplier=100.0)),
        lock_lost=asyncio.Event(), lock_conn=conn, running={}, name="w", incarnation=uuid.uuid4(),
        connection=SimpleNamespace(connected=asyncio.Event()), stood_down=False,
        log=SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None),
    )
    with pytest.raises(RuntimeError, match="belongs to another process"):
        await asyncio.wait_for(heartbeat_loop(state), timeout=10)  # type: ignore[arg-type]
    assert conn.calls == 2  # the failed heartbeat was followed by another


@pytest.mark.parametrize("claiming", [False, True])
async def test_registering_again_leaves_alone_a_run_a_claim_under_way_has_taken(claiming: bool) -> None:
    """Back from a stand-down, a worker registers again while a claim it began may just have
    committed: the run it took is `running` here but not yet started. Registration interrupts what
    runs here unstarted (a predecessor's runs) only when no claim is under way; the audit finds
    real orphans later."""
    import uuid
    from types import SimpleNamespace

    from common.queries import executions as q
    from common.settings import RecoverySettings
    from worker.liveness import _register_once

    row = {"id": uuid.uuid4(), "attempt": 1, "action_ref": "core.noop", "recovery_attempts": 0}
    asked: list[str] = []

    class Conn:
        async def fetchrow(self, query: str, *_args: object, **_kwargs: object) -> None:
            asked.append(query)
            return None  # no previous holder of the name; no interrupt matched

        async def fetch(self, query: str, *_args: object, **_kwargs: object) -> list[dict[str, object]]:
            asked.append(query)
            return [row] if query == q.SELECT_RUNNING_ON else []

        def transaction(self) -> Entered:
            return Entered(None)

    class Entered:
        """An async context manager that enters as ``value``."""

        def __init__(self, value: object) -> None:
            self.value = value

        async def __aenter__(self) -> object:
            return self.value

        async def __aexit__(self, *_exc: object) -> None:
            return None

    class Pool:
        def acquire(self) -> Entered:
            return Entered(Conn())

    state = SimpleNamespace(
        pool=Pool(), name="w", incarnation=uuid.uuid4(), lock_key=1, running={}, claiming=claiming, actions={},
        cfg=SimpleNamespace(runtimes=["python"], max_concurrent_tasks=1, heartbeat_interval_s=1.0, queue_ttl_s=300.0),
        settings=SimpleNamespace(recovery=RecoverySettings()),
        log=SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None),
    )
    await _register_once(state)  # type: ignore[arg-type]
    assert (q.INTERRUPT in asked) is not claiming


async def test_within_bounds_an_operation_that_is_slow_to_unwind_after_its_cancel():
    """`asyncio.wait_for` would wait for the cancelled operation to unwind (asyncpg's, on a network
    that swallows packets: a minute); `within` leaves it behind and returns on time."""
    from common.deadline import within

    unwound = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(asyncio.sleep(0.5))  # cleanup that outlasts the bound
            unwound.set()

    with pytest.raises(TimeoutError, match=r"stubborn_step did not finish within 0\.05 s"):
        await within(stubborn(), 0.05, what="stubborn_step")
    assert not unwound.is_set()  # returned before the operation had unwound
    await asyncio.wait_for(unwound.wait(), 5)  # it still ends, in the background


async def test_within_returns_the_result_and_raises_the_error_of_an_operation_in_time():
    from common.deadline import within

    async def answer() -> int:
        return 42

    async def broken() -> None:
        raise ValueError("no")

    assert await within(answer(), 1, what="answer") == 42
    with pytest.raises(ValueError, match="no"):
        await within(broken(), 1, what="broken")


async def test_until_available_waits_out_an_outage_saying_so_and_retries_nothing_else():
    import asyncpg

    from common.db import until_available

    calls: list[int] = []

    def failing(times: int, error: BaseException):
        async def operation() -> str:
            calls.append(1)
            if len(calls) <= times:
                raise error
            return "done"

        return operation

    with capture_logs() as logs:
        assert await until_available(failing(1, ConnectionRefusedError("not yet")), what="claim") == "done"
    assert len(calls) == 2
    [line] = [entry for entry in logs if entry["event"] == "waiting_for_service"]
    assert (line["dependency"], line["operation"], line["error"]) == (
        "PostgreSQL", "claim", "ConnectionRefusedError: not yet",
    )
    for error in (asyncpg.exceptions.InvalidPasswordError("no"), ValueError("a bug")):
        calls.clear()
        with pytest.raises(type(error)):
            await until_available(failing(1, error), what="claim")
        assert len(calls) == 1
    # Gone for longer than the first try: the retry loop takes over, and gives up in the end.
    calls.clear()
    with pytest.raises(ConnectionRefusedError):
        await until_available(failing(10, ConnectionRefusedError("down")), what="claim", max_wait_s=0.3)
    assert 2 <= len(calls) < 10


def test_a_broker_connect_that_fails_leaves_no_connection_to_close_itself_later():
    """A connection whose first connect failed was dropped unclosed; garbage collected later, it
    closed itself on whatever event loop ran then, and that close failed unread ("Task exception
    was never retrieved", which a test running at the time reported as its own)."""
    import gc

    import aio_pika
    import aiormq.exceptions
    import uvloop

    from common import amqp

    async def refused() -> None:
        with pytest.raises(aiormq.exceptions.AMQPConnectionError):
            await amqp.connect("amqp://guest:guest@127.0.0.1:1/", max_wait_s=0.3)

    reported: list[str] = []

    async def later() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        gc.collect()
        await asyncio.sleep(0.05)

    first = uvloop.new_event_loop()
    gc.disable()  # what the failed attempts left stays in memory until collected, on the other loop
    try:
        first.run_until_complete(refused())
        left = [o for o in gc.get_objects() if isinstance(o, aio_pika.RobustConnection) and not o.is_closed]
        uvloop.run(later())
    finally:
        gc.enable()
        first.close()
    assert left == [] and reported == []


async def test_a_stood_down_worker_whose_pool_hangs_keeps_beating_and_tries_again():
    """Back from a stand-down, a worker registers again through its pool. A pool that never
    answers (the network swallowing its packets, or every connection held up) once held the
    heartbeat loop, and the worker stayed away for good; now each try is bounded, the heartbeats
    go on, and the next beat tries again."""
    import uuid
    from types import SimpleNamespace

    from worker.liveness import heartbeat_loop

    class Hanging:
        async def __aenter__(self) -> None:
            await asyncio.Event().wait()

        async def __aexit__(self, *_exc: object) -> None:
            return None

    warnings: list[tuple[str, dict[str, object]]] = []
    conn = _LockConnection(["lost", "lost", "lost", None])  # then: "another process's row" ends the loop
    state = SimpleNamespace(
        cfg=SimpleNamespace(heartbeat_interval_s=0.05, health_file=None),
        settings=SimpleNamespace(executor=SimpleNamespace(heartbeat_staleness_multiplier=4.0)),
        lock_lost=asyncio.Event(), lock_conn=conn, running={}, name="w", incarnation=uuid.uuid4(),
        connection=SimpleNamespace(connected=asyncio.Event()), stood_down=True, draining=False,
        pool=SimpleNamespace(acquire=Hanging),
        log=SimpleNamespace(warning=lambda event, **k: warnings.append((event, k)), info=lambda *a, **k: None),
    )
    with pytest.raises(RuntimeError, match="belongs to another process"):
        await asyncio.wait_for(heartbeat_loop(state), timeout=10)  # type: ignore[arg-type]
    assert conn.calls == 4
    assert [k["error"] for e, k in warnings if e == "reregister_failed"] == [
        "TimeoutError: reregister did not finish within 0.2 s"
    ] * 3


class _StatusConnection:
    """A lock connection that records the status changes sent through it (or fails them)."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[str] = []
        self.fail = fail

    async def fetch(self, query: str, *_args: object, **_kwargs: object) -> list[object]:
        from common.queries import workers as wq

        if self.fail:
            raise ConnectionResetError("the lock connection dropped")
        self.sent.append({wq.STOP_TAKING_WORK: "draining", wq.TAKE_WORK_AGAIN: "active"}[query])
        return []


def _watched_state(conn: _StatusConnection, *, failing_for_s: float | None, inbox: int = 0):
    """A worker taking work whose pool probes have failed for ``failing_for_s`` (first failure to
    last; None: the last went through)."""
    import time
    import uuid
    from types import SimpleNamespace

    now = time.monotonic()
    state = SimpleNamespace(
        name="w", incarnation=uuid.uuid4(), lock_conn=conn, draining=False, stood_down=False, pools_out=False,
        pools_failing_since=None if failing_for_s is None else now - failing_for_s, pools_last_failed_at=now,
        pools_transition=asyncio.Lock(), resumed=asyncio.Event(), abandon_claim=asyncio.Event(), mail=asyncio.Event(),
        inbox=[object()] * inbox, running={}, claiming=False, abandoned=[], abandoned_calls=set(),
        log=SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None),
    )
    state.resumed.set()
    return state


async def test_a_worker_stops_taking_work_only_after_its_pools_failed_for_a_window_and_hands_back_once_marked(
    monkeypatch,
):
    from worker import claiming, pool_watch

    handed_back: list[int] = []

    async def hand_back(state) -> int:
        handed_back.append(len(state.inbox))
        state.inbox = []
        return handed_back[-1]

    monkeypatch.setattr(claiming, "hand_back", hand_back)
    # No probe has failed (a slow start), the failures span less than the window, or one failure
    # came long ago (a heartbeat outage held the probes up since): nothing changes.
    for failing, last_failed_ago_s in ((None, 0.0), (0.5, 0.0), (0.0, 60.0)):
        conn = _StatusConnection()
        state = _watched_state(conn, failing_for_s=failing, inbox=2)
        state.pools_last_failed_at -= last_failed_ago_s
        if failing is not None:
            state.pools_failing_since = state.pools_last_failed_at - failing
        await pool_watch.reconcile(state, "active", stale_after_s=1.0, timeout_s=1.0)
        assert (state.pools_out, conn.sent, handed_back) == (False, [], [])
    # Failing for longer than the window, but the mark does not go through: nothing is handed back
    # (behind an `active` row a hand-back is taken for a forgery); the next heartbeat tries again.
    state = _watched_state(_StatusConnection(fail=True), failing_for_s=1.5, inbox=2)
    await pool_watch.reconcile(state, "active", stale_after_s=1.0, timeout_s=1.0)
    assert state.pools_out and not state.resumed.is_set() and handed_back == []
    assert not state.abandon_claim.is_set()  # a claim under way is not let go of before the mark either
    state.lock_conn = conn = _StatusConnection()
    await pool_watch.reconcile(state, "active", stale_after_s=1.0, timeout_s=1.0)
    assert conn.sent == ["draining"] and handed_back == [2] and state.abandon_claim.is_set()
    # Marked: what comes back to the inbox later (a held-up claim's dispatches) goes at the next beat.
    state.inbox = [object()]
    await pool_watch.reconcile(state, "draining", stale_after_s=1.0, timeout_s=1.0)
    assert conn.sent == ["draining"] and handed_back == [2, 1]
    # A row left `draining` by a late mark while the worker takes work is put right.
    state.pools_out, state.pools_failing_since = False, None
    await pool_watch.reconcile(state, "draining", stale_after_s=1.0, timeout_s=1.0)
    assert conn.sent == ["draining", "active"]
    # A worker that drains marks its row itself, through the pool; if that mark failed (the row
    # still `active`), it is made here, through the lock connection.
    state.draining = True
    await pool_watch.reconcile(state, "draining", stale_after_s=1.0, timeout_s=1.0)
    assert conn.sent == ["draining", "active"]
    await pool_watch.reconcile(state, "active", stale_after_s=1.0, timeout_s=1.0)
    assert conn.sent == ["draining", "active", "draining"]


async def test_a_worker_takes_work_again_once_its_pools_answer_and_nothing_is_left_to_put_back(monkeypatch):
    from worker import claiming, pool_watch

    unclaimed: list[bool] = []
    settles = [False, True]

    async def unclaim_abandoned(state) -> bool:
        unclaimed.append(True)
        return settles.pop(0)

    monkeypatch.setattr(claiming, "unclaim_abandoned", unclaim_abandoned)
    state = _watched_state(_StatusConnection(), failing_for_s=None)
    state.pools_out = True
    state.resumed.clear()
    state.abandon_claim.set()
    # The claim loop has not come back from the claim it let go of: nothing is recorded to put back yet.
    state.claiming = True
    await pool_watch.take_work_again(state)
    assert state.pools_out and unclaimed == []
    # What the abandoned claim may have committed could not be put back: not yet.
    state.claiming = False
    await pool_watch.take_work_again(state)
    assert state.pools_out and not state.resumed.is_set() and unclaimed == [True]
    # Now it is: claiming again, nothing let go of any more.
    await pool_watch.take_work_again(state)
    assert not state.pools_out and state.resumed.is_set() and not state.abandon_claim.is_set()
    # A drain that began meanwhile settles the rest itself.
    settles.append(True)
    state.pools_out, state.draining = True, True
    state.resumed.clear()
    await pool_watch.take_work_again(state)
    assert state.pools_out and not state.resumed.is_set()


@pytest.mark.parametrize("next_attempt_started", [False, True])
async def test_the_control_check_stops_the_run_it_asked_about_not_a_next_attempt_started_meanwhile(
    next_attempt_started: bool,
) -> None:
    """A control check asks whether attempt 2 still runs here. While the query is under way, that
    run may end and attempt 3 of the same execution start here (a workflow woken): the answer
    ("attempt 2 no longer runs here") is not about attempt 3, which must go on. A chaos soak saw
    the new attempt stopped, and recovered for nothing."""
    import uuid
    from types import SimpleNamespace

    from worker.recording import stop_if_moved_on

    execution_id = uuid.uuid4()
    checked = asyncio.ensure_future(asyncio.Event().wait())
    successor = asyncio.ensure_future(asyncio.Event().wait())
    state = SimpleNamespace(
        running={execution_id: checked}, running_attempts={execution_id: 2}, stopped=set(), name="w",
        incarnation=uuid.uuid4(), log=SimpleNamespace(warning=lambda *a, **k: None),
    )

    class Pool:
        async def fetch(self, _query: str, ids: list[uuid.UUID], attempts: list[int], *_a: object, **_k: object):
            assert (ids, attempts) == ([execution_id], [2])
            if next_attempt_started:
                state.running[execution_id], state.running_attempts[execution_id] = successor, 3
            return [{"id": execution_id, "status": "running"}]

    state.pool = Pool()
    try:
        await stop_if_moved_on(state, [execution_id])  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert successor.cancelled() is False
        assert checked.cancelled() is not next_attempt_started
        assert state.stopped == (set() if next_attempt_started else {execution_id})
    finally:
        checked.cancel()
        successor.cancel()


@pytest.mark.parametrize("claim_ends_s", [0.1, None])
async def test_unclaiming_waits_for_the_abandoned_claim_and_says_whether_it_had_ended(
    monkeypatch, claim_ends_s: float | None
) -> None:
    """An abandoned claim may still commit until its cancel reaches the server: UNCLAIM looks only
    once it has ended (bounded), and says whether it had, so that what it may commit later is not
    forgotten. What runs here is never put back."""
    import uuid
    from types import SimpleNamespace

    from worker import claiming

    monkeypatch.setattr(claiming, "UNCLAIM_MAX_WAIT_S", 0.3)
    held_up, running = uuid.uuid4(), uuid.uuid4()
    claim = asyncio.ensure_future(asyncio.sleep(claim_ends_s if claim_ends_s is not None else 60))
    looked: list[tuple[bool, list[uuid.UUID]]] = []

    class Pool:
        async def fetch(self, _query: str, ids: list[uuid.UUID], *_args: object, **_kwargs: object) -> list[object]:
            looked.append((claim.done(), ids))
            return []

    state = SimpleNamespace(
        pool=Pool(), name="w", incarnation=uuid.uuid4(), abandoned=[(held_up, 1), (running, 1)],
        abandoned_calls={claim}, running={running: object()},
        log=SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None),
    )
    try:
        settled = await claiming.unclaim_abandoned(state)  # type: ignore[arg-type]
    finally:
        claim.cancel()
    assert looked == [(claim_ends_s is not None, [held_up])]
    assert settled is (claim_ends_s is not None)


async def test_a_next_attempt_whose_run_before_is_let_go_of_during_the_claim_is_claimed_not_stranded() -> None:
    """A dispatch of an execution's next attempt that comes while this worker still runs the attempt
    before waits for that run to be let go of (deferred). A suite run saw the run let go of (a
    cancel) while the claim was under way, after the dispatch was judged "later" and before it was
    deferred: nothing was ever going to release it, and the retried run never started."""
    import uuid
    from types import SimpleNamespace

    from common.schemas import Dispatch
    from worker import claiming
    from worker.state import Delivery

    execution_id = uuid.uuid4()
    acked: list[int] = []
    message = SimpleNamespace(processed=False, channel=object())

    async def ack(multiple: bool = False) -> None:
        acked.append(1)
        message.processed = True

    message.ack = ack
    state = SimpleNamespace(
        running={execution_id: object()}, running_attempts={execution_id: 1}, deferred={}, inbox=[],
        mail=asyncio.Event(), slots=asyncio.Semaphore(2), abandon_claim=asyncio.Event(),
        log=SimpleNamespace(info=lambda *a, **k: None),
    )
    asyncio.get_running_loop().call_soon(lambda: (state.running.clear(), state.running_attempts.clear()))
    dispatch = Dispatch(execution_id=execution_id, attempt=2)
    await state.slots.acquire()
    await claiming._claim(state, [(dispatch, Delivery(message, 1))])  # type: ignore[arg-type]
    assert state.deferred == {}
    assert [d for d, _ in state.inbox] == [dispatch] and state.mail.is_set()
    assert acked == [1]  # its message is settled with the batch's, as a deferred one's is


def test_an_allowance_bounds_each_step_by_what_is_left_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The steps of a worker's stop after its drain's deadline share one allowance: each gets the
    lesser of its own bound and what is left, and nothing once it is spent."""
    from common import deadline

    now = [100.0]
    monkeypatch.setattr(deadline.time, "monotonic", lambda: now[0])
    allowance = deadline.Allowance(10.0)
    assert allowance.left_s() == deadline.STOP_STEP_TIMEOUT_S  # its own bound first
    assert allowance.left_s(30.0) == 10.0
    now[0] += 7.5  # a step that took its time
    assert allowance.left_s() == 2.5
    assert allowance.left_s(reserve_s=2.0) == 0.5  # what must come after it keeps its share
    now[0] += 5.0
    assert allowance.left_s() == 0.0 and allowance.left_s(30.0) == 0.0
