"""The `baton` command line against real services."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid

import pytest

from common import db
from tests.harness import REPO, wait_until

pytestmark = pytest.mark.integration

MIGRATIONS = len(list((REPO / "common" / "migrations").glob("*.sql")))



async def test_submit_wait_exit_codes_and_reads(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("cli-w"))
    ok = await baton.cli("submit", "core.echo", "message=hello world", "--wait", "--json")
    assert ok.returncode == 0, ok.stderr
    done = json.loads(ok.stdout)
    assert done["status"] == "completed" and done["result"] == {"message": "hello world"}
    assert [e["type"] for e in done["events"]][-1] == "execution.completed"

    # key=value values are JSON unless the schema says string: seconds is a number, message stays text.
    typed = await baton.cli("submit", "core.sleep", "seconds=0.1", "--wait", "--json")
    assert typed.returncode == 0 and json.loads(typed.stdout)["parameters"] == {"seconds": 0.1}
    text = await baton.cli("submit", "core.echo", "message=123", "--wait", "--json")
    assert json.loads(text.stdout)["result"] == {"message": "123"}

    failed = await baton.cli("submit", "core.local", "--params-json", '{"cmd": "exit 4"}', "--wait", "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "failed"
    timed_out = await baton.cli("submit", "core.sleep", "seconds=5", "--timeout", "0.2", "--wait")
    assert timed_out.returncode == 1 and "timeout" in timed_out.stdout

    posted = await baton.cli("submit", "core.noop", "--idempotency-key", "k1", "--json")
    again = await baton.cli("submit", "core.noop", "--idempotency-key", "k1", "--json")
    assert json.loads(again.stdout)["id"] == json.loads(posted.stdout)["id"]
    assert json.loads(again.stdout)["duplicate"] is True

    unknown = await baton.cli("submit", "no.such", "--wait")
    assert unknown.returncode == 1 and "unknown action" in unknown.stdout

    listed = await baton.cli("executions", "list", "--json")
    rows = json.loads(listed.stdout)
    assert len(rows) == 7 and {r["action_ref"] for r in rows} >= {"core.echo", "core.local", "no.such"}
    only_failed = json.loads((await baton.cli("executions", "list", "--status", "failed", "--json")).stdout)
    assert {r["action_ref"] for r in only_failed} == {"core.local", "no.such"}
    by_action = json.loads((await baton.cli("executions", "list", "--action", "core.echo", "--json")).stdout)
    assert len(by_action) == 2
    bad_status = await baton.cli("executions", "list", "--status", "finished")
    assert bad_status.returncode == 2 and "finished" in bad_status.stderr

    shown = json.loads((await baton.cli("executions", "show", done["id"], "--json")).stdout)
    assert shown["id"] == done["id"] and len(shown["events"]) == 4
    human = await baton.cli("executions", "show", done["id"])
    assert "execution.completed" in human.stdout
    missing = await baton.cli("executions", "show", str(uuid.uuid4()))
    assert missing.returncode == 1

    pool = await baton.pool()
    beat_before = await pool.fetchval("SELECT last_heartbeat FROM workers WHERE name = 'cli-w'")
    workers = json.loads((await baton.cli("workers", "list", "--json")).stdout)
    now_after = await pool.fetchval("SELECT now()")
    assert [(w["name"], w["status"]) for w in workers] == [("cli-w", "active")]
    # The age is measured from the worker's last recorded heartbeat, in seconds, by the database's
    # clock: no more than from the heartbeat seen just before listing to the moment just after.
    assert 0 <= workers[0]["heartbeat_age_s"] <= (now_after - beat_before).total_seconds()
    assert workers[0]["in_flight"] == 0

    async def beat_again():
        return await pool.fetchval("SELECT last_heartbeat FROM workers WHERE name = 'cli-w'") > beat_before

    await wait_until(beat_again, what="the worker's next heartbeat")  # its heartbeat is live, not left over
    table = await baton.cli("workers", "list")
    assert "cli-w" in table.stdout and "active" in table.stdout


async def test_db_migrate_creates_and_migrates_a_new_database(baton):
    name = f"baton_t_{uuid.uuid4().hex[:10]}"
    url = baton.db_url.rsplit("/", 1)[0] + "/" + name
    try:
        first = await baton.cli("db", "migrate", BATON__DATABASE__URL=url)
        assert first.returncode == 0 and f"applied {MIGRATIONS} migration" in first.stdout
        second = await baton.cli("db", "migrate", BATON__DATABASE__URL=url)
        assert second.returncode == 0 and "applied 0 migration" in second.stdout
    finally:
        from tests.harness import drop_database

        await drop_database(name)



async def test_concurrent_migrations_apply_once(baton):
    name = f"baton_t_{uuid.uuid4().hex[:10]}"
    url = baton.db_url.rsplit("/", 1)[0] + "/" + name
    await db.ensure_database(url)
    try:
        conns = [await db.connect_one(url) for _ in range(4)]
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, MIGRATIONS]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == MIGRATIONS
        for c in conns:
            await c.close()
    finally:
        from tests.harness import drop_database

        await drop_database(name)


async def test_workflow_controls_and_timeline_from_the_command_line(baton):
    await baton.started(
        baton.spawn_executor(), baton.spawn_worker("cli-w", BATON__WORKER__MAX_INLINE_SLEEP="0.2")
    )
    path = baton.tmp / "side.txt"
    path.write_text("")
    posted = await baton.cli("submit", "tests.sleeper", f"path={path}", "seconds=60", "--json")
    execution_id = json.loads(posted.stdout)["id"]
    await baton.wait_status(execution_id, "sleeping")
    prefix = execution_id[:8]

    paused = await baton.cli("executions", "pause", prefix)
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
    resumed = await baton.cli("executions", "resume", prefix)
    assert resumed.returncode == 0 and "back in line" in resumed.stdout
    await baton.wait_status(execution_id, "sleeping")
    signalled = await baton.cli("executions", "signal", prefix, "approved", "--data", '{"ok": true}')
    assert signalled.returncode == 0 and "kept until the run waits for it" in signalled.stdout
    bad_data = await baton.cli("executions", "signal", prefix, "approved", "--data", "{oops")
    assert bad_data.returncode == 2 and "--data is not JSON" in bad_data.stderr
    cancelled = await baton.cli("executions", "cancel", prefix)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    twice = await baton.cli("executions", "cancel", prefix)
    assert twice.returncode == 2 and "it is cancelled" in twice.stderr and "Traceback" not in twice.stderr
    retried = await baton.cli("executions", "retry", prefix)
    assert retried.returncode == 0 and "retried from its checkpoint" in retried.stdout
    await baton.wait_status(execution_id, "sleeping")

    shown = await baton.cli("executions", "show", prefix)
    assert shown.returncode == 0
    for text in ("steps", "timeline", "mark", "sleep", "workflow.suspended", "execution.cancelled",
                 "execution.retried", "workflow.resumed"):
        assert text in shown.stdout, text
    unknown = await baton.cli("executions", "cancel", "zz")
    assert unknown.returncode == 2 and "not an execution id" in unknown.stderr
    await baton.cli("executions", "cancel", prefix)


async def test_delays_retries_and_schedules_from_the_command_line(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("cli-w"))
    delayed = await baton.cli("submit", "core.echo", "message=later", "--delay", "1s", "--wait", "--json")
    assert delayed.returncode == 0, delayed.stderr
    done = json.loads(delayed.stdout)
    assert "execution.due" in [e["type"] for e in done["events"]]
    both = await baton.cli("submit", "core.noop", "--delay", "1s", "--at", "2026-12-01T09:00Z")
    assert both.returncode == 2 and "not both" in both.stderr
    naive = await baton.cli("submit", "core.noop", "--at", "2026-12-01T09:00")
    assert naive.returncode == 2 and "time zone" in naive.stderr
    no_retry = await baton.cli("submit", "tests.flaky", f"path={baton.tmp / 'f'}", "failures=5",
                            "--max-retries", "0", "--wait", "--json")
    assert no_retry.returncode == 1 and json.loads(no_retry.stdout)["status"] == "failed"

    added = await baton.cli("schedules", "add", "tick", "core.echo", "message=tick", "--cron", "* * * * * *")
    assert added.returncode == 0 and "schedule tick" in added.stdout, added.stderr
    pool = await baton.pool()
    await wait_until(lambda: pool.fetchval("SELECT count(*) FROM executions WHERE schedule_name = 'tick'"),
                     what="the schedule to fire")
    listed = await baton.cli("schedules", "list", "--json")
    assert [s["name"] for s in json.loads(listed.stdout)] == ["tick"]
    bad = await baton.cli("schedules", "add", "bad", "core.noop", "--cron", "not cron")
    assert bad.returncode == 2 and "not a cron expression" in bad.stderr
    removed = await baton.cli("schedules", "remove", "tick")
    assert removed.returncode == 0
    gone = await baton.cli("schedules", "remove", "tick")
    assert gone.returncode == 2 and "no schedule 'tick'" in gone.stderr



def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


async def test_unreachable_or_refused_services_and_bad_config_get_one_line(baton, tmp_path):
    down = {"BATON__DATABASE__URL": "postgresql://postgres@127.0.0.1:1/baton", "BATON__DATABASE__STARTUP_WAIT": "1"}
    for args in (["executor"], ["executions", "list"]):
        done = await baton.cli(*args, **down)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        line = _last_line(done.stderr)
        assert "cannot reach PostgreSQL at 127.0.0.1:1" in line and "database.startup_wait (1 s)" in line
        assert "waiting_for_service" in done.stderr  # it said so while it waited

    refused = await baton.cli("executions", "list", BATON__DATABASE__URL="postgresql://nobody:secretpw@127.0.0.1:5432/x")
    assert refused.returncode == 1 and "refused the login" in _last_line(refused.stderr)
    assert "secretpw" not in refused.stderr
    mq = await baton.cli("submit", "core.noop", BATON__MESSAGE_QUEUE__URL="amqp://guest:wrongpw@127.0.0.1:5672/")
    assert mq.returncode == 1 and "RabbitMQ at 127.0.0.1:5672 refused the login" in _last_line(mq.stderr)
    assert "wrongpw" not in mq.stderr
    missing = await baton.cli("executions", "list", BATON__DATABASE__URL="postgresql://postgres@127.0.0.1:5432/no_such_db_here")
    assert "database 'no_such_db_here' does not exist" in _last_line(missing.stderr)

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("executor:\n  sweep_interval: [\n")
    done = await baton.cli("executions", "list", "--config", str(bad_yaml))
    assert done.returncode == 2 and "is not valid YAML at line 3" in done.stderr and "Traceback" not in done.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("executor:\n  sweep_intervl: 3\n")
    done = await baton.cli("--config", str(unknown), "workers", "list")
    assert done.returncode == 2 and "executor.sweep_intervl: Extra inputs are not permitted" in done.stderr
    debug = await baton.cli("workers", "list", "--config", str(unknown), "--debug")
    assert "Traceback" in debug.stderr
    nowhere = await baton.cli("workers", "list", "--config", str(tmp_path / "nope.yaml"))
    assert nowhere.returncode == 2 and "no such file" in nowhere.stderr


async def test_inspection_commands_and_what_submit_wait_says(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("cli-w"))
    listed = await baton.cli("actions", "list", "--json")
    refs = {a["ref"]: a for a in json.loads(listed.stdout)}
    assert {"core.echo", "examples.order", "tests.flaky"} <= set(refs)
    assert refs["examples.order"]["durable"] is True and refs["tests.flaky"]["retries"] == 3
    shown = await baton.cli("actions", "show", "tests.limited_sleep", "--json")
    details = json.loads(shown.stdout)
    assert details["max_concurrency_in_force"] == 2 and details["recovery"]["recover_on_worker_loss"] is False
    assert "seconds" in details["parameters_schema"]["properties"]
    missing = await baton.cli("actions", "show", "no.such")
    assert missing.returncode == 1 and "no action 'no.such'" in missing.stderr

    # Progress while waiting, and the traceback printed once, as lines.
    slow = await baton.cli("submit", "tests.sleep_then_echo", "seconds=1", "message=x", "--wait", "--progress")
    assert slow.returncode == 0
    assert "running on cli-w" in slow.stderr and slow.stderr.strip().endswith("completed")
    failed = await baton.cli("submit", "tests.fail", "message=kaput", "--wait")
    assert failed.returncode == 1
    assert failed.stdout.count("Traceback (most recent call last)") == 1 and "\\n" not in failed.stdout
    dup1 = await baton.cli("submit", "core.echo", "message=one", "--idempotency-key", "same", "--wait")
    dup2 = await baton.cli("submit", "core.echo", "message=one", "--idempotency-key", "same", "--wait")
    assert dup1.returncode == dup2.returncode == 0
    assert "exists already" in dup2.stderr and "exists already" not in dup1.stderr
    posted = await baton.cli("submit", "core.noop", "--json")
    execution_id = json.loads(posted.stdout)["id"]
    tail = await baton.cli("executions", "tail", execution_id[:8])
    assert tail.returncode == 0 and "execution.completed" in tail.stdout

    listed = await baton.cli("executions", "list", "--worker", "cli-w", "--since", "1h", "--limit", "2", "--json")
    rows = json.loads(listed.stdout)
    assert len(rows) == 2 and all(r["worker"] == "cli-w" for r in rows)
    page = await baton.cli("executions", "list", "--limit", "2")
    after = page.stdout.strip().splitlines()[-1].split("--after ")[1]
    older = await baton.cli("executions", "list", "--after", after, "--json")
    assert after not in [r["id"] for r in json.loads(older.stdout)]
    bad = await baton.cli("executions", "list", "--status", "bogus")
    assert bad.returncode == 2 and "one of requested, scheduled, running" in bad.stderr

    stopped = await baton.start_worker("cli-gone")
    stopped.signal(15)
    assert stopped.wait(20) == 0
    workers = {w["name"]: w for w in json.loads((await baton.cli("workers", "list", "--json")).stdout)}
    assert workers["cli-gone"]["status"] == "inactive" and workers["cli-gone"]["in_flight"] == 0
    await (await baton.pool()).execute("UPDATE workers SET updated_at = now() - interval '2 days' WHERE name = 'cli-gone'")
    pruned = await baton.cli("workers", "prune", "--older-than", "1d")
    assert pruned.returncode == 0 and "removed 1 worker(s)" in pruned.stdout and "cli-gone" in pruned.stdout


async def test_parked_requests_and_the_live_table_from_the_command_line(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("cli-w"))
    await baton.publish_raw(b"{not json", message_id="cli-parked-1")

    async def parked() -> bool:
        return await baton.queue_depth(baton.names.rejected_requests_queue) >= 1

    await wait_until(parked, what="the bad request to be parked")
    listed = await baton.cli("rejected", "list", "--json")
    [entry] = json.loads(listed.stdout)
    assert "not JSON" in entry["reason"] and entry["message_id"] == "cli-parked-1"
    replayed = await baton.cli("rejected", "replay", entry["key"])
    assert replayed.returncode == 0 and "posted again" in replayed.stdout
    await wait_until(parked, what="the replayed request to be parked again (it is still not JSON)")
    unknown = await baton.cli("rejected", "replay", "nosuchkey")
    assert unknown.returncode == 2 and "no parked request 'nosuchkey'" in unknown.stderr

    watching = baton.start_cli("executions", "watch", "--interval", "0.2")
    pool = await baton.pool()

    async def table_read() -> bool:
        # Its first read of the table is made once Ctrl-C is the table's to handle (a terminal
        # would show the table by then; a file gets it when the command ends).
        return bool(await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND query LIKE '%ORDER BY created_at DESC, id DESC%'"
        ))

    await wait_until(table_read, what="the live table's first read")
    watching.process.send_signal(signal.SIGINT)  # Ctrl-C
    watched = await watching.finished(20)
    assert watched.returncode == 0 and "newest executions" in watched.stdout
