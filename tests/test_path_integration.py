"""The whole path with real services: post -> record -> dispatch -> run -> record -> notify."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.integration


async def test_echo_end_to_end(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    done = await client.run("core.echo", {"message": "hello"}, wait_timeout_s=20)
    assert done["status"] == "completed"
    assert done["result"] == {"message": "hello"}
    assert done["worker"] == "w1" and done["attempt"] == 1
    assert [e["type"] for e in done["events"]] == [
        "execution.requested",
        "execution.scheduled",
        "execution.started",
        "execution.completed",
    ]


async def test_each_outcome_a_worker_records_is_announced(baton):
    """A worker announces a batch of outcomes in one write; each still arrives on its own key."""
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1", concurrency=20))
    client = await baton.client()
    submissions = [await client.submit("core.echo", {"message": f"m{i}"}, watch=True) for i in range(20)]
    for sub in submissions:
        # Only a notification sets this (the waiter's own re-reads of the row do not).
        await asyncio.wait_for(client._notified[str(sub.execution_id)].wait(), 20)
    assert {(await client.get(s.execution_id))["status"] for s in submissions} == {"completed"}


async def test_every_builtin_and_a_python_action(baton, tmp_path):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()

    noop = await client.run("core.noop", wait_timeout_s=20)
    assert noop["status"] == "completed" and noop["result"] is None

    slept = await client.run("core.sleep", {"seconds": 0.2}, wait_timeout_s=20)
    assert slept["status"] == "completed" and slept["result"] == {"slept_s": 0.2}

    argv = await client.run("core.local", {"cmd": ["printf", "%s|", "a b", "c"]}, wait_timeout_s=20)
    assert argv["status"] == "completed"
    assert argv["result"]["stdout"] == "a b|c|" and argv["result"]["exit_code"] == 0

    (tmp_path / "here.txt").write_text("found")
    script = await client.run(
        "core.local",
        {"cmd": 'cat here.txt; echo " $GREETING"; cat; echo oops >&2', "env": {"GREETING": "hi"},
         "cwd": str(tmp_path), "stdin": "from-stdin"},
        wait_timeout_s=20,
    )
    assert script["status"] == "completed", script
    assert script["result"]["stdout"] == "found hi\nfrom-stdin"
    assert script["result"]["stderr"] == "oops\n"

    added = await client.run("examples.add", {"a": 1, "b": 2.5}, wait_timeout_s=20)
    assert added["status"] == "completed" and added["result"] == {"sum": 3.5}

    sync = await client.run("tests.blocking_sleep", {"seconds": 0.1}, wait_timeout_s=20)
    assert sync["status"] == "completed"


async def test_failures_are_recorded_with_their_reason(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()

    shell = await client.run("core.local", {"cmd": "echo partial; exit 3"}, wait_timeout_s=20)
    assert shell["status"] == "failed"
    assert shell["error"]["error"] == "command exited with code 3"
    assert shell["result"]["exit_code"] == 3 and shell["result"]["stdout"] == "partial\n"

    missing = await client.run("core.local", {"cmd": ["/no/such/program"]}, wait_timeout_s=20)
    assert missing["status"] == "failed" and "cannot start" in missing["error"]["error"]

    raised = await client.run("tests.fail", {"message": "kaput"}, wait_timeout_s=20)
    assert raised["status"] == "failed"
    assert raised["error"]["error"] == "RuntimeError: kaput" and "Traceback" in raised["error"]["traceback"]

    division = await client.run("examples.divide", {"a": 1, "b": 0}, wait_timeout_s=20)
    assert division["status"] == "failed" and "ZeroDivisionError" in division["error"]["error"]


async def test_shell_parameters_are_never_interpolated(baton, tmp_path):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    marker = tmp_path / "pwned"
    hostile = f"$(touch {marker}); `touch {marker}`; echo injected"
    done = await client.run(
        "core.local", {"cmd": 'printf "%s" "$PAYLOAD"', "env": {"PAYLOAD": hostile}}, wait_timeout_s=20
    )
    assert done["status"] == "completed"
    assert done["result"]["stdout"] == hostile
    argv = await client.run("core.local", {"cmd": ["echo", hostile]}, wait_timeout_s=20)
    assert argv["result"]["stdout"] == hostile + "\n"
    assert not marker.exists()


async def test_output_and_results_are_capped(baton):
    await baton.started(
        baton.spawn_executor(), baton.spawn_worker("w1", BATON__WORKER__MAX_OUTPUT_BYTES="100")
    )
    client = await baton.client()
    done = await client.run("core.local", {"cmd": "head -c 100000 /dev/zero | tr '\\0' a; echo done >&2"}, wait_timeout_s=20)
    assert done["status"] == "completed"
    assert done["result"]["stdout"] == "a" * 100 and done["result"]["stdout_truncated"] is True
    assert done["result"]["stderr"] == "done\n" and done["result"]["stderr_truncated"] is False
    big = await client.run("tests.big_result", {"size": 1000}, wait_timeout_s=20)
    assert big["status"] == "failed" and "max_output_bytes" in big["error"]["error"]


async def test_idempotent_repost_returns_the_same_execution(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    first = await client.submit("core.echo", {"message": "once"}, idempotency_key="order-42")
    second = await client.submit("core.echo", {"message": "once"}, idempotency_key="order-42")
    assert first.accepted and not first.duplicate
    assert second.duplicate and second.execution_id == first.execution_id
    done = await client.wait(first.execution_id, 20)
    assert done["status"] == "completed"
    third = await client.submit("core.echo", {"message": "once"}, idempotency_key="order-42")
    assert third.execution_id == first.execution_id and third.status == "completed"
    count = await (await baton.pool()).fetchval("SELECT count(*) FROM executions")
    assert count == 1


async def test_a_redelivered_request_is_recorded_once(baton):
    """The same message twice (as after an executor crash before its ack) is one execution."""
    await baton.start_executor()
    body = b'{"action_ref": "core.noop"}'
    await baton.publish_raw(body, message_id="client-message-7")
    await baton.publish_raw(body, message_id="client-message-7")
    # Intake takes requests in order, one batch after another: once a request posted after both
    # is recorded, both copies have been handled (an empty queue alone does not say so: a copy
    # delivered but not yet recorded is not counted in its depth).
    await baton.publish_raw(body, message_id="posted-after")
    pool = await baton.pool()

    async def later_one_recorded():
        return await pool.fetchval("SELECT count(*) FROM executions WHERE message_id = 'posted-after'")

    from tests.harness import wait_until

    await wait_until(later_one_recorded, what="the request posted after both copies to be recorded")
    rows = await pool.fetch("SELECT message_id FROM executions WHERE message_id <> 'posted-after'")
    assert [r["message_id"] for r in rows] == ["client-message-7"]


async def test_waits_for_a_worker_then_runs_when_one_registers(baton):
    await baton.start_executor()
    client = await baton.client()
    submission = await client.submit("core.echo", {"message": "patience"})
    assert submission.accepted and submission.status == "requested"
    row = await baton.execution(submission.execution_id)
    assert row["status"] == "requested" and row["worker"] is None
    await baton.start_worker("late")
    done = await client.wait(submission.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == "late"


async def test_runtime_matching(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("shelly", runtimes="shell"))
    client = await baton.client()
    shell = await client.run("core.local", {"cmd": ["true"]}, wait_timeout_s=20)
    assert shell["worker"] == "shelly"
    # No worker serves Python yet: the request waits instead of going to the shell worker.
    pending = await client.submit("core.echo", {"message": "py"})
    await baton.start_worker("pythia", runtimes="python")
    done = await client.wait(pending.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == "pythia"
    for _ in range(3):
        again = await client.run("core.local", {"cmd": ["true"]}, wait_timeout_s=20)
        assert again["worker"] == "shelly"


async def test_work_is_spread_over_workers(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("a", concurrency=2))
    await baton.start_worker("b", concurrency=2)
    client = await baton.client()
    submissions = [await client.submit("core.sleep", {"seconds": 0.3}, watch=True) for _ in range(8)]
    workers = {(await client.wait(s.execution_id, 20))["worker"] for s in submissions}
    assert workers == {"a", "b"}


async def test_a_restarted_worker_reuses_its_row(baton):
    import signal

    _, first = await baton.started(baton.spawn_executor(), baton.spawn_worker("again"))
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    await baton.start_worker("again")
    rows = await (await baton.pool()).fetch("SELECT name, status FROM workers")
    assert [(r["name"], r["status"]) for r in rows] == [("again", "active")]
    done = await (await baton.client()).run("core.noop", wait_timeout_s=20)
    assert done["worker"] == "again"


async def test_changing_the_queue_ttl_takes_effect_on_restart(baton):
    import signal

    _, first = await baton.started(
        baton.spawn_executor(), baton.spawn_worker("tuned", BATON__WORKER__QUEUE_TTL="300")
    )
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    await baton.start_worker("tuned", BATON__WORKER__QUEUE_TTL="60")
    done = await (await baton.client()).run("core.echo", {"message": "tuned"}, wait_timeout_s=20)
    assert done["status"] == "completed" and done["worker"] == "tuned"
    # The queue now has the new TTL: the broker refuses a declaration with the old one (so the
    # queue exists, with other arguments) and accepts one with exactly the new arguments.
    assert not await _declares(baton, "tuned", queue_ttl_ms=300_000)
    assert await _declares(baton, "tuned", queue_ttl_ms=60_000)


async def _declares(baton, worker: str, *, queue_ttl_ms: int) -> bool:
    """Whether the broker accepts declaring the worker's queue with these arguments (it refuses a
    declaration whose arguments differ from the existing queue's)."""
    import aio_pika
    import aiormq.exceptions

    from common import amqp
    from tests.harness import AMQP_URL

    arguments = amqp.worker_queue_arguments(baton.names, queue_ttl_ms=queue_ttl_ms, queue_type="classic")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(baton.names.worker_queue(worker), durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        return True
    finally:
        await connection.close()
