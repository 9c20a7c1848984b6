"""DESIGN sections 4 and 5 with real processes and real signals: workers that die, hang, or are
stopped; dispatches that expire; the scheduled-timeout monitor."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.integration

RECOVER = {"BATON__RECOVERY__RECOVER_ON_WORKER_LOSS": "true"}


async def _running_on(baton, execution_id, worker: str) -> dict:
    async def check():
        row = await baton.execution(execution_id)
        return row if row["status"] == "running" and row["worker"] == worker else None

    return await wait_until(check, what=f"execution {execution_id} running on {worker}")


async def _events(baton, execution_id) -> list[dict]:
    rows = await (await baton.pool()).fetch(
        "SELECT seq, type, data FROM execution_events WHERE execution_id = $1 ORDER BY seq", execution_id
    )
    return [dict(r) for r in rows]


async def _worker_status(baton, name: str) -> str:
    return await (await baton.pool()).fetchval("SELECT status FROM workers WHERE name = $1", name)


async def test_sigkill_transient_run_fails_with_reason_and_scheduled_work_moves(baton):
    # Work waits in the busy worker's queue (a pipeline beyond its one slot), not as requested.
    _, doomed = await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__DISPATCH_PIPELINE="3"),
        baton.spawn_worker("doomed", concurrency=1),
    )
    client = await baton.client()
    running = await client.submit("core.sleep", {"seconds": 30}, watch=True)
    await _running_on(baton, running.execution_id, "doomed")
    queued = [await client.submit("core.echo", {"message": f"q{i}"}, watch=True) for i in range(3)]
    for s in queued:
        row = await baton.wait_status(s.execution_id, "scheduled")
        assert row["worker"] == "doomed"
    await baton.start_worker("survivor", concurrency=2)

    doomed.signal(signal.SIGKILL)
    doomed.wait()
    failed = await client.wait(running.execution_id, 20)
    assert failed["status"] == "failed"
    assert "recover_on_worker_loss is off" in failed["error"]["error"]
    assert failed["error"]["failed_by"] == "recovery"
    interrupted = [e for e in failed["events"] if e["type"] == "workflow.interrupted"]
    assert len(interrupted) == 1
    data = interrupted[0]["data"]
    assert data["reason"] == "worker_lost" and data["worker_id"] == "doomed"
    assert data["recoverable"] is False and data["recovery_attempt"] == 0
    assert data["last_event_sequence"] == interrupted[0]["seq"] - 1 and "lost" in data["error"]
    for s in queued:
        done = await client.wait(s.execution_id, 20)
        assert done["status"] == "completed" and done["worker"] == "survivor" and done["attempt"] == 2
    assert await _worker_status(baton, "doomed") == "lost"


async def test_sigkill_recoverable_run_restarts_on_another_worker(baton):
    executor, doomed = await baton.started(
        baton.spawn_executor(**RECOVER), baton.spawn_worker("doomed", concurrency=1)
    )
    client = await baton.client()
    sub = await client.submit("tests.sleep_then_echo", {"seconds": 1.0, "message": "again"}, watch=True)
    await _running_on(baton, sub.execution_id, "doomed")
    # Killed before the survivor starts: a second's action could otherwise end while it boots.
    doomed.signal(signal.SIGKILL)
    await baton.start_worker("survivor")
    done = await client.wait(sub.execution_id, 30)
    assert done["status"] == "completed" and done["worker"] == "survivor"
    assert done["result"] == {"message": "again"} and done["recovery_attempts"] == 1 and done["attempt"] == 2
    types = [e["type"] for e in done["events"]]
    assert types.index("workflow.interrupted") < types.index("execution.recovering") < types.index("execution.completed")
    interrupted = next(e for e in done["events"] if e["type"] == "workflow.interrupted")
    assert interrupted["data"]["recoverable"] is True and interrupted["data"]["recovery_attempt"] == 1
    lost = executor.events("worker_lost")
    assert [(e["worker"], e["signal"]) for e in lost] == [("doomed", "process_died")]


@pytest.mark.parametrize(
    ("env", "action_ref"),
    [
        # The YAML allows one recovery.
        ({"BATON__RECOVERY__RECOVER_ON_WORKER_LOSS": "true", "BATON__RECOVERY__MAX_RECOVERY_ATTEMPTS": "1"}, "core.sleep"),
        # The YAML says no recovery; tests.restartable's decorator says recover, at most once: it wins.
        ({"BATON__RECOVERY__RECOVER_ON_WORKER_LOSS": "false", "BATON__RECOVERY__MAX_RECOVERY_ATTEMPTS": "5"}, "tests.restartable"),
    ],
)
async def test_recovery_attempts_are_capped(baton, env, action_ref):
    baton.env.update(env)
    await baton.start_executor()
    client = await baton.client()
    first = await baton.start_worker("first", concurrency=1)
    sub = await client.submit(action_ref, {"seconds": 30}, watch=True)
    await _running_on(baton, sub.execution_id, "first")
    second = await baton.start_worker("second", concurrency=1)
    first.signal(signal.SIGKILL)
    await _running_on(baton, sub.execution_id, "second")
    second.signal(signal.SIGKILL)
    failed = await client.wait(sub.execution_id, 20)
    assert failed["status"] == "failed" and failed["recovery_attempts"] == 1
    assert "used all 1 recovery attempts (max_recovery_attempts = 1)" in failed["error"]["error"]


async def test_sigstop_hung_worker_is_lost_and_its_late_writes_are_fenced(baton):
    executor, hung = await baton.started(
        baton.spawn_executor(**RECOVER), baton.spawn_worker("hung", concurrency=1)
    )
    client = await baton.client()
    sub = await client.submit("tests.sleep_then_echo", {"seconds": 1.0, "message": "mine"}, watch=True)
    await _running_on(baton, sub.execution_id, "hung")
    # Frozen before the healthy worker starts: a second's action could otherwise end while it boots.
    hung.signal(signal.SIGSTOP)
    try:
        await baton.start_worker("healthy")
        done = await client.wait(sub.execution_id, 30)
        assert done["status"] == "completed" and done["worker"] == "healthy" and done["attempt"] == 2
        assert await _worker_status(baton, "hung") == "lost"
        assert [e["signal"] for e in executor.events("worker_lost")] == ["heartbeat_stale"]
    finally:
        hung.signal(signal.SIGCONT)
    # The zombie wakes up and writes for its copy (attempt 1): the outcome if the copy finished
    # first, else the interruption when it stands down. Either write is refused (and logged as
    # refused, not as done); then it comes back.
    await wait_until(lambda: _logged(hung, "worker_reregistered"), what="the hung worker to re-register")

    async def late_write_made():
        return [
            e for e in hung.log_lines()
            if e.get("event") in ("outcome_fenced", "interrupt_fenced")
            and e.get("execution_id") == str(sub.execution_id) and e.get("attempt") == 1
        ]

    await wait_until(late_write_made, what="the hung worker's late write for its copy")
    after = await baton.execution(sub.execution_id)
    assert (after["status"], after["worker"], after["attempt"], after["last_event_seq"]) == (
        "completed", "healthy", 2, done["events"][-1]["seq"]
    )
    assert hung.events("worker_standing_down")
    assert await _worker_status(baton, "hung") == "active"


async def test_sigterm_drains_in_flight_and_hands_back_the_rest(baton):
    # Work waits in the busy worker's queue (a pipeline beyond its one slot), not as requested.
    _, leaving = await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__DISPATCH_PIPELINE="3"),
        baton.spawn_worker("leaving", concurrency=1),
    )
    client = await baton.client()
    in_flight = await client.submit("tests.sleep_then_echo", {"seconds": 2.5, "message": "finished"}, watch=True)
    await _running_on(baton, in_flight.execution_id, "leaving")
    queued = [await client.submit("core.echo", {"message": f"q{i}"}, watch=True) for i in range(3)]
    for s in queued:
        assert (await baton.wait_status(s.execution_id, "scheduled"))["worker"] == "leaving"

    signalled_at = await (await baton.pool()).fetchval("SELECT now()")
    leaving.signal(signal.SIGTERM)
    # Started once the drain is under way, so that the in-flight run cannot end (and free the slot
    # for what is queued) while it boots: what was handed back waits for it as `requested`.
    await baton.start_worker("staying")
    done = await client.wait(in_flight.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == "leaving" and done["result"] == {"message": "finished"}
    for s in queued:
        moved = await client.wait(s.execution_id, 20)
        assert moved["status"] == "completed" and moved["worker"] == "staying"
        assert moved["schedule_attempts"] == 0  # the hand-back cost it no dispatch (reset at start)
    assert leaving.wait(20) == 0
    assert await _worker_status(baton, "leaving") == "inactive"
    late = await (await baton.pool()).fetchval(
        "SELECT count(*) FROM execution_events WHERE type = 'execution.scheduled' AND data->>'worker' = 'leaving' "
        "AND created_at > $1",
        signalled_at,
    )
    assert late == 0
    assert leaving.events("worker_draining") and leaving.events("worker_inactive")


async def test_work_longer_than_the_drain_timeout_is_interrupted_with_reason_signal(baton):
    baton.env.update(RECOVER)  # one configuration for every service, as in a deployment
    _, leaving = await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("leaving", concurrency=2, BATON__WORKER__SHUTDOWN_TIMEOUT="0.5"),
    )
    client = await baton.client()
    long_run = await client.submit("tests.sleep_then_echo", {"seconds": 3, "message": "resumed"}, watch=True)
    await _running_on(baton, long_run.execution_id, "leaving")
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(20) == 0
    row = await baton.wait_status(long_run.execution_id, "interrupted", "requested")
    interrupted = [e for e in await _events(baton, long_run.execution_id) if e["type"] == "workflow.interrupted"]
    data = interrupted[0]["data"]
    assert data["reason"] == "signal" and data["worker_id"] == "leaving" and data["recoverable"] is True
    await baton.start_worker("next")
    done = await client.wait(long_run.execution_id, 30)
    assert done["status"] == "completed" and done["worker"] == "next" and done["recovery_attempts"] == 1
    assert row["attempt"] == 1


async def test_a_synchronous_action_past_the_drain_deadline_does_not_hold_up_the_exit(baton):
    """A synchronous action runs on a thread that its run's cancel cannot stop: past the drain's
    deadline the run is interrupted, the process exits without waiting for the thread (it held up
    the exit for the whole action before), and the worker is left `draining`, not marked `inactive`
    while its action still ran."""
    _, leaving = await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("leaving", concurrency=2, BATON__WORKER__SHUTDOWN_TIMEOUT="0.5"),
    )
    client = await baton.client()
    blocked = await client.submit("tests.blocking_sleep", {"seconds": 120})
    await _running_on(baton, blocked.execution_id, "leaving")
    leaving.signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.wait, 40) == 0
    [left] = [e for e in leaving.events("tasks_left_behind") if e["kind"] == "sync_actions"]
    assert left["count"] == 1 and not leaving.events("worker_inactive")
    await baton.wait_status(blocked.execution_id, "failed", "interrupted", "requested")
    pool = await baton.pool()
    assert await pool.fetchval("SELECT status FROM workers WHERE name = 'leaving'") in ("draining", "lost")


async def test_a_full_worker_still_drains_within_its_timeout(baton):
    """Every slot busy with long work and a dispatch prefetched: the drain must not wait for a
    slot to free up; the prefetched dispatch goes back, the run is interrupted at the deadline."""
    # A pipeline of one: the second execution is dispatched to the busy worker, not kept as requested.
    executor, full = await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__DISPATCH_PIPELINE="1"),
        baton.spawn_worker("full", concurrency=1, BATON__WORKER__SHUTDOWN_TIMEOUT="1"),
    )
    client = await baton.client()
    long_run = await client.submit("core.sleep", {"seconds": 60}, watch=True)
    await _running_on(baton, long_run.execution_id, "full")
    waiting = await client.submit("core.echo", {"message": "handed back"}, watch=True)
    assert (await baton.wait_status(waiting.execution_id, "scheduled"))["worker"] == "full"
    # Published (logged once the broker confirmed it), then delivered: prefetched by the worker.
    await wait_until(lambda: _scheduled_logged(executor, waiting.execution_id), what="the dispatch to be published")
    await wait_until(lambda: _queue_empty(baton, "full"), what="the dispatch to be prefetched")
    full.signal(signal.SIGTERM)
    assert full.wait(20) == 0
    # The prefetched dispatch went back before the deadline interrupted the run: the drain did not
    # wait for the slot to free up (that would have taken the whole 60 s sleep).
    steps = [
        e["event"] for e in full.log_lines()
        if e.get("event") in ("worker_draining", "dispatches_handed_back", "drain_deadline_passed", "worker_inactive")
    ]
    assert steps == ["worker_draining", "dispatches_handed_back", "drain_deadline_passed", "worker_inactive"]
    interrupted = [e for e in await _events(baton, long_run.execution_id) if e["type"] == "workflow.interrupted"]
    assert interrupted and interrupted[0]["data"]["reason"] == "signal"
    await baton.start_worker("next")
    done = await client.wait(waiting.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == "next"


async def test_second_signal_exits_at_once(baton):
    _, leaving = await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("leaving", concurrency=1, BATON__WORKER__SHUTDOWN_TIMEOUT="30"),
    )
    client = await baton.client()
    sub = await client.submit("core.sleep", {"seconds": 30})
    await _running_on(baton, sub.execution_id, "leaving")
    leaving.signal(signal.SIGTERM)
    await wait_until(lambda: _logged(leaving, "worker_draining"), what="draining")
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(10) != 0
    # It stopped in the middle of its drain (which would have lasted 30 s): the drain neither
    # reached its deadline, nor interrupted or finished the run, nor marked the worker inactive.
    assert [e["event"] for e in leaving.log_lines() if e.get("event") in (
        "drain_deadline_passed", "execution_interrupted", "execution_completed", "worker_inactive"
    )] == []


async def test_a_drain_does_not_wait_past_its_deadline_for_a_held_up_claim(baton):
    """A claim the database holds up (here a row lock; a long outage does the same for up to
    `until_available`'s five minutes): the drain once waited for it without bound. It now gives the
    claim until its deadline, then abandons it and hands its dispatch back, which runs elsewhere."""
    blind = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}
    await baton.start_executor(**blind)
    held = await baton.start_worker("held", concurrency=1, BATON__WORKER__SHUTDOWN_TIMEOUT="1", **blind)
    held.signal(signal.SIGSTOP)  # so that the row can be locked before the worker claims it
    pool = await baton.pool()
    locker = await pool.acquire()
    try:
        client = await baton.client()
        sub = await client.submit("core.echo", {"message": "moved on"}, watch=True)
        assert (await baton.wait_status(sub.execution_id, "scheduled"))["worker"] == "held"
        lock = locker.transaction()
        await lock.start()
        await locker.execute("SELECT id FROM executions WHERE id = $1 FOR UPDATE", sub.execution_id)
        held.signal(signal.SIGCONT)

        async def claim_blocked() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ))

        await wait_until(claim_blocked, what="the worker's claim to wait on the row lock")
        held.signal(signal.SIGTERM)
        assert held.wait(20) == 0
        await lock.rollback()
    finally:
        await pool.release(locker)
    assert held.events("drain_claim_abandoned") and held.events("dispatches_handed_back")
    await baton.start_worker("next")
    done = await client.wait(sub.execution_id, 30)
    assert (done["status"], done["worker"], done["attempt"]) == ("completed", "next", 2)


async def test_expired_dispatch_is_dead_lettered_and_rescheduled(baton):
    """Dispatches queued behind a busy worker expire after the queue TTL and go elsewhere. What a
    worker has received holds unacked, and RabbitMQ does not expire it: the sweeper and the
    scheduled-timeout monitor cover that case."""
    # Work waits in the busy worker's queue (a pipeline beyond its one slot), not as requested. Until
    # the free worker is up, an expired dispatch goes back to the busy one, as often as booting
    # takes: none may fail for want of a worker meanwhile.
    executor = await baton.start_executor(
        BATON__EXECUTOR__DISPATCH_PIPELINE="3", BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS="100"
    )
    await baton.start_worker("stuck", concurrency=1, BATON__WORKER__QUEUE_TTL="1")
    client = await baton.client()
    # Busy for longer than the test: only the queue TTL moves what waits behind it.
    blocker = await client.submit("core.sleep", {"seconds": 60}, watch=True)
    await _running_on(baton, blocker.execution_id, "stuck")
    queued = []
    for i in range(3):
        # One at a time, so that each dispatch is a message of its own.
        queued.append(await client.submit("core.echo", {"message": f"q{i}"}, watch=True))
        assert (await baton.wait_status(queued[-1].execution_id, "scheduled"))["worker"] == "stuck"
    await baton.start_worker("free")

    async def two_moved():
        rows = [await baton.execution(s.execution_id) for s in queued]
        return rows if sum(r["status"] == "completed" for r in rows) == 2 else None

    rows = await wait_until(two_moved, what="two queued dispatches to expire and complete elsewhere")
    moved = [r for r in rows if r["status"] == "completed"]
    assert all(r["worker"] == "free" and r["attempt"] >= 2 for r in moved)
    # The first one queued was delivered to the busy worker (its one prefetched message): it waits there.
    assert [(r["status"], r["worker"], r["attempt"]) for r in rows if r not in moved] == [("scheduled", "stuck", 1)]
    handled = executor.events("dead_letter_handled")
    assert {e["death_reason"] for e in handled} == {"expired"}
    assert {e["execution_id"] for e in handled} == {str(r["id"]) for r in moved}
    assert await baton.queue_depth(baton.names.worker_queue("stuck")) == 0
    assert await baton.queue_depth(baton.names.dead_letters_queue) == 0


async def test_scheduled_timeout_fails_with_the_design_error_and_notifies(baton):
    blind = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}
    await baton.start_executor(
        BATON__EXECUTOR__SCHEDULED_TIMEOUT="1", BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS="2", **blind
    )
    frozen = await baton.start_worker("frozen", concurrency=1, **blind)
    frozen.signal(signal.SIGSTOP)
    try:
        client = await baton.client()
        sub = await client.submit("core.echo", {"message": "never"}, watch=True)
        await asyncio.wait_for(client._notified[str(sub.execution_id)].wait(), 20)  # the notification ...
        notification = await client.get(sub.execution_id)  # ... wakes the waiter, which reads the row
        assert notification is not None and notification["status"] == "failed"
        error = notification["error"]
        assert set(error) == {"error", "failed_by", "timeout_seconds", "age_seconds", "original_status"}
        assert error["failed_by"] == "execution_timeout_monitor"
        assert error["timeout_seconds"] == 1 and error["original_status"] == "scheduled"
        assert isinstance(error["age_seconds"], int) and error["age_seconds"] >= 1
        assert error["error"] == (
            f"Execution timeout: worker did not pick up task within 1 seconds (scheduled for {error['age_seconds']} seconds)"
        )
        # Rescheduled once (max_schedule_attempts = 2), then failed.
        row = await baton.execution(sub.execution_id)
        assert row["attempt"] == 2 and row["schedule_attempts"] == 2
        kinds = [e["type"] for e in notification["events"]]
        assert kinds.count("execution.scheduled") == 2 and kinds.count("execution.rescheduled") == 1
    finally:
        frozen.signal(signal.SIGCONT)


async def test_timeout_monitor_can_be_turned_off(baton):
    blind = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}
    executor = await baton.start_executor(
        BATON__EXECUTOR__SCHEDULED_TIMEOUT="0.5", BATON__EXECUTOR__ENABLE_TIMEOUT_MONITOR="false", **blind
    )
    frozen = await baton.start_worker("frozen", concurrency=1, **blind)
    frozen.signal(signal.SIGSTOP)
    try:
        client = await baton.client()
        sub = await client.submit("core.echo", {"message": "waits"})
        await baton.wait_status(sub.execution_id, "scheduled")
        pool = await baton.pool()

        # An enabled monitor would act once the execution is older than scheduled_timeout (0.5 s)
        # by the database's clock (its own criterion), within one check interval (0.5 s) of that.
        async def past_when_a_monitor_would_act():
            return await pool.fetchval(
                "SELECT updated_at < now() - make_interval(secs => 0.5 + 0.5) FROM executions WHERE id = $1",
                sub.execution_id,
            )

        await wait_until(past_when_a_monitor_would_act, what="the execution to be past its scheduled timeout")
        # ... and the executor's loops have run since: a sweep after that moment settles a run left
        # on a stopped worker, recorded only now.
        marker = await _running_on_a_stopped_worker(baton)
        await baton.wait_status(marker, "interrupted", "failed")
        row = await baton.execution(sub.execution_id)
        assert (row["status"], row["attempt"], row["worker"]) == ("scheduled", 1, "frozen")
        assert executor.events("timeout_monitor_disabled")
    finally:
        frozen.signal(signal.SIGCONT)


async def test_a_worker_restarted_under_the_same_name_hands_over_what_it_ran(baton):
    _, crashed = await baton.started(
        baton.spawn_executor(**RECOVER), baton.spawn_worker("phoenix", concurrency=1)
    )
    client = await baton.client()
    sub = await client.submit("tests.sleep_then_echo", {"seconds": 0.5, "message": "reborn"}, watch=True)
    await _running_on(baton, sub.execution_id, "phoenix")
    crashed.signal(signal.SIGKILL)
    crashed.wait()
    await baton.start_worker("phoenix", concurrency=1)
    done = await client.wait(sub.execution_id, 30)
    assert done["status"] == "completed" and done["result"] == {"message": "reborn"} and done["attempt"] == 2


async def test_metrics_endpoints(baton):
    import urllib.request

    from tests.harness import free_port

    executor_port, worker_port = free_port(), free_port()
    await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__METRICS_PORT=str(executor_port)),
        baton.spawn_worker("measured", BATON__WORKER__METRICS_PORT=str(worker_port)),
    )
    client = await baton.client()
    await client.run("core.echo", {"message": "count me"}, wait_timeout_s=20)

    def scrape(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    async def executor_reports():
        text = await asyncio.to_thread(scrape, executor_port)
        # The sweep sets its gauges one family after another, so wait for the last of them too.
        seen = 'baton_workers{status="active"} 1.0' in text and 'baton_worker_heartbeat_age_seconds{worker="measured"}' in text
        return text if seen else None

    text = await wait_until(executor_reports, what="executor metrics")
    assert 'baton_requests_total{outcome="recorded"} 1.0' in text
    for name in ("baton_reschedules_total", "baton_timeouts_total", "baton_dead_letters_total",
                 "baton_recovery_attempts_total", "baton_executions"):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    worker_text = await asyncio.to_thread(scrape, worker_port)
    assert 'baton_worker_executions_total{status="completed"} 1.0' in worker_text
    assert "baton_worker_in_flight" in worker_text


async def _logged(service, event: str) -> bool:
    return bool(service.events(event))


async def _running_on_a_stopped_worker(baton) -> uuid.UUID:
    """Record a run left `running` on a worker that has stopped: the next sweep interrupts it."""
    pool = await baton.pool()
    execution_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
        "last_heartbeat, incarnation) VALUES ('gone', 'inactive', '{python}', '{core.sleep}', 1, 0.2, now(), $1) "
        "ON CONFLICT (name) DO NOTHING",
        uuid.uuid4(),
    )
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, started_at) "
        "VALUES ($1, 'core.sleep', 'running', 1, 'gone', now())",
        execution_id,
    )
    return execution_id


async def _logged_for(service, event: str, **fields) -> bool:
    return any(all(e.get(k) == v for k, v in fields.items()) for e in service.events(event))


async def _scheduled_logged(executor, execution_id) -> bool:
    return await _logged_for(executor, "execution_scheduled", execution_id=str(execution_id))


async def _queue_empty(baton, worker: str) -> bool:
    return await baton.queue_depth(baton.names.worker_queue(worker)) == 0




async def test_running_work_left_on_a_stopped_worker_is_interrupted(baton):
    """Backstop: whatever path left an execution `running` on a worker that has stopped, the
    sweeper interrupts it and recovery settles it."""
    import uuid

    await baton.start_executor()
    pool = await baton.pool()
    execution_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
        "last_heartbeat, incarnation) VALUES ('gone', 'inactive', '{python}', '{core.sleep}', 1, 0.2, now(), $1)",
        uuid.uuid4(),
    )
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, started_at) "
        "VALUES ($1, 'core.sleep', 'running', 1, 'gone', now())",
        execution_id,
    )
    row = await baton.wait_status(execution_id, "failed")
    assert "recover_on_worker_loss is off" in row["error"]["error"]
    event = next(e for e in await _events(baton, execution_id) if e["type"] == "workflow.interrupted")
    assert event["data"]["reason"] == "worker_lost" and "stopped without finishing it" in event["data"]["error"]


async def test_a_live_worker_interrupts_what_it_is_recorded_running_but_is_not(baton):
    """Say a zombie process under the same name claimed it and then died: the live worker's audit
    interrupts it, and recovery settles it."""
    import uuid

    await baton.started(baton.spawn_executor(), baton.spawn_worker("auditor"))
    execution_id = uuid.uuid4()
    await (await baton.pool()).execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, started_at) "
        "VALUES ($1, 'core.sleep', 'running', 1, 'auditor', now() - interval '5 seconds')",
        execution_id,
    )
    row = await baton.wait_status(execution_id, "failed")
    event = next(e for e in await _events(baton, execution_id) if e["type"] == "workflow.interrupted")
    assert event["data"]["worker_id"] == "auditor" and "which is not running it" in event["data"]["error"]
    assert "recover_on_worker_loss is off" in row["error"]["error"]
    # Its own work is untouched by the audit.
    done = await (await baton.client()).run("core.sleep", {"seconds": 1}, wait_timeout_s=20)
    assert done["status"] == "completed" and done["attempt"] == 1
