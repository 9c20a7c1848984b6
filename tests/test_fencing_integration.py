"""A dispatch whose attempt has moved on is acked and dropped; it never runs."""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
import pytest

from common import amqp
from tests.harness import AMQP_URL, wait_until

pytestmark = pytest.mark.integration


async def test_stale_dispatch_is_dropped(baton):
    executor, worker = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    done = await client.run("core.echo", {"message": "real"}, wait_timeout_s=20)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(baton.names.dispatch_exchange)
        # One message of two stale dispatches (one claimed before, one of an attempt never made),
        # and one of a dispatch for an execution that does not exist; extra fields are ignored.
        stale = [
            {"execution_id": done["id"], "attempt": 1, "action_ref": "core.echo", "parameters": {"message": "zombie"}},
            {"execution_id": done["id"], "attempt": 7},
        ]
        for dispatches in (stale, [{"execution_id": str(uuid.uuid4()), "attempt": 1}]):
            await exchange.publish(
                aio_pika.Message(json.dumps({"dispatches": dispatches}, default=str).encode()),
                routing_key=amqp.Names.worker_routing_key("w1"),
            )
        # A forged value is never quoted back (it may be a request's secret, sent to the wrong queue).
        forged = b'{"dispatches": [{"execution_id": "hunter2", "attempt": 1}]}'
        for invalid in (b"not a dispatch", b'{"dispatches": []}', forged):
            await exchange.publish(aio_pika.Message(invalid), routing_key=amqp.Names.worker_routing_key("w1"))
    finally:
        await connection.close()
    await wait_until(lambda: _count(worker, "dispatch_stale", 3), what="three stale dispatches dropped")
    await wait_until(lambda: _count(worker, "dispatch_invalid", 3), what="the invalid dispatches dropped")
    assert await baton.queue_depth(baton.names.worker_queue("w1")) == 0
    row = await baton.execution(done["id"])
    assert row["status"] == "completed" and row["result"] == {"message": "real"} and row["last_event_seq"] == 4
    # The malformed ones were dead-lettered and logged by the executor, not lost silently.
    await wait_until(lambda: _count(executor, "dead_letter_invalid", 3), what="the dead letters to be logged")
    for event in worker.events("dispatch_invalid") + executor.events("dead_letter_invalid"):
        assert "\n" not in event["error"] and "hunter2" not in event["error"], event
    assert any(
        e["error"].startswith("dispatches.0.execution_id: Input should be a valid UUID") for e in worker.events("dispatch_invalid")
    ), worker.events("dispatch_invalid")
    assert await baton.queue_depth(baton.names.dead_letters_queue) == 0


async def test_a_forged_dead_letter_never_stalls_the_handler(baton):
    """Dead letters with headers RabbitMQ would never write, more of them than the handler's
    prefetch: each is settled (the handler once raised on them and left them unacked, and after
    50 it received nothing more), and a real one is still handled after them."""
    from executor.dead_letters import PREFETCH

    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    body = json.dumps({"dispatches": [{"execution_id": str(uuid.uuid4()), "attempt": 1}]}).encode()
    forged_headers = [{"x-death": "boom"}, {"x-death": [1]}, {"x-first-death-reason": 123}]
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(baton.names.dlx)
        for k in range(PREFETCH + 10):
            await exchange.publish(aio_pika.Message(body, headers=forged_headers[k % 3]), routing_key="")
        await exchange.publish(aio_pika.Message(body, headers={"x-first-death-reason": "expired"}), routing_key="")
    finally:
        await connection.close()
    dropped = lambda: _count(executor, "dead_letter_dropped", PREFETCH + 11)  # noqa: E731
    await wait_until(dropped, what="every dead letter settled")
    reasons = [e["death_reason"] for e in executor.events("dead_letter_dropped")]
    assert reasons.count("unknown") == PREFETCH + 10 and reasons.count("expired") == 1
    assert not executor.events("dead_letter_failed")


async def _count(service, event: str, n: int) -> bool:
    return len(service.events(event)) >= n


async def test_the_claim_is_fenced_and_idempotent(baton):
    """A retried claim (its first commit unacknowledged) gets the row back; nobody else can."""
    from worker.claiming import claim_rows

    pool = await baton.pool()
    execution_id = uuid.uuid4()
    # A claim is made by a registered worker process (its name and incarnation).
    incarnation = uuid.uuid4()
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
        "last_heartbeat, incarnation) VALUES ('w1', 'active', '{python}', '{core.noop}', 1, 0.2, now(), $1)",
        incarnation,
    )
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker) VALUES ($1, 'core.noop', 'scheduled', 2, 'w1')",
        execution_id,
    )
    assert await claim_rows(pool, [execution_id], [1], "w1", incarnation) == []  # an older attempt
    assert await claim_rows(pool, [execution_id], [2], "w2", incarnation) == []  # another worker
    assert [r["id"] for r in await claim_rows(pool, [execution_id], [2], "w1", incarnation)] == [execution_id]
    assert [r["id"] for r in await claim_rows(pool, [execution_id], [2], "w1", incarnation)] == [execution_id]
    row = await baton.execution(execution_id)
    assert row["status"] == "running" and row["last_event_seq"] == 1  # started once, one event


