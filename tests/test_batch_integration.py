"""Batch requests: one message holding many requests, each its own execution (DESIGN section 2)."""

from __future__ import annotations

import json

import pytest

from common.ids import MAX_BATCH_REQUESTS, batch_execution_id
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
