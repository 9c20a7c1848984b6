"""`message_queue.queue_type: quorum` with real processes against the local (single-node) broker:
the queues are quorum queues, work completes, a dispatch that expires in a worker's queue and one a
draining worker hands back are both dead-lettered (at least once) and rescheduled, and a queue left
by the other queue type is declared anew when it is empty, never when it holds messages."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import uuid
from typing import Any

import aio_pika
import pytest

from common import amqp
from common.client import BatonClient
from common.settings import Settings
from tests.harness import AMQP_URL, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to read queue types"),
]

QUORUM = {"BATON__MESSAGE_QUEUE__QUEUE_TYPE": "quorum"}
#: A SIGSTOPped worker stays `active`: what happens to its dispatches is then up to the queue TTL alone.
BLIND = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}


@pytest.fixture
async def quorum_client(baton):
    """Every service of this test's world, and its client, run with `queue_type: quorum`."""
    baton.env.update(QUORUM)
    client = BatonClient(
        Settings(
            database={"url": baton.db_url},
            message_queue={"url": AMQP_URL, "prefix": baton.prefix, "queue_type": "quorum"},
        )
    )
    yield client
    await client.close()


async def _queues(prefix: str) -> dict[str, dict[str, Any]]:
    """This test's queues as the broker lists them: name -> {"type", "arguments"}. (Not their message
    counts: a quorum queue reports those to `rabbitmqctl` only every few seconds; a passive declare,
    `baton.queue_depth`, is exact.)"""
    listed = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_queues", "-q", "--formatter", "json", "name", "type", "arguments"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return {
        row["name"]: {"type": row["type"], "arguments": {key: value for key, _, value in row["arguments"]}}
        for row in json.loads(listed.stdout)
        if row["name"].startswith(f"{prefix}.")
    }


async def _running_on(baton, execution_id, worker: str) -> dict:
    async def check():
        row = await baton.execution(execution_id)
        return row if row["status"] == "running" and row["worker"] == worker else None

    return await wait_until(check, what=f"execution {execution_id} running on {worker}")


def _handled(executor, execution_id, reason: str, *, also_dropped: bool = False) -> list[dict]:
    events = executor.events("dead_letter_handled") + (executor.events("dead_letter_dropped") if also_dropped else [])
    return [e for e in events if e["execution_id"] == str(execution_id) and e["death_reason"] == reason]


