"""DESIGN section 8: a bad request gets a clear error, loses nothing, and never stops a service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import pytest

from common.client import RequestRejected
from tests.harness import REPO, wait_until

pytestmark = pytest.mark.integration


async def _still_works(baton) -> None:
    done = await (await baton.client()).run("core.echo", {"message": "still here"}, wait_timeout_s=20)
    assert done["status"] == "completed"


async def _depth_at_least(baton, queue: str, count: int) -> bool:
    return await baton.queue_depth(queue) >= count


async def test_not_json_and_oversized_are_parked_with_their_reason(baton):
    executor, _ = await baton.started(
        baton.spawn_executor(BATON__MESSAGE_QUEUE__MAX_REQUEST_BYTES="2048"), baton.spawn_worker("w1")
    )
    await baton.publish_raw(b"this is { not json", message_id="garbage-1")
    await baton.publish_raw(b'"a string"', message_id="array-1")
    big = json.dumps({"action_ref": "core.echo", "parameters": {"message": "x" * 5000}}).encode()
    await baton.publish_raw(big, message_id="big-1")
    parked = {m.message_id: m for m in await baton.take_parked(3)}
    assert set(parked) == {"garbage-1", "array-1", "big-1"}
    assert "not JSON" in parked["garbage-1"].headers["x-baton-reason"]
    assert parked["garbage-1"].body == b"this is { not json"  # kept as it came, for an operator
    assert "not an object or an array of them" in parked["array-1"].headers["x-baton-reason"]
    assert "larger than the limit of 2048" in parked["big-1"].headers["x-baton-reason"]
    assert await (await baton.pool()).fetchval("SELECT count(*) FROM executions") == 0
    assert len(executor.events("request_rejected")) == 3
    await _still_works(baton)


async def test_a_client_gets_the_rejection_as_an_error(baton):
    await baton.start_executor(BATON__MESSAGE_QUEUE__MAX_REQUEST_BYTES="2048")
    client = await baton.client()
    with pytest.raises(RequestRejected, match="larger than the limit"):
        await client.submit("core.echo", {"message": "x" * 5000})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"parameters": {"message": "no ref"}}, "action_ref: Field required"),
        ({"action_ref": "nosuch.action"}, "unknown action 'nosuch.action'"),
        ({"action_ref": "core.sleep", "parameters": {"seconds": "soon"}}, "invalid parameters for core.sleep"),
        ({"action_ref": "core.echo", "parameters": {}}, "'message' is a required property"),
        ({"action_ref": "core.echo", "parameters": {"message": "hi", "extra": 1}}, "Additional properties"),
        ({"action_ref": "core.echo", "parameters": "not-a-dict"}, "parameters: Input should be a valid dictionary"),
        ({"action_ref": "core.echo", "parameters": {"message": "hi"}, "timeout_seconds": -1}, "timeout_seconds"),
    ],
)
async def test_requests_tied_to_an_execution_are_recorded_failed(baton, body, expected):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    execution_id = str(uuid.uuid4())
    notified = await client._watch(uuid.UUID(execution_id))
    await baton.publish_raw(json.dumps(body).encode(), message_id=execution_id)
    await asyncio.wait_for(notified.wait(), 20)  # its one notification wakes the waiter ...
    row = await baton.execution(execution_id)  # ... which reads the row
    assert row["status"] == "failed" and row["attempt"] == 0 and row["worker"] is None
    assert expected in row["error"]["error"], row["error"]
    assert row["error"]["failed_by"] == "executor_intake"
    await _still_works(baton)


async def test_user_action_parameters_are_validated_from_its_signature(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    bad = await client.submit("tests.typed", {"count": "many"})
    assert bad.status == "failed" and "count" in bad.error
    good = await client.run("tests.typed", {"count": 2, "tags": ["a"]}, wait_timeout_s=20)
    assert good["result"] == {"count": 2, "ratio": 0.5, "tags": ["a"]}


async def test_a_string_postgres_cannot_store_is_rejected_alone(baton):
    """A NUL character passes JSON parsing but not PostgreSQL's jsonb: only that request is lost
    to the parking queue, the rest of its batch is recorded."""
    await baton.start_worker("w1")
    await baton.publish_raw(b'{"action_ref": "core.echo", "parameters": {"message": "nul\\u0000here"}}', message_id="nul-1")
    await baton.publish_raw(b'{"action_ref": "core.echo", "parameters": {"message": "fine"}}', message_id="fine-1")
    # Both wait in the queue before an executor starts, so that intake takes them in one batch
    # (posted to a running executor, each would likely be a batch of its own).
    await wait_until(
        lambda: _depth_at_least(baton, baton.names.requests_queue, 2), what="both requests to be queued"
    )
    await baton.start_executor()
    pool = await baton.pool()

    async def fine_one_ran():
        return await pool.fetchrow(
            "SELECT status, result FROM executions WHERE message_id = 'fine-1' AND status = 'completed'"
        )

    # The other request is recorded (and runs): only its neighbour is lost to the parking queue.
    fine = await wait_until(fine_one_ran, what="the storable request to be recorded and run")
    assert fine["result"] == {"message": "fine"}
    parked = await baton.take_parked(1)
    assert [m.message_id for m in parked] == ["nul-1"]
    reason = parked[0].headers["x-baton-reason"]
    assert "cannot be stored" in reason and "\n" not in reason  # PostgreSQL's DETAIL joined into one line
    assert await pool.fetchval("SELECT count(*) FROM executions WHERE message_id = 'nul-1'") == 0
    await _still_works(baton)


def test_an_unknown_config_key_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("executor:\n  scheduled_timeout: 10\n  sheduled_timeout: 20\n")
    for args in (["executor"], ["worker", "--name", "w"], ["db", "migrate"]):
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=REPO,
            env={"BATON_CONFIG": str(config), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result
        assert "executor.sheduled_timeout" in result.stderr and "Extra inputs are not permitted" in result.stderr


def test_an_unknown_environment_override_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cli", "executor"],
        cwd=REPO,
        env={"BATON__WORKER__HEARTBEAT_INTERVAL_S": "3", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "worker.heartbeat_interval_s" in result.stderr


async def test_outputs_postgres_cannot_store_never_stop_a_worker(baton):
    _, worker = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    binary = await client.run("core.local", {"cmd": ["printf", "a\\000b"]}, wait_timeout_s=20)
    assert binary["status"] == "completed" and binary["result"]["stdout"] == "a\ufffdb"
    nan = await client.run("tests.nan", wait_timeout_s=20)
    assert nan["status"] == "failed" and "not JSON-serialisable" in nan["error"]["error"]
    nul = await client.run("tests.nul_text", wait_timeout_s=20)
    assert nul["status"] == "failed" and "the outcome cannot be stored" in nul["error"]["error"]
    assert "\n" not in nul["error"]["error"]
    assert worker.process.poll() is None
    await _still_works(baton)


async def test_deeply_nested_json_is_parked(baton):
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    await baton.publish_raw(b"[" * 100_000 + b"]" * 100_000, message_id="deep-1")
    parked = await baton.take_parked(1)
    assert [m.message_id for m in parked] == ["deep-1"]
    assert "cannot be parsed" in parked[0].headers["x-baton-reason"]
    assert executor.process.poll() is None
    await _still_works(baton)


async def test_unknown_request_fields_are_ignored_and_the_warning_recorded(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w1"))
    client = await baton.client()
    execution_id = str(uuid.uuid4())
    body = {"action_ref": "core.echo", "parameters": {"message": "hi"}, "surprise": True, "timeout_seconds": "30s"}
    await baton.publish_raw(json.dumps(body).encode(), message_id=execution_id)
    done = await client.wait(execution_id, 20)
    assert done["status"] == "completed" and done["timeout_s"] == 30
    assert done["warnings"] == ["unknown field 'surprise' ignored"]
    assert done["events"][0]["data"]["warnings"] == ["unknown field 'surprise' ignored"]
