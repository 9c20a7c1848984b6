"""Batch requests: one message holding many requests, each its own execution (DESIGN section 2)."""

from __future__ import annotations

import asyncio
import json

import pytest

from common.client import RequestRejected, Submission
from common.ids import MAX_BATCH_REQUESTS, batch_execution_id
from common.schemas import ANSWERS_HEADER
from tests.harness import wait_until

pytestmark = pytest.mark.integration


async def _statuses(baton, ids) -> dict[str, int]:
    rows = await (await baton.pool()).fetch(
        "SELECT status, count(*) AS n FROM executions WHERE id = ANY($1::uuid[]) GROUP BY status", list(ids)
    )
    return {r["status"]: r["n"] for r in rows}


async def test_submit_many_records_and_runs_each_request(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    ids = await client.submit_many("core.echo", [{"message": f"m{i}"} for i in range(1200)])
    # More than one batch's worth: two messages, ids in the order given.
    assert len(ids) == len(set(ids)) == 1200
    await wait_until(lambda: _all_done(baton, ids), timeout_s=60, what="every execution to complete")
    first, last = await baton.execution(ids[0]), await baton.execution(ids[-1])
    assert first["result"] == {"message": "m0"} and last["result"] == {"message": "m1199"}
    assert first["message_id"] != last["message_id"]
    assert await baton.queue_depth(baton.names.rejected_requests_queue) == 0


async def _all_done(baton, ids) -> bool:
    return await _statuses(baton, ids) == {"completed": len(ids)}


async def test_a_bad_request_in_a_batch_fails_alone_and_a_redelivered_batch_is_recorded_once(baton):
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    body = json.dumps([
        {"action_ref": "core.echo", "parameters": {"message": "fine"}},
        "not a request",
        {"action_ref": "nosuch.action"},
        {"action_ref": "core.echo", "parameters": {"message": 3}},
        {"action_ref": "core.echo", "parameters": {"message": "also fine"}, "colour": "blue"},
    ]).encode()
    await baton.publish_raw(body, message_id="batch-1")
    ids = [batch_execution_id("batch-1", i) for i in range(5)]
    rows = {}
    for i, execution_id in enumerate(ids):
        rows[i] = await baton.wait_status(execution_id, "completed", "failed")
    # The same batch again, as after a lost ack: once the first is recorded (two copies taken in
    # one intake batch are one request, recorded once, and not logged as a redelivery).
    await baton.publish_raw(body, message_id="batch-1")
    assert rows[0]["status"] == rows[4]["status"] == "completed"
    assert rows[4]["warnings"] == ["unknown field 'colour' ignored"]
    assert "request 1 of the batch is JSON str, not an object" in rows[1]["error"]["error"]
    assert "unknown action 'nosuch.action'" in rows[2]["error"]["error"]
    assert "invalid parameters for core.echo" in rows[3]["error"]["error"]
    # Counted once the repeat is known to be handled: each request was recorded once.
    await wait_until(lambda: _logged(executor, "execution_redelivered", 5), what="the repeat seen as such")
    pool = await baton.pool()
    assert await pool.fetchval("SELECT count(*) FROM executions") == 5
    assert await pool.fetchval("SELECT count(*) FROM execution_events WHERE seq = 1") == 5
    assert await baton.queue_depth(baton.names.rejected_requests_queue) == 0


async def _logged(service, event: str, n: int) -> bool:
    return len(service.events(event)) >= n


async def test_an_empty_or_too_large_batch_is_parked(baton):
    await baton.start_executor()
    await baton.publish_raw(b"[]", message_id="empty-1")
    await baton.publish_raw(json.dumps([{"action_ref": "core.noop"}] * (MAX_BATCH_REQUESTS + 1)).encode(),
                            message_id="huge-1")
    parked = await baton.take_parked(2)
    assert {m.message_id for m in parked} == {"empty-1", "huge-1"}
    assert all(f"from 1 to {MAX_BATCH_REQUESTS} are accepted" in m.headers["x-baton-reason"] for m in parked)
    assert await (await baton.pool()).fetchval("SELECT count(*) FROM executions") == 0


async def test_requests_submitted_together_are_posted_together_and_each_gets_its_own_answer(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    lone = await client.submit("core.echo", {"message": "alone"})
    # Submitted from tasks run together: posted as one batch message, answered by one reply.
    together = await asyncio.gather(
        *(client.submit("core.echo", {"message": f"m{i}"}) for i in range(20)),
        client.submit("nosuch.action"),
        client.submit("core.echo", {"message": "keyed"}, idempotency_key="k-1"),
        client.submit("core.echo", {"message": "keyed"}, idempotency_key="k-1"),
        client.submit("core.echo", {"message": "other"}, idempotency_key="k-1"),
        client.submit("core.echo", {"message": "watched"}, watch=True),
    )
    echoes, unknown, keyed, again, conflict, watched = together[:20], *together[20:]
    assert all(s.accepted for s in together)
    assert len({s.execution_id for s in [*echoes, unknown, keyed, conflict, watched]}) == 24
    assert unknown.status == "failed" and "unknown action 'nosuch.action'" in (unknown.error or "")
    # The same key and parameters in one batch: one execution, the second told it is a duplicate.
    assert again.execution_id == keyed.execution_id and again.duplicate and not keyed.duplicate
    assert conflict.status == "failed" and "is already used by execution" in (conflict.error or "")
    rows = [await baton.execution(s.execution_id) for s in [lone, *echoes, watched]]
    # A lone request is its own message (its id is the message's); the others shared one.
    assert rows[0]["message_id"] == str(lone.execution_id)
    assert len({r["message_id"] for r in rows[1:]}) == 1 and rows[1]["message_id"] != rows[0]["message_id"]
    done = await client.wait(watched.execution_id, timeout_s=30)
    assert done["status"] == "completed" and done["result"] == {"message": "watched"}
    await wait_until(lambda: _all_done(baton, [s.execution_id for s in echoes]), timeout_s=60, what="echoes")


async def test_requests_of_a_batch_refused_as_a_whole_are_posted_again_each_alone(baton):
    """An executor whose request limit is lower than the client's refuses the client's batch
    message as a whole (too large), which says nothing of its requests: each is posted again alone,
    under the execution id it was given, and answered for itself. (Every one of them was refused.)"""
    await baton.started(
        baton.spawn_executor(BATON__MESSAGE_QUEUE__MAX_REQUEST_BYTES="4096"), baton.spawn_worker("w1")
    )
    client = await baton.client()  # its limit: the default, 1 MiB
    text = "x" * 200
    together = await asyncio.gather(
        *(client.submit("core.echo", {"message": f"{i} {text}"}) for i in range(30)),
        client.submit("core.echo", {"message": "watched"}, watch=True),
        client.submit("core.echo", {"message": "y" * 5000}),
        return_exceptions=True,
    )
    *fitting, watched, too_large = together
    assert all(isinstance(s, Submission) and s.accepted and s.status in {"requested", "scheduled"} for s in [*fitting, watched])
    assert isinstance(too_large, RequestRejected) and "larger than the limit of 4096" in str(too_large)
    parked = await baton.take_parked(2)  # the batch, and the request too large even alone
    assert len(parked) == 2
    assert all("larger than the limit of 4096" in m.headers["x-baton-reason"] for m in parked)
    [batch] = [m for m in parked if m.body.startswith(b"[")]
    # Each under the id it was given in the batch, now its own message's id.
    assert [s.execution_id for s in [*fitting, watched]] == [batch_execution_id(batch.message_id, i) for i in range(31)]
    rows = [await baton.execution(s.execution_id) for s in [*fitting, watched]]
    assert all(r["message_id"] == str(r["id"]) for r in rows)
    done = await client.wait(watched.execution_id, timeout_s=30)
    assert done["status"] == "completed" and done["result"] == {"message": "watched"}
    await wait_until(lambda: _all_done(baton, [s.execution_id for s in fitting]), timeout_s=60, what="the echoes")


async def test_a_batch_that_asks_for_a_list_gets_one_reply_listing_an_answer_per_request(baton):
    await baton.start_executor()
    client = await baton.client()
    _, inbox = await client._amqp()
    replies = await inbox.channel.declare_queue(baton.names.reply_queue("raw"), exclusive=True)
    body = json.dumps([{"action_ref": "core.echo", "parameters": {"message": "a"}}, "not a request"]).encode()
    await baton.publish_raw(
        body, message_id="asks", reply_to=replies.name, correlation_id="c-1", headers={ANSWERS_HEADER: "list"}
    )
    message = await wait_until(lambda: replies.get(fail=False), what="the batch's reply")
    assert message.correlation_id == "c-1"
    first, second = json.loads(message.body)
    assert first["execution_id"] == str(batch_execution_id("asks", 0)) and first["status"] in ("requested", "scheduled")
    assert second["execution_id"] == str(batch_execution_id("asks", 1)) and second["status"] == "failed"
    assert "request 1 of the batch is JSON str" in second["error"]
    # Without the header, each request of a batch is answered on its own (as clients expect that
    # were written before the list).
    await baton.publish_raw(body, message_id="asks-2", reply_to=replies.name, correlation_id="c-2")
    answers = [await wait_until(lambda: replies.get(fail=False), what="a reply") for _ in range(2)]
    assert {json.loads(m.body)["execution_id"] for m in answers} == {
        str(batch_execution_id("asks-2", i)) for i in range(2)
    }
    assert {m.correlation_id for m in answers} == {"c-2"}
    assert not [m for m in answers if ANSWERS_HEADER in (m.headers or {})]
    # Refused whole (an empty batch): one answer, which the header says is the batch's.
    await baton.publish_raw(
        b"[]", message_id="empty", reply_to=replies.name, correlation_id="c-3", headers={ANSWERS_HEADER: "list"}
    )
    refused = await wait_until(lambda: replies.get(fail=False), what="the refusal")
    assert refused.correlation_id == "c-3" and refused.headers[ANSWERS_HEADER] == "list"
    assert "a batch holds 0 requests" in json.loads(refused.body)["error"]


async def test_a_new_client_used_by_many_tasks_at_once_opens_one_connection_of_each_kind(baton, monkeypatch):
    """Every task's first call found no connection yet, and each opened its own (one bench run left
    the broker out of file descriptors)."""
    from common import amqp, db
    from common.client import BatonClient

    await baton.start_executor()
    opened = {"amqp": 0, "db": 0}
    amqp_connect, db_connect = amqp.connect, db.connect

    async def counting_amqp(*args, **kwargs):
        opened["amqp"] += 1
        return await amqp_connect(*args, **kwargs)

    async def counting_db(*args, **kwargs):
        opened["db"] += 1
        return await db_connect(*args, **kwargs)

    monkeypatch.setattr(amqp, "connect", counting_amqp)
    monkeypatch.setattr(db, "connect", counting_db)
    async with BatonClient(baton.settings()) as client:
        submitted = await asyncio.gather(*(client.submit("core.echo", {"message": str(i)}) for i in range(10)))
        await asyncio.gather(*(client.get(s.execution_id) for s in submitted))
    assert all(s.accepted for s in submitted)
    assert opened == {"amqp": 1, "db": 1}


async def test_tasks_waiting_on_a_connect_that_fails_share_its_failure(baton, monkeypatch):
    """Each waiter once tried again after the one before it gave up: the tenth of ten calls made
    at once, to a broker that is down, failed after ten waits."""
    import aiormq

    from common import amqp
    from common.client import BatonClient
    from common.settings import Settings

    attempts = 0
    amqp_connect = amqp.connect

    async def counting(*args, **kwargs):
        nonlocal attempts
        attempts += 1
        return await amqp_connect(*args, **kwargs)

    monkeypatch.setattr(amqp, "connect", counting)
    settings = Settings(
        database={"url": baton.db_url},
        message_queue={"url": "amqp://guest:guest@127.0.0.1:1/", "prefix": baton.prefix, "startup_wait": 0.5},
    )
    async with BatonClient(settings) as client:
        outcomes = await asyncio.gather(*(client.submit("core.noop") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(o, aiormq.exceptions.AMQPConnectionError) for o in outcomes), outcomes
    assert attempts == 1


async def test_a_submit_cancelled_before_its_post_is_not_posted(baton):
    await baton.start_executor()
    client = await baton.client()
    await client.submit("core.noop")  # connected
    kept = asyncio.ensure_future(client.submit("core.echo", {"message": "kept"}))
    dropped = asyncio.ensure_future(client.submit("core.echo", {"message": "dropped"}))
    await asyncio.sleep(0)  # both are in the outbox; the post has not run yet
    dropped.cancel()
    submission = await kept
    assert submission.accepted
    row = await baton.execution(submission.execution_id)
    # Posted alone: its id is its message's, and no other request went with it.
    assert row["message_id"] == str(submission.execution_id)
    pool = await baton.pool()
    assert await pool.fetchval("SELECT count(*) FROM executions WHERE parameters->>'message' = 'dropped'") == 0
