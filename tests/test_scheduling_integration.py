"""Retries, delays, cron schedules and concurrency limits against the real services: state in
PostgreSQL, nothing waiting in a worker slot, and several executors side by side."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import uuid

import pytest

from common.ids import batch_execution_id
from tests.harness import Baton, wait_until

pytestmark = pytest.mark.integration


async def _events(baton: Baton, execution_id) -> list[dict]:
    rows = await (await baton.pool()).fetch(
        "SELECT seq, type, data, created_at FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        uuid.UUID(str(execution_id)),
    )
    return [dict(r) for r in rows]


# -- waking for freed capacity --------------------------------------------------------------------


async def test_work_waiting_for_a_full_worker_starts_when_it_frees_while_another_worker_has_room(baton):
    # No fallback pass: only a wake-up can place the waiting request.
    await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__SCHEDULER_FALLBACK_INTERVAL="3600"),
        baton.spawn_worker("py", concurrency=1, runtimes="python"),
        baton.spawn_worker("sh", runtimes="shell"),
    )
    client = await baton.client()
    busy = await client.submit("core.sleep", {"seconds": 1.5})
    await baton.wait_status(busy.execution_id, "running")
    # Only the full worker serves it; the pass that intake wakes finds room only on the shell
    # worker, for actions nobody asked for. It must still count this as work left waiting.
    waiting = await client.submit("core.echo", {"message": "next in line"})
    assert (await baton.execution(waiting.execution_id))["status"] == "requested"
    done = await client.wait(waiting.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == "py"


async def _placed_by_intake(baton: Baton, client) -> dict:
    """A no-op placed by intake, run to its end. While nothing waits and no scheduler pass is
    under way, intake places a request in the statement that records it (one `now()` for both),
    and its reply says so; afterwards nothing wakes the scheduler."""

    async def one() -> dict | None:
        submission = await client.submit("core.noop")
        await client.wait(submission.execution_id, 20)
        return await baton.execution(submission.execution_id) if submission.status == "scheduled" else None

    return await wait_until(one, what="a request placed by intake")


async def test_intake_places_what_it_records_while_nothing_waits_and_queues_behind_a_backlog(baton):
    # No fallback pass: what the scheduler places, a wake-up made it place.
    await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__SCHEDULER_FALLBACK_INTERVAL="3600"),
        baton.spawn_worker("solo", concurrency=1, runtimes="python"),
    )
    client = await baton.client()
    row = await _placed_by_intake(baton, client)
    assert row["worker"] == "solo" and row["scheduled_at"] == row["created_at"] and row["last_event_seq"] == 4
    # The only slot taken, the next request waits as `requested`, and the one after it waits
    # behind it rather than being placed ahead of it when the slot frees.
    first = await client.submit("core.sleep", {"seconds": 1.0})
    await baton.wait_status(first.execution_id, "running")
    second = await client.submit("core.echo", {"message": "second"})
    third = await client.submit("core.echo", {"message": "third"})
    assert second.status == third.status == "requested"
    done = [await client.wait(s.execution_id, 20) for s in (first, second, third)]
    assert [d["status"] for d in done] == ["completed"] * 3
    assert done[0]["finished_at"] <= done[1]["started_at"] and done[1]["finished_at"] <= done[2]["started_at"]
    for later in done[1:]:
        assert later["scheduled_at"] > later["created_at"]  # placed by a scheduler pass


async def test_intake_does_not_place_ahead_of_work_another_executor_left_waiting(baton):
    await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__SCHEDULER_FALLBACK_INTERVAL="3600"),
        baton.spawn_worker("solo", concurrency=1, runtimes="python"),
    )
    client = await baton.client()
    await _placed_by_intake(baton, client)
    # Recorded by another executor a moment ago, not yet placed: no wake-up reaches this one.
    older = uuid.uuid4()
    await (await baton.pool()).execute(
        "INSERT INTO executions (id, action_ref, parameters, status) VALUES ($1, 'core.echo', '{\"message\": \"older\"}', 'requested')",
        older,
    )
    newer = await client.submit("core.echo", {"message": "newer"})
    assert newer.status == "requested"  # behind the older one, although the worker is idle
    done = [await client.wait(i, 20) for i in (older, newer.execution_id)]
    assert [d["status"] for d in done] == ["completed"] * 2
    assert done[0]["finished_at"] <= done[1]["started_at"]


async def test_intake_places_a_batch_around_the_action_that_has_work_waiting(baton):
    """Work waiting for one action holds back new requests of that action only: in the same
    batch, a request of another action is placed as intake records it."""
    await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__SCHEDULER_FALLBACK_INTERVAL="3600"),
        baton.spawn_worker("solo", concurrency=2, runtimes="python"),
    )
    client = await baton.client()
    await _placed_by_intake(baton, client)
    older = uuid.uuid4()  # recorded by another executor a moment ago, not yet placed
    await (await baton.pool()).execute(
        "INSERT INTO executions (id, action_ref, parameters, status) VALUES ($1, 'core.echo', '{\"message\": \"older\"}', 'requested')",
        older,
    )
    body = json.dumps([{"action_ref": "core.echo", "parameters": {"message": "newer"}}, {"action_ref": "core.noop"}])
    await baton.publish_raw(body.encode(), message_id="mixed-1")
    echo, noop = (str(batch_execution_id("mixed-1", i)) for i in range(2))
    done = {i: await client.wait(i, 20) for i in (older, echo, noop)}
    assert [d["status"] for d in done.values()] == ["completed"] * 3
    assert done[noop]["scheduled_at"] == done[noop]["created_at"]  # placed by intake
    assert done[echo]["scheduled_at"] > done[echo]["created_at"]  # behind the older one, by a pass


# -- retries ---------------------------------------------------------------------------------------


async def test_a_retried_action_succeeds_on_its_third_try_waiting_in_the_database(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("r1", concurrency=1))
    path = baton.tmp / "tries"
    client = await baton.client()
    done = await client.run("tests.flaky", {"path": str(path), "failures": 2}, wait_timeout_s=30)
    assert done["status"] == "completed" and done["result"] == 3
    assert done["failed_tries"] == 2
    kinds = [e["type"] for e in done["events"]]
    assert kinds.count("execution.retrying") == 2 and kinds.count("execution.started") == 3
    # Between tries it waited as `requested` in PostgreSQL, until its backoff had passed.
    assert kinds.count("execution.due") == 2
    retrying = [e for e in done["events"] if e["type"] == "execution.retrying"]
    assert [e["data"]["try"] for e in retrying] == [1, 2]
    assert retrying[1]["data"]["retry_in_s"] > retrying[0]["data"]["retry_in_s"]  # exponential
    starts = [dt.datetime.fromisoformat(e["created_at"]) for e in done["events"] if e["type"] == "execution.started"]
    assert starts[1] - starts[0] >= dt.timedelta(seconds=0.2) and starts[2] - starts[1] >= dt.timedelta(seconds=0.4)


async def test_retries_run_out_and_the_error_says_how_many_tries(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("r1"))
    client = await baton.client()
    exhausted = await client.run("tests.flaky", {"path": str(baton.tmp / "a"), "failures": 99}, wait_timeout_s=30)
    assert exhausted["status"] == "failed"
    assert exhausted["error"]["error"].startswith("failed after 4 tries: RuntimeError: failure 4")
    assert exhausted["error"]["tries"] == 4 and len((baton.tmp / "a").read_text().splitlines()) == 4

    # The invocation's max_retries overrides the action's retries.
    once = await client.submit("tests.flaky", {"path": str(baton.tmp / "b"), "failures": 99}, max_retries=1, watch=True)
    assert (await client.wait(once.execution_id, 30))["error"]["tries"] == 2
    never = await client.submit("tests.flaky", {"path": str(baton.tmp / "c"), "failures": 99}, max_retries=0, watch=True)
    done = await client.wait(never.execution_id, 30)
    assert done["status"] == "failed" and len((baton.tmp / "c").read_text().splitlines()) == 1

    # A failure that is not among the action's retry_on is not retried.
    other = await client.run("tests.not_retried", {"path": str(baton.tmp / "d")}, wait_timeout_s=30)
    assert other["status"] == "failed" and "ValueError" in other["error"]["error"]
    assert len((baton.tmp / "d").read_text().splitlines()) == 1


# -- delays ----------------------------------------------------------------------------------------


async def test_delayed_execution_does_not_run_early_and_survives_an_executor_restart(baton):
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("d1"))
    client = await baton.client()
    early = await client.submit("core.echo", {"message": "later"}, delay_s=3.0, watch=True)
    row = await baton.wait_status(early.execution_id, "requested")
    assert row["not_before"] is not None
    executor.signal(signal.SIGTERM)
    assert executor.wait(20) == 0
    await baton.start_executor("executor-2")
    # Read against the database's clock: while it is not yet due, the new executor leaves it be.
    pool = await baton.pool()
    now = await pool.fetchrow(
        "SELECT status, now() < not_before AS early FROM executions WHERE id = $1", early.execution_id
    )
    assert now["status"] == "requested" or not now["early"]
    done = await client.wait(early.execution_id, 30)
    assert done["status"] == "completed"
    started = dt.datetime.fromisoformat(done["started_at"])
    assert started >= row["not_before"]
    assert "execution.due" in [e["type"] for e in done["events"]]

    past = await client.submit(
        "core.echo", {"message": "now"}, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), watch=True
    )
    assert (await client.wait(past.execution_id, 20))["status"] == "completed"


# -- schedules -------------------------------------------------------------------------------------


async def test_cron_fires_each_due_time_once_with_two_executors_one_sigkilled(baton):
    doomed = await baton.start_executor("executor-a")
    await baton.started(baton.spawn_executor("executor-b"), baton.spawn_worker("c1", concurrency=8))
    client = await baton.client()
    await client.add_schedule("every-second", "* * * * * *", "core.noop", catch_up="all")
    pool = await baton.pool()

    async def fired(n: int) -> bool:
        return await pool.fetchval("SELECT count(*) FROM executions WHERE schedule_name = 'every-second'") >= n

    await wait_until(lambda: fired(3), what="three due times to fire")
    doomed.signal(signal.SIGKILL)
    before = await pool.fetchval("SELECT count(*) FROM executions WHERE schedule_name = 'every-second'")
    await wait_until(lambda: fired(before + 4), what="the survivor to go on firing")
    await client.remove_schedule("every-second")
    rows = await pool.fetch(
        "SELECT scheduled_for, count(*) AS n FROM executions WHERE schedule_name = 'every-second' "
        "GROUP BY scheduled_for ORDER BY scheduled_for"
    )
    times = [r["scheduled_for"] for r in rows]
    assert all(r["n"] == 1 for r in rows)  # no due time fired twice
    assert times == [times[0] + dt.timedelta(seconds=i) for i in range(len(times))]  # none skipped
    statuses = await pool.fetch("SELECT DISTINCT status FROM executions WHERE schedule_name = 'every-second'")
    assert {r["status"] for r in statuses} <= {"requested", "scheduled", "running", "completed"}


@pytest.mark.parametrize(("catch_up", "missed_fired"), [("all", 11), ("latest", 1), ("none", 0)])
async def test_catch_up_policy_after_an_executor_outage(baton, catch_up, missed_fired):
    client = await baton.client()
    pool = await baton.pool()
    # Not in the first seconds of a minute (the minute's own due time is then clearly missed too),
    # nor in its last ones: the next minute must not begin before the executor has caught up, or
    # one more due time is missed (a busy machine takes seconds to start an executor).
    while not 3 <= (await pool.fetchval("SELECT extract(second FROM now())")) < 40:
        await asyncio.sleep(0.2)
    await client.add_schedule("minutely", "* * * * *", "core.noop", catch_up=catch_up)
    # Every executor was away for the last ten minutes (and more): the schedule was due 11 times.
    start = await pool.fetchval("SELECT date_trunc('minute', now()) - interval '10 minutes'")
    await pool.execute("UPDATE schedules SET next_fire_at = $1 WHERE name = 'minutely'", start)
    await baton.start_executor(BATON__EXECUTOR__SCHEDULE_MISFIRE_GRACE="2")

    async def advanced() -> bool:
        return await pool.fetchval("SELECT next_fire_at > now() FROM schedules WHERE name = 'minutely'")

    await wait_until(advanced, what="the schedule to be caught up")
    rows = await pool.fetch(
        "SELECT scheduled_for FROM executions WHERE schedule_name = 'minutely' ORDER BY scheduled_for"
    )
    assert len(rows) == missed_fired
    if catch_up == "all":
        assert [r["scheduled_for"] for r in rows] == [start + dt.timedelta(minutes=i) for i in range(11)]
    if catch_up == "latest":
        assert rows[0]["scheduled_for"] == start + dt.timedelta(minutes=10)


async def test_schedules_from_yaml_and_bad_ones_refused(baton):
    client = await baton.client()
    with pytest.raises(ValueError, match="not a cron expression"):
        await client.add_schedule("bad", "every day", "core.noop")
    with pytest.raises(ValueError, match="not a time zone"):
        await client.add_schedule("bad", "* * * * *", "core.noop", timezone="Mars/Olympus")
    await baton.start_executor(BATON__SCHEDULES='{"from-yaml": {"cron": "* * * * * *", "action_ref": "core.echo", '
                                                '"parameters": {"message": "tick"}}}')
    await baton.start_worker("y1")
    pool = await baton.pool()
    done = await wait_until(
        lambda: pool.fetchrow("SELECT * FROM executions WHERE schedule_name = 'from-yaml' AND status = 'completed'"),
        what="the YAML schedule to fire",
    )
    assert done["result"] == {"message": "tick"}
    listed = await client.list_schedules()
    assert [(s["name"], s["source"]) for s in listed] == [("from-yaml", "yaml")]
    with pytest.raises(ValueError, match="YAML"):
        await client.add_schedule("from-yaml", "* * * * *", "core.noop")


# -- concurrency limits ----------------------------------------------------------------------------


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize(("env", "limit"), [({}, 2), ({"BATON__EXECUTOR__MAX_CONCURRENCY": '{"tests.limited_sleep": 1}'}, 1)])
async def test_concurrency_limit_holds_under_a_burst_across_three_workers(baton, env, limit):
    await baton.start_executor("executor-a", **env)
    await baton.start_executor("executor-b", **env)
    for name in ("l1", "l2", "l3"):
        await baton.start_worker(name, concurrency=4)
    client = await baton.client()
    submissions = await asyncio.gather(
        *(client.submit("tests.limited_sleep", {"seconds": 0.3}, watch=True) for _ in range(10))
    )
    done = [await client.wait(s.execution_id, 60) for s in submissions]
    assert all(d["status"] == "completed" for d in done)
    spans = [(d["result"]["start"], d["result"]["end"]) for d in done]
    assert _most_at_once(spans) == limit  # never more, and the limit was used
    assert len({d["worker"] for d in done}) >= min(limit, 2)