async def test_a_run_is_this_workers_only_at_the_attempt_it_runs(baton):
    """The control check (`NO_LONGER_MINE`) stops a run whose row moved on: cancelled, to another
    worker or process, or to a later attempt, even one placed back on this same process."""
    from common.queries import workflows as wfq

    pool = await baton.pool()
    incarnation = uuid.uuid4()
    rows = {
        "mine": ("running", 2, "w1", incarnation),
        "cancelled": ("cancelled", 2, "w1", incarnation),
        "elsewhere": ("running", 2, "w2", incarnation),
        "restarted": ("running", 2, "w1", uuid.uuid4()),
        "later_attempt_here": ("running", 3, "w1", incarnation),
    }
    ids = {name: uuid.uuid4() for name in rows}
    for name, (status, attempt, worker, runs_in) in rows.items():
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status, attempt, worker, incarnation) "
            "VALUES ($1, 'core.noop', $2, $3, $4, $5)",
            ids[name], status, attempt, worker, runs_in,
        )
    found = await pool.fetch(wfq.NO_LONGER_MINE, list(ids.values()), [2] * len(ids), "w1", incarnation)
    assert {r["id"] for r in found} == {ids[n] for n in rows if n != "mine"}


async def test_what_an_abandoned_claim_took_unseen_goes_back_in_line_at_no_cost(baton):
    """A drain that stops waiting for a claim the database holds up may miss the claim's commit:
    the rows it took are `running` on this process, with nothing running them. They go back to
    `requested` without spending a dispatch; the process's other runs, and another process's, stay."""
    from types import SimpleNamespace

    from worker.claiming import unclaim_abandoned

    pool = await baton.pool()
    incarnation, other_incarnation = uuid.uuid4(), uuid.uuid4()
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
        "last_heartbeat, incarnation) VALUES ('w1', 'draining', '{python}', '{core.noop}', 4, 0.2, now(), $1)",
        incarnation,
    )
    taken, running, elsewhere, started_here = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for execution_id, owner in (
        (taken, incarnation), (running, incarnation), (elsewhere, other_incarnation), (started_here, incarnation)
    ):
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status, attempt, worker, incarnation, schedule_attempts) "
            "VALUES ($1, 'core.noop', 'running', 3, 'w1', $2, 0)", execution_id, owner,
        )
    events: list[tuple[str, dict]] = []
    state = SimpleNamespace(
        pool=pool, name="w1", incarnation=incarnation,
        abandoned=[(taken, 3), (elsewhere, 3), (running, 2), (started_here, 3)], abandoned_calls=set(),
        # Claimed again once the database answered, and started here: not put back.
        running={started_here: object()},
        log=SimpleNamespace(info=lambda event, **kw: events.append((event, kw)), warning=None),
    )
    await unclaim_abandoned(state)  # type: ignore[arg-type]
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, status, worker, schedule_attempts FROM executions")}
    assert (rows[taken]["status"], rows[taken]["worker"], rows[taken]["schedule_attempts"]) == ("requested", None, 0)
    assert rows[running]["status"] == rows[elsewhere]["status"] == rows[started_here]["status"] == "running"
    event = await pool.fetchrow(
        "SELECT type, data FROM execution_events WHERE execution_id = $1 ORDER BY seq DESC LIMIT 1", taken
    )
    assert event["type"] == "execution.rescheduled" and event["data"]["attempt"] == 3
    assert "held up by the database" in event["data"]["reason"]
    assert [e for e, _ in events] == ["execution_rescheduled"]


async def test_a_next_attempt_placed_before_the_last_one_was_let_go_waits_for_it(baton):
    """An attempt's outcome commits (a retry with no delay, a wake-up) and the executor places the
    next attempt on the same worker before that worker has let go of the first (its task is
    released just after the commit's reply). That dispatch was once taken for a redelivery, and
    the execution waited, `scheduled`, for the scheduled-timeout monitor. It now waits for the
    release, then is claimed (its message is acked at once, in delivery order with the others)."""
    from common.schemas import Dispatch
    from worker import claiming, recording
    from worker.state import Delivery, WorkerState

    class Message:
        processed = False
        channel = object()

        async def ack(self, multiple: bool = False) -> None:
            self.processed = True

    pool = await baton.pool()
    state = WorkerState(baton.settings(), "w1", actions={})
    state.pool = state.hot_pool = pool
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
        "last_heartbeat, incarnation) VALUES ('w1', 'active', '{python}', '{core.noop}', 4, 0.2, now(), $1)",
        state.incarnation,
    )
    execution_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker) VALUES ($1, 'core.noop', 'scheduled', 2, 'w1')",
        execution_id,
    )
    first = asyncio.create_task(asyncio.sleep(3600))  # attempt 1, recorded but not yet let go
    state.running[execution_id], state.running_attempts[execution_id] = first, 1
    await state.slots.acquire()
    message = Message()
    entry = (Dispatch(execution_id=execution_id, attempt=2), Delivery(message, 1))  # type: ignore[arg-type]
    try:
        await state.slots.acquire()  # as the claim loop does for each dispatch it takes
        await claiming._claim(state, [entry])
        assert message.processed and [d for d, _ in state.deferred[execution_id]] == [entry[0]]
        assert (await baton.execution(execution_id))["status"] == "scheduled"
        recording._release(state, execution_id)  # attempt 1 let go: the next one is back in the inbox
        assert [d for d, _ in state.inbox] == [entry[0]] and not state.deferred
        await state.slots.acquire()
        await claiming._claim(state, [state.inbox.popleft()])
        row = await baton.execution(execution_id)
        assert (row["status"], row["attempt"], row["incarnation"]) == ("running", 2, state.incarnation)
        assert state.running_attempts[execution_id] == 2
    finally:
        first.cancel()
        for task in state.running.values():
            task.cancel()
        await asyncio.gather(first, *state.running.values(), return_exceptions=True)