async def test_queues_are_quorum_and_work_completes(baton, quorum_client):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("replicated"))
    echo = await quorum_client.run("core.echo", {"message": "on a quorum"}, wait_timeout_s=20)
    assert echo["status"] == "completed" and echo["result"] == {"message": "on a quorum"}
    local = await quorum_client.run("core.local", {"cmd": ["echo", "quorum"]}, wait_timeout_s=20)
    assert local["status"] == "completed" and local["result"]["stdout"] == "quorum\n"
    assert echo["worker"] == local["worker"] == "replicated"

    names = baton.names
    queues = await _queues(baton.prefix)
    # A client's reply queue cannot be quorum (it is exclusive): it stays classic, whatever its name.
    replies = {name: q for name, q in queues.items() if name.startswith(f"{baton.prefix}.reply.")}
    assert all(q["type"] == "classic" for q in replies.values())
    durable = {name: q["type"] for name, q in queues.items() if name not in replies}
    assert durable == dict.fromkeys(
        [names.requests_queue, names.dead_letters_queue, names.rejected_requests_queue, names.worker_queue("replicated")],
        "quorum",
    )
    assert queues[names.worker_queue("replicated")]["arguments"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": 300_000,
        "x-dead-letter-exchange": names.dlx,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queues[names.rejected_requests_queue]["arguments"] == {
        "x-queue-type": "quorum", "x-max-length": 100_000, "x-max-length-bytes": 64 * 1024 * 1024,
        "x-overflow": "drop-head",
    }

    # A publisher that does not know the setting (here: declaring the request queue as classic) uses
    # the queue as it is, and its request is recorded and run.
    raw_id = uuid.uuid4()
    await baton.publish_raw(
        json.dumps({"action_ref": "core.echo", "parameters": {"message": "raw"}}).encode(), message_id=str(raw_id)
    )
    pool = await baton.pool()

    async def raw_completed():
        return await pool.fetchrow("SELECT result FROM executions WHERE id = $1 AND status = 'completed'", raw_id)

    raw = await wait_until(raw_completed, what="the raw request to complete")
    assert raw["result"] == {"message": "raw"}
    assert (await _queues(baton.prefix))[names.requests_queue]["type"] == "quorum"


async def test_expired_dispatch_is_dead_lettered_and_rescheduled(baton, quorum_client):
    """A worker frozen with dispatches queued behind the one it has received: those expire after the
    queue TTL, reach the dead-letter handler, are rescheduled, and complete on another worker."""
    baton.env.update(BLIND)
    # Until the free worker is up, an expired dispatch goes back to the frozen worker, as often as
    # booting takes: no dispatch may fail for want of a worker meanwhile.
    executor = await baton.start_executor(
        BATON__EXECUTOR__DISPATCH_PIPELINE="3", BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS="100"
    )
    stuck = await baton.start_worker("stuck", concurrency=1, BATON__WORKER__QUEUE_TTL="1")
    stuck.signal(signal.SIGSTOP)
    try:
        # One slot plus a pipeline of three: all four go to the frozen worker, which receives one of
        # them. Each is dispatched before the next is posted, so that each is a message of its own (a
        # scheduling pass sends what it places on a worker as one message).
        subs = []
        for i in range(4):
            subs.append(await quorum_client.submit("core.echo", {"message": f"q{i}"}, watch=True))
            assert (await baton.wait_status(subs[-1].execution_id, "scheduled"))["worker"] == "stuck"
        # With no other worker, an expired dispatch is rescheduled onto the same worker, and expires again.
        await wait_until(lambda: _async(executor.events("dead_letter_handled")), what="a dead-lettered dispatch")
        await baton.start_worker("free")

        async def moved():
            rows = [await baton.execution(s.execution_id) for s in subs]
            done = [r for r in rows if r["status"] == "completed" and r["worker"] == "free"]
            return done if len(done) >= 3 else None

        done = await wait_until(moved, what="the expired dispatches to complete on another worker")
        for row in done:
            assert row["attempt"] >= 2
            assert _handled(executor, row["id"], "expired"), f"no expired dead letter for {row['id']}"
    finally:
        stuck.signal(signal.SIGCONT)
    # The dispatch the frozen worker had received was never expired (it was delivered): it runs there now.
    for s in subs:
        assert (await baton.wait_status(s.execution_id, "completed"))["status"] == "completed"

    async def drained():
        queues = (baton.names.worker_queue("stuck"), baton.names.dead_letters_queue)
        return all([await baton.queue_depth(q) == 0 for q in queues])

    await wait_until(drained, what="the worker and dead-letter queues to empty")


async def test_drain_hands_back_through_the_dead_letter_exchange(baton, quorum_client):
    executor, leaving = await baton.started(
        baton.spawn_executor(BATON__EXECUTOR__DISPATCH_PIPELINE="1"),
        baton.spawn_worker("leaving", concurrency=1),
    )
    in_flight = await quorum_client.submit("tests.sleep_then_echo", {"seconds": 3, "message": "finished"}, watch=True)
    await _running_on(baton, in_flight.execution_id, "leaving")
    waiting = await quorum_client.submit("core.echo", {"message": "handed back"}, watch=True)
    assert (await baton.wait_status(waiting.execution_id, "scheduled"))["worker"] == "leaving"
    # Published (and confirmed), then gone from the ready messages: the worker holds it, unacked,
    # waiting for its one slot. That is what a drain hands back.
    await wait_until(
        lambda: _async([e for e in executor.events("execution_scheduled") if e["execution_id"] == str(waiting.execution_id)]),
        what="the second dispatch to be published",
    )
    await wait_until(
        lambda: _async_depth_is(baton, baton.names.worker_queue("leaving"), 0), what="the worker to receive it"
    )

    leaving.signal(signal.SIGTERM)
    # It arrives through the dead-letter exchange; it is put back in line by the handler, or (when
    # the sweeper saw the worker draining first and put it back itself) found already moved on.
    await wait_until(
        lambda: _async(_handled(executor, waiting.execution_id, "rejected", also_dropped=True)),
        what="the hand-back to be dead-lettered",
    )
    assert [e["count"] for e in leaving.events("dispatches_handed_back")] == [1]
    await baton.start_worker("staying")
    moved = await quorum_client.wait(waiting.execution_id, 20)
    assert moved["status"] == "completed" and moved["worker"] == "staying" and moved["attempt"] == 2
    done = await quorum_client.wait(in_flight.execution_id, 20)
    assert done["status"] == "completed" and done["worker"] == "leaving" and done["result"] == {"message": "finished"}
    assert leaving.wait(20) == 0


async def test_a_queue_of_the_other_type_is_declared_anew_when_empty(baton):
    """Switching `queue_type` either way takes effect on restart, for the executor's queues and a
    worker's; a worker queue that still holds dispatches is left alone, and the worker says why."""
    names = baton.names
    first = await baton.start_executor()
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    await baton.start_executor(**QUORUM)
    queues = await _queues(baton.prefix)
    for name in (names.requests_queue, names.dead_letters_queue, names.rejected_requests_queue):
        assert queues[name]["type"] == "quorum", name

    # A worker queue left classic by an earlier run, then back again.
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await amqp.declare_worker_queue(channel, names, "switch", queue_ttl_ms=300_000, queue_type="classic")
        for queue_type, env in (("quorum", QUORUM), ("classic", {"BATON__MESSAGE_QUEUE__QUEUE_TYPE": "classic"})):
            worker = await baton.start_worker("switch", **env)
            queue = (await _queues(baton.prefix))[names.worker_queue("switch")]
            assert queue["type"] == queue_type
            assert ("x-dead-letter-strategy" in queue["arguments"]) == (queue_type == "quorum")
            # Killed, so that its queue stays behind for the next start to find.
            worker.signal(signal.SIGKILL)
            worker.wait()

        # The classic queue now holds a dispatch: a quorum worker refuses to start rather than lose it.
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=names.worker_queue("switch"))
        refused = baton.spawn(
            "switch", "worker", "--name", "switch", **QUORUM,
            BATON__WORKER__ACTION_MODULES='["examples.actions", "tests.actions"]',
        )
        assert await asyncio.to_thread(refused.wait, 30) == 1
        assert "is not declared anew because it holds messages (1)" in refused.log_path.read_text()
        assert (await _queues(baton.prefix))[names.worker_queue("switch")]["type"] == "classic"
        assert await baton.queue_depth(names.worker_queue("switch")) == 1
    finally:
        await connection.close()


async def _async(value: Any) -> Any:
    return value


async def _async_depth_is(baton, queue: str, depth: int) -> bool:
    return await baton.queue_depth(queue) == depth
