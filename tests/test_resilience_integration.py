"""Replicas and restarts: two executors, one killed; the broker restarted; the database restarted.
In each, every execution must end exactly once."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import time
import uuid

import aio_pika
import asyncpg
import pytest

from common.deadline import STOP_AFTERMATH_S, STOP_STEP_TIMEOUT_S
from tests.harness import FAST_ENV, CuttableProxy, wait_until

HEARTBEAT_INTERVAL_S = float(FAST_ENV["BATON__WORKER__HEARTBEAT_INTERVAL"])

pytestmark = pytest.mark.integration


async def _post_many(baton, n: int, action_ref: str = "core.sleep", parameters: dict | None = None) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    body = json.dumps({"action_ref": action_ref, "parameters": parameters or {"seconds": 0.05}}).encode()
    for execution_id in ids:
        await baton.publish_raw(body, message_id=execution_id)
    return ids


async def _count(baton, status: str) -> int | None:
    try:
        return await (await baton.pool()).fetchval("SELECT count(*) FROM executions WHERE status = $1", status)
    except Exception:  # noqa: BLE001 - the database may be restarting under this test
        return None


async def _all_completed(baton, n: int, timeout_s: float) -> None:
    async def done():
        return (await _count(baton, "completed")) == n

    try:
        await wait_until(done, timeout_s=timeout_s, what=f"{n} completed executions")
    except AssertionError:
        rows = await (await baton.pool()).fetch("SELECT status, count(*) FROM executions GROUP BY status")
        raise AssertionError(f"not all completed: {[tuple(r) for r in rows]}") from None


async def _assert_exactly_once(baton, ids: list[str]) -> None:
    pool = await baton.pool()
    assert await pool.fetchval("SELECT count(*) FROM executions") == len(ids)
    rows = await pool.fetch(
        """SELECT e.id, e.status,
                  count(*) FILTER (WHERE v.type IN ('execution.completed', 'execution.failed',
                                                    'execution.timeout', 'execution.cancelled')) AS terminal
           FROM executions e JOIN execution_events v ON v.execution_id = e.id
           GROUP BY e.id, e.status"""
    )
    assert {str(r["id"]) for r in rows} == set(ids)
    assert all(r["status"] == "completed" and r["terminal"] == 1 for r in rows), [
        tuple(r) for r in rows if r["terminal"] != 1
    ]


async def test_two_executors_one_killed_every_execution_ends_once(baton):
    # A killed executor may leave work `scheduled` but never dispatched: the monitor of the other
    # one picks it up after scheduled_timeout.
    baton.env.update(BATON__EXECUTOR__SCHEDULED_TIMEOUT="2", BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS="10")
    first = await baton.start_executor("executor-1")
    await baton.started(baton.spawn_executor("executor-2"), baton.spawn_worker("w1", concurrency=8))
    await baton.start_worker("w2", concurrency=8)
    ids = await _post_many(baton, 300)

    async def some_done():
        return (await _count(baton, "completed") or 0) >= 60

    await wait_until(some_done, what="a fifth of the work to be done")
    first.signal(signal.SIGKILL)
    first.wait()
    await _all_completed(baton, 300, timeout_s=60)
    await _assert_exactly_once(baton, ids)


async def _serving_and_loaded(baton, n: int, *, health_files: bool = False) -> tuple[list, list[str]]:
    """An executor and two workers, with ``n`` executions posted and some of them done. With
    ``health_files``, each service writes one (`executor.health`, `w1.health`, `w2.health` in the
    test's directory)."""
    executor_env = {"BATON__EXECUTOR__HEALTH_FILE": str(baton.tmp / "executor.health")} if health_files else {}
    await baton.start_executor(**executor_env)
    workers = []
    for i in (1, 2):
        worker_env = {"BATON__WORKER__HEALTH_FILE": str(baton.tmp / f"w{i}.health")} if health_files else {}
        workers.append(await baton.start_worker(f"w{i}", concurrency=4, **worker_env))
    ids = await _post_many(baton, n, parameters={"seconds": 0.1})

    async def some_done():
        return (await _count(baton, "completed") or 0) >= n // 5

    await wait_until(some_done, what="some work to be done")
    return workers, ids


async def _all_report(paths: list, *, amqp_connected: bool) -> bool:
    """Whether every service's health file says it is (or is not) connected to the broker."""
    for path in paths:
        try:
            if json.loads(path.read_text()).get("amqp_connected") is not amqp_connected:
                return False
        except (FileNotFoundError, ValueError):
            return False
    return True


@pytest.mark.restarts
async def test_rabbitmq_restart_loses_nothing(private_baton):
    """On a RabbitMQ node of the test's own: the machine's shared broker is never restarted."""
    baton = private_baton
    workers, ids = await _serving_and_loaded(baton, 80, health_files=True)
    health = [baton.tmp / name for name in ("executor.health", "w1.health", "w2.health")]
    await wait_until(lambda: _all_report(health, amqp_connected=True), what="every service to report the broker")
    try:
        await asyncio.to_thread(baton.private_rabbit.ctl, "stop_app")
        # The broker stays down until every service has noticed it.
        await wait_until(
            lambda: _all_report(health, amqp_connected=False), what="every service to notice the broker is gone"
        )
    finally:
        await asyncio.to_thread(baton.private_rabbit.ctl, "start_app")
    await _all_completed(baton, 80, timeout_s=90)
    await _assert_exactly_once(baton, ids)
    # The services came through it: still running, and still serving new work.
    assert all(w.process.poll() is None for w in [*workers, baton.services[0]])
    done = await (await baton.client()).run("core.echo", {"message": "after"}, wait_timeout_s=30)
    assert done["status"] == "completed"


@pytest.mark.restarts
async def test_a_dispatch_a_broker_restart_dropped_is_placed_again(private_baton):
    """Dispatch messages are transient (the row is the record): a broker restart drops one waiting
    in a worker's queue, and the worker, once its connection is back, hands back what is still
    `scheduled` on it, for the executor to place again; long before the scheduled-timeout monitor
    (300 s) would, and the worker was never lost (it kept its heartbeats)."""
    baton = private_baton
    rabbit = baton.private_rabbit
    proxy = CuttableProxy(target_port=rabbit.port)
    await proxy.start()
    try:
        await baton.start_executor()
        worker = await baton.start_worker(
            "w1", concurrency=2, BATON__MESSAGE_QUEUE__URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        )
        await proxy.cut()  # the worker's consumer is gone; its queue stays, and it still heartbeats

        queue = baton.names.worker_queue("w1")

        async def depth() -> int | None:
            try:
                return await baton.queue_depth(queue)
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
                return None  # the test's own connection is still coming back

        async def waiting() -> bool:
            return await depth() == 1

        execution_id = str(uuid.uuid4())
        await baton.publish_raw(json.dumps({"action_ref": "core.noop"}).encode(), message_id=execution_id)
        assert (await baton.wait_status(execution_id, "scheduled"))["worker"] == "w1"
        await wait_until(waiting, what="the dispatch to wait in the worker's queue")
        await asyncio.to_thread(rabbit.ctl, "stop_app")
        await asyncio.to_thread(rabbit.ctl, "start_app")

        async def dropped() -> bool:
            return await depth() == 0

        await wait_until(dropped, what="the broker to come back without the dispatch")
        assert (await baton.execution(execution_id))["status"] == "scheduled"
        await proxy.heal()
        row = await baton.wait_status(execution_id, "completed", timeout_s=60)
    finally:
        await proxy.cut()
    events = await (await baton.pool()).fetch(
        "SELECT type FROM execution_events WHERE execution_id = $1 ORDER BY seq", uuid.UUID(execution_id)
    )
    kinds = [e["type"] for e in events]
    assert kinds.count("execution.rescheduled") == 1 and kinds.count("execution.completed") == 1, kinds
    assert row["attempt"] == 2  # placed twice: before the restart, and after the hand-back
    assert [e["executions"] for e in worker.events("unclaimed_handed_back")] == [0, 1]  # at start, on reconnection


@pytest.mark.restarts
async def test_postgresql_restart_loses_nothing(private_baton):
    """On a PostgreSQL of the test's own: the machine's shared server is never restarted."""
    baton = private_baton
    # A restart here takes a few seconds; a worker that cannot write its heartbeat for longer than
    # the staleness window stands down by design, so the window must outlast the restart.
    baton.env.update(BATON__WORKER__HEARTBEAT_INTERVAL="2")
    workers, ids = await _serving_and_loaded(baton, 80)
    await asyncio.to_thread(baton.private_pg.restart)
    await (await baton.pool()).expire_connections()
    await _all_completed(baton, 80, timeout_s=90)
    await _assert_exactly_once(baton, ids)
    assert all(w.process.poll() is None for w in [*workers, baton.services[0]])
    statuses = await (await baton.pool()).fetch("SELECT status FROM workers")
    assert {r["status"] for r in statuses} == {"active"}
    done = await (await baton.client()).run("core.echo", {"message": "after"}, wait_timeout_s=30)
    assert done["status"] == "completed"


async def test_a_worker_cut_off_from_the_database_stands_down_and_comes_back(baton):
    """A partition between one worker and PostgreSQL: the worker cannot write its heartbeat, so
    past the staleness window it stops taking work and gives up its run; the executor declares it
    lost and recovery runs the work elsewhere. Healed, the worker registers again."""
    baton.env.update(BATON__RECOVERY__RECOVER_ON_WORKER_LOSS="true")
    proxy = CuttableProxy()
    await proxy.start()
    try:
        island = await _island(baton, proxy)
        client = await baton.client()
        sub = await client.submit("tests.sleep_then_echo", {"seconds": 3, "message": "made it"}, watch=True)
        row = await baton.wait_status(sub.execution_id, "running")
        assert row["worker"] == "island"
        await proxy.cut()
        cut_at = time.monotonic()
        await baton.start_worker("mainland")
        done = await client.wait(sub.execution_id, 30)
        assert done["status"] == "completed" and done["worker"] == "mainland" and done["recovery_attempts"] == 1
        await wait_until(lambda: _logged_async(island, "worker_standing_down"), what="the cut-off worker to stand down")
        assert await (await baton.pool()).fetchval("SELECT status FROM workers WHERE name = 'island'") == "lost"
        # While the database refuses it, the worker tries again every quarter heartbeat at most,
        # not in a loop (it tried thousands of times a second).
        cut_for_s, failed = time.monotonic() - cut_at, len(island.events("heartbeat_failed"))
        assert 0 < failed <= cut_for_s / (HEARTBEAT_INTERVAL_S / 4) + 10, (failed, cut_for_s)
        await proxy.heal()
        await wait_until(lambda: _logged_async(island, "worker_reregistered"), what="the worker to register again")
        assert await (await baton.pool()).fetchval("SELECT status FROM workers WHERE name = 'island'") == "active"
        assert island.process.poll() is None
        after = await baton.execution(sub.execution_id)
        assert (after["worker"], after["attempt"], after["result"]) == ("mainland", 2, {"message": "made it"})
    finally:
        await proxy.cut()


async def test_a_worker_whose_pools_are_cut_off_but_not_its_lock_stops_taking_work_until_they_answer(baton):
    """A partition that swallows the packets of the worker's pool connections but not of its lock
    connection: its heartbeats get through, so it is not declared lost (its runs may go on), but it
    can claim nothing. Work placed on it waited there for the scheduled timeout; now, once its pools
    have not answered for a staleness window, it lets go of the claim the database holds up, hands
    its dispatch back and marks itself `draining`: the execution moves to another worker at no
    cost, nothing more is placed on it, and its heartbeats go on. Once healed, it takes work again.
    (Its audit, run beside the heartbeat, once held the heartbeat loop up too: the heartbeats must
    go on throughout.)"""
    proxy = CuttableProxy()
    await proxy.start()
    try:
        island, pool, client, sub = await _run_placed_on_a_worker_whose_pools_are_cut(baton, proxy)
        await wait_until(lambda: _logged_async(island, "worker_pools_unreachable"), what="the worker to stop taking work")

        async def draining() -> bool:  # marked through the lock connection, then what it holds is handed back
            return await pool.fetchval("SELECT status FROM workers WHERE name = 'island'") == "draining"

        await wait_until(draining, what="the worker to be marked draining")
        mainland = await baton.start_worker("mainland")
        done = await client.wait(sub.execution_id, 30)
        assert (done["status"], done["worker"], done["result"]) == ("completed", "mainland", {"message": "moved on"})
        assert done["schedule_attempts"] == 0 and done["attempt"] == 2  # moved, at no cost
        beat = await pool.fetchval("SELECT last_heartbeat FROM workers WHERE name = 'island'")

        async def beating() -> bool:  # heartbeats go on, and it is not declared lost
            row = await pool.fetchrow("SELECT status, last_heartbeat FROM workers WHERE name = 'island'")
            return row["status"] == "draining" and row["last_heartbeat"] > beat

        await wait_until(beating, what="the heartbeat to go on")
        await proxy.heal()
        await wait_until(lambda: _logged_async(island, "worker_pools_back"), what="the worker to take work again")

        async def active() -> bool:  # marked at the next heartbeat
            return await pool.fetchval("SELECT status FROM workers WHERE name = 'island'") == "active"

        await wait_until(active, what="the worker to be active again")
        assert not island.events("worker_standing_down")
        # It takes work again: with the other worker gone, the next run is its.
        mainland.signal(signal.SIGTERM)
        assert mainland.wait() == 0
        again = await client.run("core.echo", {"message": "back"}, wait_timeout_s=30)
        assert (again["status"], again["worker"]) == ("completed", "island")
    finally:
        await proxy.cut()


async def test_a_worker_stopped_while_its_pools_are_cut_off_marks_itself_draining_through_its_lock(baton):
    """A SIGTERM while the worker's pools do not answer (its lock connection does): the drain's
    mark, through the pool, fails, and the row stayed `active` until the process was gone, drawing
    work and holding what was placed on it. The heartbeat marks it `draining` through the lock
    connection instead: what waited for it moves to another worker while it is still draining."""
    proxy = CuttableProxy()
    await proxy.start()
    try:
        island, pool, client, sub = await _run_placed_on_a_worker_whose_pools_are_cut(baton, proxy)
        assert (await baton.wait_status(sub.execution_id, "scheduled"))["worker"] == "island"
        await baton.start_worker("mainland")
        island.signal(signal.SIGTERM)
        done = await client.wait(sub.execution_id, 30)
        assert (done["status"], done["worker"], done["schedule_attempts"]) == ("completed", "mainland", 0)
        # Moved because the row said `draining`, while the worker drained: not once its heartbeats
        # stopped at the end of the drain, when the executor declared it lost.
        reasons = await pool.fetch(
            "SELECT data->>'reason' AS reason FROM execution_events WHERE execution_id = $1 "
            "AND type = 'execution.rescheduled'", sub.execution_id,
        )
        assert [r["reason"] for r in reasons] == ["worker island is draining"]
        # Its last mark, `inactive`, goes through the lock connection too: through the pool, it
        # failed, and the row, left `draining`, had the worker declared lost once it was gone.
        assert await asyncio.to_thread(island.wait, 60) == 0
        assert await pool.fetchval("SELECT status FROM workers WHERE name = 'island'") == "inactive"
        assert island.events("worker_inactive")
    finally:
        await proxy.cut()


async def test_a_worker_stopped_with_an_outcome_it_cannot_record_still_marks_itself_inactive(baton):
    """A run ends while the worker's pools are cut off (its lock connection spared), so its outcome
    waits to be recorded; then SIGTERM. The steps after the drain's deadline share one allowance,
    and waiting for that outcome once took all of it: the last mark, through the lock connection,
    got none, and the row was left for the executor to declare the worker lost. That mark keeps its
    share."""
    proxy = CuttableProxy()
    await proxy.start()
    try:
        _, island = await baton.started(
            baton.spawn_executor(),
            baton.spawn_worker(
                # (A deadline no shorter than the allowance after it: waiting for the outcome, up
                # to the deadline's length, could take all of that allowance.)
                "island", concurrency=1, BATON__DATABASE__URL=proxy.url(baton.db_name),
                BATON__WORKER__SHUTDOWN_TIMEOUT=str(STOP_AFTERMATH_S),
            ),
        )
        pool = await baton.pool()
        client = await baton.client()
        done_path = baton.tmp / "ran"
        sub = await client.submit("core.local", {"cmd": ["sh", "-c", f"sleep 1 && touch {done_path}"]})
        assert (await baton.wait_status(sub.execution_id, "running"))["worker"] == "island"
        assert await proxy.blackhole_pools(pool)
        await wait_until(lambda: _exists(done_path), what="the run to end, its outcome unrecorded")
        island.signal(signal.SIGTERM)
        assert await asyncio.to_thread(island.wait, 60) == 0
        assert await pool.fetchval("SELECT status FROM workers WHERE name = 'island'") == "inactive"
        assert island.events("worker_inactive")
    finally:
        await proxy.cut()


async def _exists(path) -> bool:
    return path.exists()


async def test_a_request_only_a_worker_with_its_pools_cut_off_serves_times_out(baton):
    """A worker whose pools are cut off (its lock connection spared) stops taking work, but its
    heartbeats go on, so it is not declared lost. It served its actions until it stopped taking
    work, not until its last heartbeat: a request that only it could run fails once the requested
    timeout has passed since then (counted to its last heartbeat, it waited as long as the cut)."""
    baton.env.update(BATON__EXECUTOR__REQUESTED_TIMEOUT="2", BATON__EXECUTOR__TIMEOUT_CHECK_INTERVAL="0.3")
    proxy = CuttableProxy()
    await proxy.start()
    try:
        island, pool, client, sub = await _run_placed_on_a_worker_whose_pools_are_cut(baton, proxy)
        failed = await client.wait(sub.execution_id, 60)
        assert (failed["status"], failed["error"]["failed_by"]) == ("failed", "requested_timeout_monitor")
        assert "no live worker serves action 'core.echo'" in failed["error"]["error"]
        row = await pool.fetchrow(
            "SELECT status, now() - last_heartbeat < interval '2 s' AS beating FROM workers WHERE name = 'island'"
        )
        assert (row["status"], row["beating"]) == ("draining", True)  # draining, not lost
        assert island.events("worker_pools_unreachable") and island.process.poll() is None
    finally:
        await proxy.cut()


async def test_a_worker_whose_broker_connection_goes_silent_reconnects_and_runs_what_waited(baton):
    """The worker's network to RabbitMQ swallows every packet (no reset, no refusal): only the AMQP
    heartbeat (2 s here, set in the URL; the client gives up after three of its grace periods)
    tells either end that the connection is gone. What is placed on the worker meanwhile waits in
    its queue; once the network heals, the worker reconnects and runs it (and hands back, at no
    cost, what a broker restart meanwhile could have dropped: here, nothing)."""
    broker = CuttableProxy(target_port=5672)
    await broker.start()
    try:
        _, island = await baton.started(
            baton.spawn_executor(),
            baton.spawn_worker(
                "island", concurrency=1, BATON__MESSAGE_QUEUE__URL=f"amqp://guest:guest@127.0.0.1:{broker.port}/?heartbeat=2"
            ),
        )
        client = await baton.client()
        assert (await client.run("core.echo", {"message": "before"}, wait_timeout_s=30))["worker"] == "island"
        broker.blackhole()
        sub = await client.submit("core.echo", {"message": "during"})
        assert (await baton.wait_status(sub.execution_id, "scheduled"))["worker"] == "island"

        async def noticed() -> bool:  # no frame for three heartbeats' grace: the connection is given up
            return any("was stuck" in str(line.get("event")) for line in island.log_lines())

        await wait_until(noticed, timeout_s=30, what="the worker to give its silent connection up")
        await broker.heal()
        done = await client.wait(sub.execution_id, 60)
        assert (done["status"], done["worker"], done["result"]) == ("completed", "island", {"message": "during"})

        async def reconnected() -> bool:  # what is still `scheduled` here is put back in line
            return any(e["reason"] == "the worker's broker connection came back" for e in island.events("unclaimed_handed_back"))

        await wait_until(reconnected, what="the worker to reconnect and hand back what is still scheduled on it")
    finally:
        await broker.cut()


async def test_a_worker_cut_off_with_a_synchronous_action_running_comes_back_once_it_ends(baton):
    """A synchronous action runs on a thread that standing down cannot stop, while its run is
    recovered elsewhere: the worker does not register again (and take more work) until that thread
    has ended."""
    proxy = CuttableProxy()
    await proxy.start()
    try:
        island = await _island(baton, proxy)
        client = await baton.client()
        sub = await client.submit("tests.blocking_sleep", {"seconds": 6})
        await baton.wait_status(sub.execution_id, "running")
        await proxy.cut()
        await wait_until(lambda: _logged_async(island, "worker_standing_down"), what="the cut-off worker to stand down")
        await proxy.heal()
        await wait_until(
            lambda: _logged_async(island, "worker_reregistered"), timeout_s=30, what="the worker to register again"
        )
        assert island.events("resume_waits_for_sync_actions")
        # The interrupted run was not recovered (transient, recover_on_worker_loss off): failed.
        row = await baton.wait_status(sub.execution_id, "failed")
        assert row["attempt"] == 1
        # Back only once the action's 6 s had passed since it started (it came back at the heal,
        # a second or two in, before).
        [back] = island.events("worker_reregistered")
        back_at = datetime.datetime.fromisoformat(back["timestamp"].replace("Z", "+00:00"))
        assert back_at >= row["started_at"] + datetime.timedelta(seconds=6), (back_at, row["started_at"])
    finally:
        await proxy.cut()


async def _island(baton, proxy: CuttableProxy):
    """An executor, and a worker `island` of one slot that reaches PostgreSQL only through ``proxy``."""
    _, island = await baton.started(
        baton.spawn_executor(),
        baton.spawn_worker("island", concurrency=1, BATON__DATABASE__URL=proxy.url(baton.db_name)),
    )
    return island


async def _run_placed_on_a_worker_whose_pools_are_cut(baton, proxy: CuttableProxy):
    """The worker `island` (reaching PostgreSQL through ``proxy``) with the packets of its pool
    connections held, its lock connection (the session holding a session lock) spared, and a run
    placed on it, the only worker: (island, pool, client, submission)."""
    island = await _island(baton, proxy)
    pool = await baton.pool()
    assert await proxy.blackhole_pools(pool)
    client = await baton.client()
    return island, pool, client, await client.submit("core.echo", {"message": "moved on"})


async def _logged_async(service, event: str) -> bool:
    return bool(service.events(event))


@pytest.mark.parametrize(
    ("heartbeat_interval_s", "path"),
    [("0.2", "worker_standing_down"), ("5", "drain_deadline_passed")],
    ids=["stands-down", "deadline"],
)
async def test_a_drain_ends_in_bounded_time_when_the_database_swallows_everything(baton, heartbeat_interval_s, path):
    """The worker's network to PostgreSQL drops every packet (no reset, no refusal: each query waits
    on its own timeout) while its run goes on. With a short heartbeat, the worker stands down (its
    heartbeat stale within a second) before SIGTERM; with a long one, SIGTERM comes first and the
    drain's deadline interrupts the run. Either way the drain ends within its deadline and the
    bounds on its bookkeeping, and the executor, which still reaches the database, takes the run
    back as a lost worker's."""
    baton.env.update(BATON__RECOVERY__RECOVER_ON_WORKER_LOSS="true")
    proxy = CuttableProxy()
    await proxy.start()
    try:
        _, sinking = await baton.started(
            # Declares the worker lost 2 of its heartbeats after the last.
            baton.spawn_executor(BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER="2"),
            baton.spawn_worker(
                "sinking", concurrency=2, BATON__DATABASE__URL=proxy.url(baton.db_name),
                BATON__WORKER__SHUTDOWN_TIMEOUT="1", BATON__WORKER__HEARTBEAT_INTERVAL=heartbeat_interval_s,
            ),
        )
        client = await baton.client()
        sub = await client.submit("tests.sleep_then_echo", {"seconds": 120, "message": "made it"})
        row = await baton.wait_status(sub.execution_id, "running")
        assert row["worker"] == "sinking"
        proxy.blackhole()

        async def swallowed() -> bool:  # a query went into the void (the draining mark's, at least)
            return proxy.held_bytes > 0

        if path == "worker_standing_down":
            # Cut off, it stops taking work and gives up its run once its heartbeat is stale: its
            # heartbeat loop is not held up by a query the network swallowed.
            await wait_until(lambda: _logged_async(sinking, path), what="the cut-off worker to stand down")
        signalled_at = time.monotonic()
        sinking.signal(signal.SIGTERM)
        await wait_until(swallowed, what="a query to be swallowed")
        await asyncio.to_thread(sinking.wait, 90)
        took_s = time.monotonic() - signalled_at
        # The deadline (1 s), then the steps after it, 10 s between them whatever does not answer
        # (each step bounded on its own, they took 20-24 s together), and the runner's wait for what
        # they left behind (5 s at most); asyncpg's own timeouts are 60 s.
        assert took_s < 1 + STOP_AFTERMATH_S + STOP_STEP_TIMEOUT_S + 1, f"the drain took {took_s:.1f} s"
        assert sinking.events(path)
        # The executor takes the run back (no other worker: it waits to be placed again).
        after = await baton.wait_status(sub.execution_id, "requested", timeout_s=30)
        assert (after["attempt"], after["recovery_attempts"]) == (1, 1)
    finally:
        await proxy.cut()


async def test_an_executor_stops_in_bounded_time_when_the_database_and_the_broker_swallow_everything(baton):
    """SIGTERM while the executor's network to PostgreSQL and to RabbitMQ drops every packet: its
    loops are given their deadline and then left behind, and what follows shares one allowance
    (the loops' unwinding, the broker connection's close, which waited on the broker, and the
    pools', terminated), so it exits within its compose grace period."""
    database, broker = CuttableProxy(), CuttableProxy(target_port=5672)
    await database.start()
    await broker.start()
    try:
        (executor,) = await baton.started(
            baton.spawn_executor(
                BATON__DATABASE__URL=database.url(baton.db_name), BATON__EXECUTOR__SHUTDOWN_TIMEOUT="1",
                BATON__MESSAGE_QUEUE__URL=f"amqp://guest:guest@127.0.0.1:{broker.port}/",
            )
        )
        database.blackhole()
        broker.blackhole()

        async def swallowed() -> bool:  # a loop's query went into the void (the sweeper's, say)
            return database.held_bytes > 0

        await wait_until(swallowed, what="a query to be swallowed")
        signalled_at = time.monotonic()
        executor.signal(signal.SIGTERM)
        await asyncio.to_thread(executor.wait, 90)
        took_s = time.monotonic() - signalled_at
        # The deadline (1 s), then the steps after it, 10 s between them whatever does not answer
        # (each bounded on its own, and the broker's close not at all, they took more), and the
        # runner's wait for what they left behind (5 s at most); the clients' own timeouts are 60 s.
        assert took_s < 1 + STOP_AFTERMATH_S + STOP_STEP_TIMEOUT_S + 1, f"the stop took {took_s:.1f} s"
        assert executor.events("executor_stopped")
    finally:
        await database.cut()
        await broker.cut()


async def test_a_session_whose_client_vanished_does_not_keep_its_locks_for_hours(baton):
    """Every Baton connection asks the server to end a transaction left idle (a client gone
    mid-transaction would otherwise keep its row locks, and hold up the recovery of that very run)
    and to probe a silent client (a worker's name lock would otherwise outlive it by the kernel's
    two hours). Here a transaction left idle is ended by the server, its row lock freed."""
    from common import db

    pool = await db.connect(baton.db_url, max_size=2)
    listener = await db.connect_one(baton.db_url)
    try:
        for conn in (pool, listener):
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1min"
            assert await conn.fetchval("SHOW tcp_keepalives_idle") == "10"
        async with pool.acquire() as conn:
            # The same, faster: a transaction that takes a lock and then goes silent.
            await conn.execute("SET idle_in_transaction_session_timeout = '300ms'")
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT pg_advisory_xact_lock(4242)")
            other = await asyncpg.connect(baton.db_url)
            try:
                assert await other.fetchval("SELECT pg_try_advisory_lock(4242)") is False

                async def freed() -> bool:
                    return bool(await other.fetchval("SELECT pg_try_advisory_lock(4242)"))

                await wait_until(freed, what="the idle transaction's lock to be freed")
            finally:
                await other.close()
            with pytest.raises((asyncpg.exceptions.IdleInTransactionSessionTimeoutError, asyncpg.InterfaceError,
                                asyncpg.exceptions.ConnectionDoesNotExistError)):
                await tx.rollback()
    finally:
        await listener.close()
        await pool.close()
