"""Hardening with real services and processes: busy workers, one live process per name, fencing
by incarnation, idempotent finishes, the lost-worker compare-and-set, stopping without a broker,
the requested timeout, retention, health."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from typing import Any

import aio_pika
import asyncpg
import pytest

from common import amqp, db
from common.client import RequestNotPosted, RequestRejected
from common.queries import executions as q
from common.queries import workers as wq
from tests.harness import AMQP_URL, CuttableProxy, wait_until
from worker.recording import finish_rows

pytestmark = pytest.mark.integration


async def _scheduled_on(baton, execution_id) -> list[str]:
    rows = await (await baton.pool()).fetch(
        "SELECT data->>'worker' AS w FROM execution_events WHERE execution_id = $1 AND type = 'execution.scheduled'",
        uuid.UUID(str(execution_id)),
    )
    return [r["w"] for r in rows]


# -- busy workers -------------------------------------------------------------------------------


async def test_no_execution_waits_behind_a_busy_worker_while_another_has_a_free_slot(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("busy", concurrency=1))
    client = await baton.client()
    long = await client.submit("core.sleep", {"seconds": 30}, watch=True)
    await baton.wait_status(long.execution_id, "running")
    # Only now does a second worker appear; everything posted next must go to it, never queue
    # behind the busy one.
    await baton.start_worker("idle", concurrency=1)
    quick = [await client.submit("core.echo", {"message": f"m{i}"}, watch=True) for i in range(4)]
    for s in quick:
        done = await client.wait(s.execution_id, 20)
        assert done["status"] == "completed" and done["worker"] == "idle"
        assert await _scheduled_on(baton, s.execution_id) == ["idle"]
    assert (await baton.execution(long.execution_id))["status"] == "running"


@pytest.mark.parametrize("pipeline", ["0", "1"])
async def test_a_worker_busy_past_scheduled_timeout_fails_nothing(baton, pipeline):
    """One worker of one slot, busy far longer than scheduled_timeout, and a single dispatch
    allowed: what waits for it is never failed for waiting."""
    executor = await baton.start_executor(
        BATON__EXECUTOR__SCHEDULED_TIMEOUT="0.5",
        BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS="1",
        BATON__EXECUTOR__DISPATCH_PIPELINE=pipeline,
    )
    await baton.start_worker("only", concurrency=1, BATON__WORKER__QUEUE_TTL="1")
    client = await baton.client()
    first = await client.submit("core.sleep", {"seconds": 4}, watch=True)
    await baton.wait_status(first.execution_id, "running")
    waiting = [await client.submit("core.echo", {"message": f"w{i}"}, watch=True) for i in range(3)]
    if pipeline == "1":
        # The pipeline holds one dispatch behind the busy worker: the monitor sees it time out
        # (and its TTL expire) and puts it back in line at no cost.
        await wait_until(lambda: _has_event(executor, "scheduled_timeout"), timeout_s=20, what="a scheduled timeout")
    for s in [first, *waiting]:
        done = await client.wait(s.execution_id, 30)
        assert done["status"] == "completed", done["error"]


async def _active_worker_row(pool, name: str, *, heartbeat_interval_s: float, heartbeat_age_s: float) -> uuid.UUID:
    """A worker of one slot, recorded `active` with its last heartbeat this long ago, and no process
    behind it: returns its incarnation."""
    incarnation = uuid.uuid4()
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s,"
        " last_heartbeat, incarnation)"
        " VALUES ($1, 'active', '{python}', '{}', 1, $2, now() - make_interval(secs => $3), $4)",
        name, heartbeat_interval_s, heartbeat_age_s, incarnation,
    )
    return incarnation


async def test_a_worker_between_runs_is_still_busy(baton):
    """A heartbeat can fall between a run's end and the claim of the dispatch waiting in the
    worker's inbox, and say `in_flight` 0. A worker seen full within its staleness window is still
    busy: what waits on it is put back in line at no cost (by the scheduled-timeout monitor and the
    dead-letter handler alike). One that has had room for a whole window is charged."""
    pool = await baton.pool()
    incarnation = await _active_worker_row(pool, "one", heartbeat_interval_s=0.2, heartbeat_age_s=0)
    waiting = uuid.uuid4()
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, attempt, worker, updated_at)"
        " VALUES ($1, 'core.echo', 'scheduled', 1, 'one', now() - interval '1 second')",
        waiting,
    )

    async def busy() -> tuple[bool, bool]:
        async with pool.acquire() as conn, conn.transaction():
            [timed_out] = await conn.fetch(q.SELECT_SCHEDULED_TIMED_OUT, 0.5, 10, 5.0)
            dead_lettered = await conn.fetchrow(q.SELECT_FOR_UPDATE, waiting, 5.0)
        return timed_out["worker_busy"], dead_lettered["worker_busy"]

    assert await busy() == (False, False)  # never seen full: room it did not use
    await pool.execute(wq.HEARTBEAT, "one", incarnation, 1)
    assert await busy() == (True, True)
    await pool.execute(wq.HEARTBEAT, "one", incarnation, 0)  # its run just ended; the claim is under way
    assert await busy() == (True, True)
    # Room for longer than its staleness window (5 x 0.2 s) and still not started: its fault.
    await pool.execute("UPDATE workers SET full_at = now() - interval '2 seconds' WHERE name = 'one'")
    assert await busy() == (False, False)


def _scans_of_executions(plan: list[dict[str, Any]]) -> list[str]:
    """Every scan of `executions` in an `EXPLAIN (FORMAT JSON)` plan (decoded by the pool's json
    codec), as `node type/index`."""
    found = []
    nodes = [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        if node.get("Relation Name") == "executions":
            found.append(f"{node['Node Type']}/{node.get('Index Name', '')}")
        nodes.extend(node.get("Plans", []))
    return found


async def test_fenced_updates_find_their_rows_by_id_when_statistics_are_stale(baton):
    """Statistics taken while nothing was in flight say that no row is requested or running, and a
    burst grows the table faster than they follow. The scheduler's mark and the finish must still
    reach their rows through the primary key, not read the whole table for them (which took
    20-430 ms a statement in a burst of 10,000 beside 1,000 finished executions)."""
    pool = await baton.pool()
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO executions (id, action_ref, status, attempt, finished_at)"
            " SELECT gen_random_uuid(), 'core.noop', 'completed', 1, now() FROM generate_series(1, 1000)"
        )
        await conn.execute("ANALYZE executions")
        await conn.execute(
            "INSERT INTO executions (id, action_ref, status)"
            " SELECT gen_random_uuid(), 'core.noop', 'requested' FROM generate_series(1, 10000)"
        )
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM executions WHERE status = 'requested' LIMIT 50")]
        incarnation = uuid.uuid4()
        statements = {
            "mark": (q.MARK_SCHEDULED, ids, ["w"] * 50, [0] * 50),
            "finish": (q.FINISH, ids, [1] * 50, ["completed"] * 50, ["null"] * 50, [None] * 50, "w", incarnation,
                       [None] * 50),
            "finished": (q.FINISHED, ids, [1] * 50, ["completed"] * 50, "w", incarnation),
            "claimed": (q.CLAIMED, ids, [1] * 50, "w", incarnation),
        }
        for name, (sql, *args) in statements.items():
            scans = _scans_of_executions(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
            assert scans and not [s for s in scans if s.startswith("Seq Scan")], (name, scans)


def _literal(value: object) -> str:
    """``value`` as SQL text for `EXECUTE` (arrays as array literals, cast by the statement)."""
    if value is None:
        return "NULL"
    if isinstance(value, list):
        items = ",".join("NULL" if v is None else '"' + str(v).replace('"', '\\"') + '"' for v in value)
        return "'{" + items.replace("'", "''") + "}'"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def test_hot_path_plans_cached_on_an_empty_table_reach_rows_through_indexes(baton):
    """The hot path's statements are planned once per connection (`db.HOT_PATH_SETTINGS`), so a
    connection opened as a deployment starts keeps the plans it made while `executions` was empty.
    Those plans must still find their rows through an index once the table holds thousands of rows:
    plain generic plans would scan it whole on every call."""
    pool = await baton.pool()
    conn = await asyncpg.connect(baton.db_url, server_settings=db.HOT_PATH_SETTINGS)
    try:
        assert await conn.fetchval("SHOW jit") == "off"
        await conn.execute("ANALYZE")  # statistics that say the table is empty
        incarnation = uuid.uuid4()
        await pool.execute(
            "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s, "
            "last_heartbeat, incarnation) VALUES ('w', 'active', '{python}', '{core.noop}', 50, 1, now(), $1)",
            incarnation,
        )
        ids = [uuid.uuid4() for _ in range(20)]
        new_ids = [uuid.uuid4() for _ in range(20)]
        nulls: list[None] = [None] * 20
        statements = {
            "claim": (q.CLAIM, ids, [1] * 20, "w", str(incarnation)),
            "claimed": (q.CLAIMED, ids, [1] * 20, "w", str(incarnation)),
            "finish": (q.FINISH, ids, [1] * 20, ["completed"] * 20, ["null"] * 20, nulls, "w", str(incarnation),
                       nulls),
            "finished": (q.FINISHED, ids, [1] * 20, ["completed"] * 20, "w", str(incarnation)),
            "room": (q.ELIGIBLE_WITH_WAITING, 3.0, ["core.noop"]),
            "insert": (q.INSERT_REQUESTS, new_ids, ["core.noop"] * 20, ["{}"] * 20, ["requested"] * 20, nulls, nulls,
                       nulls, nulls, nulls, [0] * 20, nulls, nulls, nulls, nulls, ["w"] * 20),
        }
        for name, (sql, *args) in statements.items():
            await conn.execute(f"PREPARE {name} AS {sql}")
            # Planned and cached now, on the empty table (what the insert wrote is deleted, not
            # truncated: a truncate would have every plan on the table made again).
            await conn.execute(f"EXECUTE {name}({', '.join(_literal(a) for a in args)})")
            await conn.execute("DELETE FROM execution_events; DELETE FROM executions")
        # The table grows; the cached plans stay (new rows invalidate nothing).
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status, attempt, finished_at)"
            " SELECT gen_random_uuid(), 'core.noop', 'completed', 1, now() FROM generate_series(1, 20000)"
        )
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status, attempt, worker)"
            " SELECT unnest($1::uuid[]), 'core.noop', 'scheduled', 1, 'w'",
            ids,
        )
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status) SELECT gen_random_uuid(), 'core.noop', 'requested'"
            " FROM generate_series(1, 2000)"
        )
        for name, (_, *args) in statements.items():
            explained = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE {name}({', '.join(_literal(a) for a in args)})"
            )
            scans = _scans_of_executions(json.loads(explained))
            assert not [s for s in scans if s.startswith("Seq Scan")], (name, scans)
            assert name == "insert" or scans, name
    finally:
        await conn.close()


# -- one live process per name, fencing by incarnation ----------------------------------------


async def test_a_name_held_by_a_live_process_is_refused(baton):
    _, first = await baton.started(baton.spawn_executor(), baton.spawn_worker("twin"))
    second = baton.spawn("twin-2", "worker", "--name", "twin", "--runtimes", "python")
    assert second.wait(30) == 1
    output = second.log_path.read_text().strip().splitlines()
    assert output[-1].startswith("worker twin: worker name 'twin' is held by a live process")
    assert "stop that process, or start this one under another --name" in output[-1]
    assert first.process.poll() is None
    done = await (await baton.client()).run("core.echo", {"message": "still here"}, wait_timeout_s=20)
    assert done["status"] == "completed" and done["worker"] == "twin"
    # Once the holder is dead, the name is free again at once (its lock went with it).
    first.signal(signal.SIGKILL)
    first.wait()
    await baton.start_worker("twin")


async def test_the_default_name_is_unique_per_process(baton):
    await baton.start_executor()
    services = [baton.spawn(f"anon{i}", "worker", "--runtimes", "python") for i in range(2)]
    for service in services:
        await wait_until(lambda service=service: baton._alive_and_logged(service, "worker_registered"), what="register")
    names = {r["name"] for r in await (await baton.pool()).fetch("SELECT name FROM workers WHERE status = 'active'")}
    import socket

    assert names == {f"{socket.gethostname()}-{s.process.pid}" for s in services}
    baton.worker_names |= names


async def test_finish_and_interrupt_are_fenced_by_incarnation_and_finish_is_idempotent(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("fenced", concurrency=1))
    client = await baton.client()
    running = await client.submit("core.sleep", {"seconds": 30}, watch=True)
    row = await baton.wait_status(running.execution_id, "running")
    pool = await baton.pool()
    incarnation = await pool.fetchval("SELECT incarnation FROM workers WHERE name = 'fenced'")
    assert row["incarnation"] == incarnation
    args = ([row["id"]], [row["attempt"]], ["completed"], [json.dumps({"x": 1})], [None], "fenced")
    # Same name, another incarnation (a second process under the name): nothing happens.
    assert await finish_rows(pool, *args, uuid.uuid4(), [None]) == []
    assert await pool.fetch(q.INTERRUPT, row["id"], row["attempt"], "fenced", {}, uuid.uuid4()) == []
    assert (await baton.execution(row["id"]))["status"] == "running"
    # The right incarnation; then the same finish again, as after a lost commit reply: the row
    # comes back (so its one notification is published), with one terminal event only.
    first = await finish_rows(pool, *args, incarnation, [None])
    again = await finish_rows(pool, *args, incarnation, [None])
    assert [r["status"] for r in first] == [r["status"] for r in again] == ["completed"]
    events = await pool.fetch("SELECT type FROM execution_events WHERE execution_id = $1", row["id"])
    assert [e["type"] for e in events].count("execution.completed") == 1


# -- the lost-worker compare-and-set ---------------------------------------------------------


async def test_a_heartbeat_between_find_and_mark_keeps_the_worker_alive(baton):
    pool = await baton.pool()
    incarnation = await _active_worker_row(pool, "late", heartbeat_interval_s=0.1, heartbeat_age_s=3600)
    async with pool.acquire() as conn, conn.transaction():
        found = [r["name"] for r in await conn.fetch(wq.FIND_LOST, 3.0)]
        assert found == ["late"]
        # The worker checks in on another connection between the two statements.
        await pool.execute(wq.HEARTBEAT, "late", incarnation, 0)
        assert await conn.fetchrow(wq.MARK_LOST, 3.0, "late", incarnation) is None
    assert await pool.fetchval("SELECT status FROM workers WHERE name = 'late'") == "active"


# -- stopping while RabbitMQ is away ----------------------------------------------------------


async def test_the_executor_stops_while_rabbitmq_is_down(baton):
    proxy = CuttableProxy(target_port=5672)
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    executor, _ = await baton.started(
        baton.spawn_executor(BATON__MESSAGE_QUEUE__URL=url, BATON__EXECUTOR__SHUTDOWN_TIMEOUT="2"),
        baton.spawn_worker("w1", concurrency=1),
    )
    client = await baton.client()
    running = await client.submit("core.sleep", {"seconds": 2}, watch=True)
    await baton.wait_status(running.execution_id, "running")
    # This one waits as `requested` for the slot; when the slot frees, the broker is gone, and the
    # scheduler is left holding a dispatch it cannot send.
    waiting = await client.submit("core.echo", {"message": "later"})
    await baton.wait_status(waiting.execution_id, "requested")
    await proxy.cut()
    await wait_until(lambda: _has_event(executor, "dispatch_waiting_for_broker"), timeout_s=30,
                     what="the scheduler to wait for the broker")
    executor.signal(signal.SIGTERM)
    assert await asyncio.to_thread(executor.wait, 60) == 0
    assert executor.events("executor_stopped")
    # Put back in line at no cost, for the next executor.
    row = await baton.execution(waiting.execution_id)
    assert row["status"] == "requested" and row["schedule_attempts"] == 0


async def _has_event(service, *names: str) -> bool:
    return any(service.events(n) for n in names)


# -- the requested timeout ------------------------------------------------------------------


async def test_a_request_no_live_worker_serves_fails_after_requested_timeout(baton):
    _, gone = await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__REQUESTED_TIMEOUT="1", BATON__EXECUTOR__TIMEOUT_CHECK_INTERVAL="0.3"),
        baton.spawn_worker("gone", concurrency=1),
    )
    gone.signal(signal.SIGTERM)
    assert gone.wait() == 0
    busy = await baton.start_worker("busy", concurrency=1, runtimes="python")
    client = await baton.client()
    # `core.local` was registered by `gone` and nobody serves it now; `core.sleep` waits for `busy`.
    orphan = await client.submit("core.local", {"cmd": ["true"]}, watch=True)
    blocker = await client.submit("core.sleep", {"seconds": 4}, watch=True)
    await baton.wait_status(blocker.execution_id, "running")
    patient = await client.submit("core.echo", {"message": "waits its turn"}, watch=True)
    failed = await client.wait(orphan.execution_id, 20)
    assert failed["status"] == "failed"
    assert failed["error"]["failed_by"] == "requested_timeout_monitor"
    assert "no live worker serves action 'core.local'" in failed["error"]["error"]
    done = await client.wait(patient.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == busy.name


async def test_a_request_waiting_its_turn_survives_a_restart_of_the_only_worker_serving_it(baton):
    # The request waits longer than the requested timeout behind a busy worker; then that worker
    # dies and comes back. For a moment nobody serves the action, but somebody did a moment ago:
    # the request is waiting its turn, not for a worker that does not exist.
    await baton.start_executor(BATON__EXECUTOR__REQUESTED_TIMEOUT="4", BATON__EXECUTOR__TIMEOUT_CHECK_INTERVAL="0.2")
    busy = await baton.start_worker("only", concurrency=1, runtimes="python")
    client = await baton.client()
    blocker = await client.submit("core.sleep", {"seconds": 30}, watch=True)
    await baton.wait_status(blocker.execution_id, "running")
    patient = await client.submit("core.echo", {"message": "still here"}, watch=True)
    pool = await baton.pool()

    async def waited_past_the_timeout() -> bool:
        return await pool.fetchval(
            "SELECT updated_at < now() - interval '4.5 s' FROM executions WHERE id = $1", patient.execution_id
        )

    await wait_until(waited_past_the_timeout, what="the request to wait longer than the requested timeout")
    busy.signal(signal.SIGKILL)
    busy.wait()

    async def lost() -> bool:
        return await pool.fetchval("SELECT status = 'lost' FROM workers WHERE name = 'only'")

    await wait_until(lost, what="the killed worker to be declared lost")

    async def unserved_for_a_while() -> bool:  # several of the monitor's checks (every 0.2 s) go by
        return await pool.fetchval("SELECT last_heartbeat < now() - interval '1.5 s' FROM workers WHERE name = 'only'")

    await wait_until(unserved_for_a_while, what="the action to have had no live worker for 1.5 s")
    assert (await baton.execution(patient.execution_id))["status"] == "requested"
    await baton.start_worker("only", concurrency=1, runtimes="python")
    done = await client.wait(patient.execution_id, 20)
    assert done["status"] == "completed" and done["result"] == {"message": "still here"}


# -- retention -------------------------------------------------------------------------------


async def test_rows_hold_object_parameters_and_a_pruned_run_finds_its_signals_by_index(baton):
    """A worker reads a run's parameters as an object when it claims it: no row holds anything else.
    Retention's delete cascades to the run's signals: found through an index, not by reading the
    whole table once per pruned execution."""
    import asyncpg

    pool = await baton.pool()
    with pytest.raises(asyncpg.CheckViolationError, match="executions_parameters_object"):
        await pool.execute(
            "INSERT INTO executions (id, action_ref, parameters, status) VALUES ($1, 'core.echo', '[\"a\"]', 'requested')",
            uuid.uuid4(),
        )
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # only a usable index avoids a scan now
        # The statement PostgreSQL runs for the cascade of each deleted execution.
        plan = json.dumps(await conn.fetchval(
            "EXPLAIN (FORMAT JSON) DELETE FROM ONLY workflow_signals WHERE $1 = execution_id", uuid.uuid4()
        ))
    assert "workflow_signals_execution" in plan and "Seq Scan" not in plan, plan


async def test_retention_prunes_old_history_and_gone_workers(baton):
    pool = await baton.pool()
    old, recent = uuid.uuid4(), uuid.uuid4()
    for execution_id, age in ((old, "40 days"), (recent, "1 day")):
        await pool.execute(
            "INSERT INTO executions (id, action_ref, status, finished_at, last_event_seq) "
            f"VALUES ($1, 'core.noop', 'completed', now() - interval '{age}', 1)",
            execution_id,
        )
        await pool.execute("INSERT INTO execution_events (execution_id, seq, type) VALUES ($1, 1, 'x')", execution_id)
    await pool.execute(
        "INSERT INTO workers (name, status, runtimes, actions, max_concurrent_tasks, heartbeat_interval_s,"
        " incarnation, updated_at) VALUES ('ancient', 'inactive', '{python}', '{}', 1, 1, $1, now() - interval '30 days')",
        uuid.uuid4(),
    )
    # The gone worker's queue is still there, empty: it goes with the row. A quorum queue, whose
    # kind refuses a conditional delete.
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(baton.names.worker_queue("ancient"), durable=True,
                                    arguments={"x-queue-type": "quorum"})
    finally:
        await connection.close()
    executor = await baton.start_executor(BATON__RETENTION__PRUNE_INTERVAL="0.3")
    await wait_until(lambda: _gone(pool, old), what="the old execution to be pruned")
    assert await pool.fetchval("SELECT count(*) FROM execution_events WHERE execution_id = $1", old) == 0
    assert await pool.fetchval("SELECT count(*) FROM executions WHERE id = $1", recent) == 1
    await wait_until(lambda: _worker_gone(pool, "ancient"), what="the gone worker to be pruned")
    # Logged once the pass is over, a moment after the row is gone.
    await wait_until(lambda: _has_event(executor, "pruned"), what="the prune to be logged")
    with pytest.raises(Exception, match="NOT_FOUND"):
        await baton.queue_depth(baton.names.worker_queue("ancient"))
    assert executor.process.poll() is None


async def test_the_executor_vacuums_hot_tables_that_gather_dead_rows(baton):
    """On a server whose autovacuum is off (or behind), the executor clears dead rows itself."""
    pool = await baton.pool()
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO executions (id, action_ref, status, last_event_seq) "
            "SELECT gen_random_uuid(), 'core.noop', 'requested', 1 FROM generate_series(1, 300)"
        )
        for _ in range(3):  # every update leaves a dead version behind
            await conn.execute("UPDATE executions SET updated_at = now()")
        await conn.execute("SELECT pg_stat_force_next_flush()")  # counted now, not when idle for 10 s
    executor = await baton.start_executor(
        BATON__RETENTION__VACUUM_INTERVAL="0.3", BATON__RETENTION__VACUUM_DEAD_ROWS="500"
    )
    vacuumed = await wait_until(
        lambda: _async([e for e in executor.events("table_vacuumed") if e["table"] == "executions"]),
        what="the executions table to be vacuumed",
    )
    assert vacuumed[0]["dead_rows"] >= 500
    assert await pool.fetchval(
        "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'executions'"
    )


async def _async(value):
    return value


async def _gone(pool, execution_id) -> bool:
    return await pool.fetchval("SELECT count(*) FROM executions WHERE id = $1", execution_id) == 0


async def _worker_gone(pool, name) -> bool:
    return await pool.fetchval("SELECT count(*) FROM workers WHERE name = $1", name) == 0


async def test_prune_by_hand(baton):
    pool = await baton.pool()
    await pool.execute(
        "INSERT INTO executions (id, action_ref, status, finished_at) VALUES ($1, 'core.noop', 'failed', now() - interval '3 days'),"
        " ($2, 'core.noop', 'requested', NULL)",
        uuid.uuid4(), uuid.uuid4(),
    )
    result = await baton.cli("executions", "prune", "--older-than", "2d")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "deleted 1 finished execution(s) older than 2d"
    assert await pool.fetchval("SELECT count(*) FROM executions") == 1  # the unfinished one stays


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_cleanly_stopped_worker_deletes_its_empty_queue(baton, queue_type):
    baton.env["BATON__MESSAGE_QUEUE__QUEUE_TYPE"] = queue_type
    _, worker = await baton.started(baton.spawn_executor(), baton.spawn_worker("tidy"))
    assert await baton.queue_depth(baton.names.worker_queue("tidy")) == 0
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert worker.events("worker_queue_deleted")
    with pytest.raises(Exception, match="NOT_FOUND"):
        await baton.queue_depth(baton.names.worker_queue("tidy"))


async def test_the_client_unbinds_what_it_bound(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    client = await baton.client()
    for i in range(3):
        assert (await client.run("core.echo", {"message": str(i)}, wait_timeout_s=20))["status"] == "completed"
    bindings = subprocess.run(
        ["rabbitmqctl", "-q", "list_bindings", "source_name", "routing_key"], capture_output=True, text=True, timeout=60
    ).stdout
    assert not [line for line in bindings.splitlines() if line.startswith(baton.names.notifications_exchange)]


def _notification_bindings(baton) -> list[str]:
    bindings = subprocess.run(
        ["rabbitmqctl", "-q", "list_bindings", "source_name", "routing_key"], capture_output=True, text=True, timeout=60
    ).stdout
    return [line for line in bindings.splitlines() if line.startswith(baton.names.notifications_exchange)]


async def test_the_client_unbinds_the_watch_of_a_request_refused_or_never_posted(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    client = await baton.client()
    # Refused outright by the executor (too large to record): no execution will be notified.
    too_large = "x" * (baton.settings().message_queue.max_request_bytes + 1)
    with pytest.raises(RequestRejected, match="larger than the limit"):
        await client.run("core.echo", {"message": too_large})
    assert _notification_bindings(baton) == []
    # Not posted at all: the broker returns it (the request queue's binding was removed since the
    # client declared it).
    connection = await aio_pika.connect(baton.amqp_url)
    try:
        channel = await connection.channel()
        requests = await channel.get_queue(baton.names.requests_queue)
        await requests.unbind(baton.names.executions_exchange, amqp.REQUESTED_KEY)
    finally:
        await connection.close()
    for watch in (True, False):
        with pytest.raises(RequestNotPosted, match="start an executor with this"):
            await client.submit("core.echo", {"message": "lost"}, watch=watch)
    assert _notification_bindings(baton) == []
    assert client._notified == {}


# -- health ----------------------------------------------------------------------------------


async def test_health_reports_a_live_connected_executor_and_a_dead_one(baton, tmp_path):
    health_file = str(tmp_path / "executor.health")
    executor = await baton.start_executor(BATON__EXECUTOR__HEALTH_FILE=health_file)

    async def health() -> subprocess.CompletedProcess[str]:
        return await baton.cli("health", "--service", "executor", BATON__EXECUTOR__HEALTH_FILE=health_file)

    async def healthy() -> bool:
        return (await health()).returncode == 0

    await wait_until(healthy, what="a healthy report")
    out = (await health()).stdout
    assert "executor: executor pid" in out and "postgresql: reachable at 127.0.0.1:5432" in out
    assert "rabbitmq: reachable at 127.0.0.1:5672" in out
    executor.signal(signal.SIGKILL)
    executor.wait()
    result = await health()
    assert result.returncode == 1 and "is gone" in result.stdout


async def test_health_and_worker_options_fail_in_one_line_that_names_the_fix(baton):
    # Nothing listens on port 1; the broker refuses a wrong password.
    result = await baton.cli(
        "health",
        BATON__DATABASE__URL="postgresql://postgres@127.0.0.1:1/nothing",
        BATON__MESSAGE_QUEUE__URL="amqp://guest:wrong@127.0.0.1:5672/",
    )
    assert result.returncode == 1
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["postgresql"].startswith("cannot connect to PostgreSQL at 127.0.0.1:1 (")
    assert lines["postgresql"].endswith("start PostgreSQL there, or fix database.url (user, password, host, port)")
    assert lines["rabbitmq"] == (
        "RabbitMQ at 127.0.0.1:5672 refused the login of user 'guest': fix the user or password in message_queue.url"
    )

    result = await baton.cli("worker", "--name", "not a name")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "invalid worker option worker.name: String should match pattern '^[A-Za-z0-9_.\\-]+$': "
        "fix --name, --concurrency or --runtimes"
    ]
