"""Trust boundaries, each attack reproduced against the real services and shown to fail: what a
shell command can see, what a forged message can make a client or a worker believe."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import pytest

from common import amqp
from tests.harness import AMQP_URL, REPO, wait_until

pytestmark = pytest.mark.integration


async def test_a_command_sees_a_minimal_environment_not_the_workers(baton):
    await baton.start_executor()
    await baton.start_worker("shell", BATON__WORKER__SHELL_ENV_PASSTHROUGH='["EXTRA_ALLOWED"]', EXTRA_ALLOWED="yes",
                             EXTRA_PRIVATE="no")
    done = await (await baton.client()).run("core.local", {"cmd": ["env"], "env": {"MINE": "1"}}, wait_timeout_s=20)
    assert done["status"] == "completed"
    seen = dict(line.split("=", 1) for line in done["result"]["stdout"].splitlines() if "=" in line)
    assert "BATON__DATABASE__URL" not in seen and baton.db_url not in done["result"]["stdout"]
    assert not [k for k in seen if k.startswith("BATON__")]
    assert "EXTRA_PRIVATE" not in seen
    assert seen["EXTRA_ALLOWED"] == "yes" and seen["MINE"] == "1" and seen["BATON_EXECUTION_ID"] == done["id"]
    assert "PATH" in seen


@pytest.mark.parametrize("name", ["BASH_ENV", "ENV", "BASH_FUNC_ls%%", "LD_PRELOAD", "SHELLOPTS", "PS4", "BATON_ATTEMPT"])
async def test_dangerous_environment_names_are_refused(baton, tmp_path, name):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("shell"))
    marker = tmp_path / "ran"
    done = await (await baton.client()).run(
        "core.local", {"cmd": ["true"], "env": {name: f"$(touch {marker})"}}, wait_timeout_s=20
    )
    assert done["status"] == "failed" and done["error"]["failed_by"] == "executor_intake"
    assert "env" in done["error"]["error"] and done["worker"] is None
    assert not marker.exists()


async def test_secret_references_are_resolved_on_the_worker_and_never_stored(baton, tmp_path):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "db-token").write_text("s3cret-from-file\n")
    await baton.start_executor()
    await baton.start_worker(
        "shell", BATON__WORKER__SECRETS_DIR=str(secrets_dir), BATON_SECRET_API_KEY="s3cret-from-env"
    )
    client = await baton.client()
    done = await client.run(
        "core.local",
        {"cmd": 'echo "$A $B"', "env": {"A": {"secret": "db-token"}, "B": {"secret": "api-key"}}},
        wait_timeout_s=20,
    )
    assert done["status"] == "completed"
    assert done["result"]["stdout"] == "*** ***\n"
    pool = await baton.pool()
    stored = await pool.fetchval("SELECT row_to_json(e)::text FROM executions e WHERE id = $1", uuid.UUID(done["id"]))
    events = await pool.fetchval(
        "SELECT string_agg(data::text, ' ') FROM execution_events WHERE execution_id = $1", uuid.UUID(done["id"])
    )
    for text in (stored, events):
        assert "s3cret" not in text
    missing = await client.run("core.local", {"cmd": ["true"], "env": {"X": {"secret": "nope"}}}, wait_timeout_s=20)
    assert missing["status"] == "failed"
    assert "secret 'nope' is not available on this worker" in missing["error"]["error"]


async def test_a_forged_notification_wakes_but_does_not_fool_the_waiter(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    client = await baton.client()
    submission = await client.submit("tests.sleep_then_echo", {"seconds": 1, "message": "real"}, watch=True)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(baton.names.notifications_exchange)
        forged = {"id": str(submission.execution_id), "status": "completed", "result": {"message": "forged"}}
        await exchange.publish(
            aio_pika.Message(json.dumps(forged).encode()),
            routing_key=amqp.Names.notification_key(submission.execution_id, "completed"),
        )
        done = await client.wait(submission.execution_id, 20)
    finally:
        await connection.close()
    assert done["status"] == "completed" and done["result"] == {"message": "real"}


async def test_submit_wait_prints_the_recorded_failure_despite_a_forged_success(baton):
    """A rogue consumer on the requests answers every request with a forged `completed`."""
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    spy = await channel.declare_queue(exclusive=True)
    await spy.bind(baton.names.executions_exchange, amqp.REQUESTED_KEY)
    notifications = await channel.get_exchange(baton.names.notifications_exchange)

    async def forge(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        forged = {"id": message.message_id, "status": "completed", "result": "forged"}
        for _ in range(20):  # keep forging while the client waits
            await notifications.publish(
                aio_pika.Message(json.dumps(forged).encode()), routing_key=f"execution.{message.message_id}.completed"
            )
            await asyncio.sleep(0.1)

    await spy.consume(forge)
    try:
        result = await baton.cli("submit", "tests.fail", "message=really", "--wait", "--json")
    finally:
        await connection.close()
    assert result.returncode == 1, result.stderr
    shown = json.loads(result.stdout)
    assert shown["status"] == "failed" and shown["result"] is None


async def test_a_worker_runs_what_was_recorded_not_what_the_dispatch_says(baton, tmp_path):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("victim", concurrency=1))
    pool = await baton.pool()
    execution_id = uuid.uuid4()
    # A real execution, recorded as `scheduled` on the worker at attempt 1 ...
    await pool.execute(
        "INSERT INTO executions (id, action_ref, parameters, status, attempt, worker, scheduled_at, last_event_seq)"
        " VALUES ($1, 'core.echo', $2, 'scheduled', 1, 'victim', now(), 0)",
        execution_id, {"message": "recorded"},
    )
    # ... and a dispatch for it that someone on the broker rewrote to run a command.
    marker = tmp_path / "pwned"
    forged = {"execution_id": str(execution_id), "attempt": 1, "action_ref": "core.local",
              "parameters": {"cmd": ["touch", str(marker)]}}
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(baton.names.dispatch_exchange)
        await exchange.publish(aio_pika.Message(json.dumps({"dispatches": [forged]}).encode()),
                               routing_key=amqp.Names.worker_routing_key("victim"))
    finally:
        await connection.close()
    row = await baton.wait_status(execution_id, "completed", "failed")
    assert row["status"] == "completed" and row["result"] == {"message": "recorded"}
    assert not marker.exists()


async def test_what_a_command_leaves_running_is_killed_when_it_ends(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("shell"))
    marker = f"{uuid.uuid4().int % 10**6}.25"
    done = await (await baton.client()).run(
        "core.local", {"cmd": f"sleep 3{marker} & echo started"}, wait_timeout_s=20
    )
    assert done["status"] == "completed" and done["result"]["stdout"] == "started\n"

    async def gone() -> bool:
        found = await asyncio.to_thread(subprocess.run, ["pgrep", "-f", f"sleep 3{marker}"], capture_output=True)
        return found.returncode == 1

    await wait_until(gone, what="the background process to be killed")


# -- the catalogue ---------------------------------------------------------------------------


async def test_core_actions_cannot_be_overridden_by_the_catalogue(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    pool = await baton.pool()
    assert await pool.fetchval("SELECT count(*) FROM actions WHERE ref LIKE 'core.%'") == 0
    # A row written behind Baton's back (a rogue worker with database access) changes nothing.
    await pool.execute(
        "INSERT INTO actions (ref, runtime, parameters_schema) VALUES ('core.echo', 'shell', '{}'::jsonb)"
    )
    client = await baton.client()
    done = await client.run("core.echo", {"message": "hi"}, wait_timeout_s=20)
    assert done["status"] == "completed" and done["result"] == {"message": "hi"}
    bad = await client.run("core.echo", {"message": "hi", "cmd": "id"}, wait_timeout_s=20)
    assert bad["status"] == "failed" and "cmd" in bad["error"]["error"]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("UPDATE actions SET version = 2 WHERE ref = 'tests.typed'",
         "tests.typed: this worker has version 1, the catalogue has version 2"),
        ("UPDATE actions SET parameters_schema = '{\"type\": \"object\"}' WHERE ref = 'tests.typed'",
         "tests.typed: version 1 is already registered with another parameter schema"),
        ("UPDATE actions SET runtime = 'shell' WHERE ref = 'tests.typed'",
         "tests.typed: version 1 is already registered with another runtime"),
    ],
)
async def test_a_conflicting_registration_is_refused(baton, tamper, expected):
    _, first = await baton.started(baton.spawn_executor(), baton.spawn_worker("first"))
    pool = await baton.pool()
    await pool.execute(tamper)
    before = await pool.fetchrow("SELECT * FROM actions WHERE ref = 'tests.typed'")
    second = baton.spawn("second", "worker", "--name", "second", "--runtimes", "python",
                         BATON__WORKER__ACTION_MODULES='["examples.actions", "tests.actions"]')
    assert second.wait(30) == 1
    last = second.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith("worker second: cannot register its actions: " + expected), last
    assert dict(await pool.fetchrow("SELECT * FROM actions WHERE ref = 'tests.typed'")) == dict(before)
    assert first.process.poll() is None


# -- what people read ------------------------------------------------------------------------


async def test_markup_in_stored_values_is_printed_as_text(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    done = await (await baton.client()).run("tests.fail", {"message": "[/oops] [bold]x"}, wait_timeout_s=20)
    assert done["status"] == "failed"
    for args in (["executions", "list"], ["executions", "show", done["id"]]):
        result = await baton.cli(*args, COLUMNS="250")
        assert result.returncode == 0, result.stderr
        assert "[/oops] [bold]x" in result.stdout


def test_credentials_are_masked():
    from common.values import masked_url

    assert masked_url("postgresql://baton:hunter2@db:5432/baton") == "postgresql://baton:***@db:5432/baton"
    assert masked_url("amqp://guest:guest@mq:5672/") == "amqp://guest:***@mq:5672/"
    assert masked_url("postgresql://postgres@127.0.0.1/baton") == "postgresql://postgres@127.0.0.1/baton"


# -- roles -----------------------------------------------------------------------------------


async def _drop_roles(baton, service_role: str, operator_role: str) -> None:
    """What the roles were granted and own, in the test's database and server-wide, then the
    roles. The operator's grants go first: the service role's default privileges name it."""
    import asyncpg

    for database in (baton.db_name, "postgres"):
        admin = await asyncpg.connect(f"{baton.pg_url}/{database}")
        try:
            await admin.execute(f'DROP OWNED BY "{operator_role}"')
            await admin.execute(f'REASSIGN OWNED BY "{service_role}" TO CURRENT_USER')
            await admin.execute(f'DROP OWNED BY "{service_role}"')
            if database == "postgres":
                await admin.execute(f'DROP ROLE "{service_role}", "{operator_role}"')
        finally:
            await admin.close()


def _create_roles(which: str, **env: str) -> None:
    import os

    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "create-roles.sh"), which], env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr


async def test_a_submitter_can_post_and_hear_back_but_cannot_touch_a_workers_queue(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    password = uuid.uuid4().hex
    # Users of this test's own, named after its prefix, on the shared broker; removed afterwards.
    service_user, submitter_user = f"{baton.prefix}-baton", f"{baton.prefix}-submitter"
    _create_roles("rabbitmq", BATON_PREFIX=baton.prefix, BATON_MQ_PASSWORD=uuid.uuid4().hex,
                  BATON_SUBMITTER_PASSWORD=password, BATON_MQ_USER=service_user, BATON_SUBMITTER_USER=submitter_user)
    try:
        from common.client import BatonClient

        broker = urlsplit(baton.amqp_url)
        url = f"amqp://{submitter_user}:{password}@{broker.hostname}:{broker.port or 5672}{broker.path or '/'}"
        settings = baton.settings().model_copy(
            update={"message_queue": baton.settings().message_queue.model_copy(update={"url": url})}
        )
        async with BatonClient(settings) as submitter:
            submission = await submitter.submit("core.echo", {"message": "allowed"})
            # Recorded; placed at once too if the worker's registration has been seen.
            assert submission.accepted and submission.status in ("requested", "scheduled")
        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                raise AssertionError("a submitter consumed a worker's dispatch")

            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                queue = await channel.get_queue(baton.names.worker_queue("w"))
                await queue.consume(take)
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await channel.queue_delete(baton.names.requests_queue)
        finally:
            await connection.close()
        done = await (await baton.client()).wait(submission.execution_id, 20)
        assert done["status"] == "completed"
    finally:
        for user in (service_user, submitter_user):
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60)


async def test_the_operator_role_reads_but_cannot_write(baton):
    import asyncpg

    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    done = await (await baton.client()).run("core.noop", {}, wait_timeout_s=20)
    password = uuid.uuid4().hex
    # Roles of this test's own, named after its prefix, on the shared server; dropped afterwards.
    service_role, operator_role = f"{baton.prefix}_baton", f"{baton.prefix}_operator"
    server = urlsplit(baton.pg_url)
    _create_roles("postgres", BATON_DB=baton.db_name, BATON_DB_PASSWORD=uuid.uuid4().hex,
                  BATON_OPERATOR_PASSWORD=password, BATON_DB_USER=service_role, BATON_OPERATOR_USER=operator_role,
                  PSQL=f"psql -h {server.hostname} -p {server.port or 5432} -U {server.username or 'postgres'}")
    try:
        conn = await asyncpg.connect(
            f"postgresql://{operator_role}:{password}@{server.hostname}:{server.port or 5432}/{baton.db_name}"
        )
        try:
            assert await conn.fetchval("SELECT status FROM executions WHERE id = $1", uuid.UUID(done["id"])) == "completed"
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute("UPDATE executions SET status = 'failed'")
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute("COPY executions TO PROGRAM 'true'")
        finally:
            await conn.close()
    finally:
        await _drop_roles(baton, service_role, operator_role)


async def test_validation_errors_never_echo_parameter_values(baton):
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    client = await baton.client()
    secret = "hunter2-" + uuid.uuid4().hex
    cases = [
        ("tests.typed", {"count": secret}),
        ("tests.typed", {"count": 1, "tags": [secret, 3]}),
        ("core.local", {"cmd": ["true"], "env": {"A": 1, "B": secret, "C": [secret]}}),
        ("core.sleep", {"seconds": -1, "note": secret}),
    ]
    for action_ref, parameters in cases:
        done = await client.run(action_ref, parameters, wait_timeout_s=20)
        assert done["status"] == "failed" and done["error"]["failed_by"] == "executor_intake"
        assert secret not in json.dumps(done["error"]), done["error"]
    assert secret not in executor.log_path.read_text()


def test_the_workers_validation_errors_never_echo_values():
    import tests.actions  # noqa: F401 - registers tests.typed
    from common.schemas import Assignment
    from worker.registry import registered
    from worker.runner import execute

    secret = "hunter2-" + uuid.uuid4().hex
    outcome = asyncio.run(execute(
        registered()["tests.typed"],
        Assignment(execution_id=uuid.uuid4(), attempt=1, action_ref="tests.typed", parameters={"count": secret}),
        default_timeout_s=5, max_output_bytes=1000,
    ))
    assert outcome.status == "failed" and "count" in outcome.error["error"]
    assert secret not in json.dumps(outcome.error)


async def test_a_registered_schema_cannot_stall_the_executor(baton):
    """A remote `$ref` to a listener that never answers, and a backtracking pattern: each request
    is decided at once, and the executor keeps taking others."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    pool = await baton.pool()
    schemas = {
        "evil.remote_ref": {"type": "object", "properties": {"x": {"$ref": f"http://127.0.0.1:{port}/s.json"}}},
        "evil.file_ref": {"type": "object", "properties": {"x": {"$ref": "file:///etc/passwd"}}},
        "evil.backtracking": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}}},
    }
    for ref, schema in schemas.items():
        await pool.execute("INSERT INTO actions (ref, runtime, parameters_schema) VALUES ($1, 'python', $2)", ref, schema)
    client = await baton.client()
    try:
        for ref in ("evil.remote_ref", "evil.file_ref"):
            done = await client.run(ref, {"x": 1}, wait_timeout_s=20)
            assert done["status"] == "failed"
            assert "parameters cannot be checked against the action's schema" in done["error"]["error"]
            assert "Unresolvable" in done["error"]["error"]
        done = await client.run("evil.backtracking", {"x": "a" * 50 + "b"}, wait_timeout_s=20)
        assert done["status"] == "failed" and 'x: fails pattern "^(a+)+$"' in done["error"]["error"]
        assert (await client.run("core.echo", {"message": "still here"}, wait_timeout_s=20))["status"] == "completed"
        # A schedule of such an action: each firing is recorded failed, and the executor goes on
        # firing (the check once escaped the schedules loop, and every executor that took the due
        # schedule stopped).
        await client.add_schedule("evil-every-second", "* * * * * *", "evil.file_ref", {"x": 1}, catch_up="none")

        async def fired_twice() -> list:
            rows = await pool.fetch("SELECT status, error FROM executions WHERE schedule_name = 'evil-every-second'")
            return rows if len(rows) >= 2 else []

        for row in await wait_until(fired_twice, what="two firings of the schedule"):
            assert row["status"] == "failed"
            assert "parameters cannot be checked against the action's schema" in row["error"]["error"]
        await client.remove_schedule("evil-every-second")
        assert (await client.run("core.echo", {"message": "still here"}, wait_timeout_s=20))["status"] == "completed"
    finally:
        silent.close()


# -- idempotency keys ------------------------------------------------------------------------


async def test_idempotency_keys_are_scoped_by_action_and_cannot_be_squatted(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w", runtimes="python,shell"))
    client = await baton.client()
    squatter = await client.submit("core.local", {"cmd": ["echo", "squatted"]}, idempotency_key="nightly-1")
    await client.wait(squatter.execution_id, 20)
    # Another action, the same key: its own execution, not the squatter's output.
    mine = await client.submit("core.echo", {"message": "mine"}, idempotency_key="nightly-1")
    assert not mine.duplicate and mine.execution_id != squatter.execution_id
    assert (await client.wait(mine.execution_id, 20))["result"] == {"message": "mine"}
    # The same action and key with the same parameters: that execution again.
    again = await client.submit("core.echo", {"message": "mine"}, idempotency_key="nightly-1")
    assert again.duplicate and again.execution_id == mine.execution_id
    # ... with other parameters: a conflict that names the execution holding the key.
    other = await client.submit("core.echo", {"message": "other"}, idempotency_key="nightly-1")
    assert other.status == "failed" and not other.duplicate
    assert f"is already used by execution {mine.execution_id}" in other.error
    row = await client.wait(other.execution_id, 20)
    assert row["error"]["conflicts_with"] == str(mine.execution_id) and row["idempotency_key"] is None
    result = await baton.cli("submit", "core.echo", "message=third", "--idempotency-key", "nightly-1", "--wait")
    assert result.returncode == 1


# -- bounded parking -------------------------------------------------------------------------


def _queue_arguments(name: str) -> str:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "arguments"], capture_output=True, text=True, timeout=60
    ).stdout
    return next((line for line in listing.splitlines() if line.split("\t")[0] == name), "")


async def test_the_parking_queue_is_bounded_in_bytes(baton):
    await baton.start_executor(BATON__MESSAGE_QUEUE__REJECTED_REQUESTS_MAX_BYTES="2097152")
    assert "{\"x-max-length-bytes\",2097152}" in _queue_arguments(baton.names.rejected_requests_queue)


async def test_an_executor_starts_beside_a_parking_queue_left_with_older_limits(baton):
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        old = await channel.declare_queue(
            baton.names.rejected_requests_queue, durable=True, arguments={"x-max-length": 5}
        )
        await channel.default_exchange.publish(aio_pika.Message(b"parked earlier"), routing_key=old.name)
    finally:
        await connection.close()
    await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    assert (await (await baton.client()).run("core.noop", {}, wait_timeout_s=20))["status"] == "completed"
    assert await baton.queue_depth(baton.names.rejected_requests_queue) == 1  # nothing parked was lost


async def test_parameters_nested_too_deep_fail_at_intake_and_are_never_dispatched(baton):
    executor, _ = await baton.started(baton.spawn_executor(), baton.spawn_worker("w"))
    deep: dict = {}
    for _ in range(300):
        deep = {"a": deep}
    done = await (await baton.client()).run("tests.takes_dict", {"data": deep}, wait_timeout_s=20)
    assert done["status"] == "failed" and done["error"]["failed_by"] == "executor_intake"
    assert "nested deeper than 100 levels" in done["error"]["error"]
    assert [e["type"] for e in done["events"]] == ["execution.failed"]
    assert not executor.events("execution_rescheduled") and executor.process.poll() is None


async def test_a_command_inherits_none_of_the_workers_sockets(baton):
    await baton.started(baton.spawn_executor(), baton.spawn_worker("shell", runtimes="shell"))
    done = await (await baton.client()).run(
        "core.local", {"cmd": "for fd in /proc/$$/fd/*; do echo $fd $(readlink $fd); done"}, wait_timeout_s=20
    )
    assert done["status"] == "completed"
    links = dict(line.split(" ", 1) for line in done["result"]["stdout"].splitlines() if " " in line)
    stdio = {target for fd, target in links.items() if fd.rsplit("/", 1)[1] in ("0", "1", "2")}
    sockets = {target for target in links.values() if target.startswith("socket:")}
    # Its own stdin, stdout and stderr (socket pairs, under uvloop) and nothing of the worker's:
    # no database or broker connection.
    assert sockets <= stdio, links


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
async def test_intake_memory_is_bounded_by_bytes_not_by_what_json_expands_to(baton):
    """30 requests of 1 MiB each, shaped `[{}, {}, ...]`: parsed, each is some 30 MiB of Python
    objects, and a batch bounded by count alone held them all at once (900 MiB)."""
    # An action nobody serves: recorded as failed, its (valid) parameters held until then.
    body = json.dumps({"action_ref": "nosuch.action", "parameters": {"x": [{}] * 340_000}}, separators=(",", ":")).encode()
    assert 1_000_000 < len(body) < 1_048_576
    connection = await aio_pika.connect(AMQP_URL)
    try:  # all queued before the executor starts, so that its intake finds them at once
        channel = await connection.channel()
        await amqp.declare_requests_queue(channel, baton.names)
        exchange = await channel.get_exchange(baton.names.executions_exchange)
        for _ in range(30):
            await exchange.publish(aio_pika.Message(body, message_id=str(uuid.uuid4())), routing_key=amqp.REQUESTED_KEY)
    finally:
        await connection.close()
    executor = await baton.start_executor()
    before = _peak_rss_mib(executor.process.pid)
    pool = await baton.pool()

    async def all_recorded() -> bool:
        return await pool.fetchval("SELECT count(*) FROM executions WHERE status = 'failed'") == 30

    await wait_until(all_recorded, timeout_s=90, what="the 30 large requests to be recorded as failed")
    grown = _peak_rss_mib(executor.process.pid) - before
    assert grown < 500, f"the executor's peak memory grew by {grown:.0f} MiB"
    assert executor.process.poll() is None


async def test_forged_dead_letters_neither_move_nor_fail_a_waiting_dispatch(baton):
    """Anyone who may post may publish to the dead-letter exchange, headers included. Dead letters
    saying a dispatch expired, or was handed back, long before its worker's queue TTL and while
    that worker is alive, are dropped: such letters once spent the execution's dispatches, so that
    a few of them failed it, or moved it to another worker at will."""
    blind = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}
    executor = await baton.start_executor(BATON__EXECUTOR__MAX_SCHEDULE_ATTEMPTS="1", **blind)
    frozen = await baton.start_worker("frozen", **blind)
    frozen.signal(signal.SIGSTOP)  # alive, not busy, and not taking its dispatch for now
    try:
        client = await baton.client()
        sub = await client.submit("core.echo", {"message": "kept"}, watch=True)
        row = await baton.wait_status(sub.execution_id, "scheduled")
        body = json.dumps({"dispatches": [{"execution_id": str(sub.execution_id), "attempt": row["attempt"]}]})
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(baton.names.dlx)
            for reason in ("expired", "rejected"):
                headers = {"x-first-death-reason": reason,
                           "x-death": [{"reason": reason, "queue": baton.names.worker_queue("frozen"), "count": 1}]}
                await exchange.publish(aio_pika.Message(body.encode(), headers=headers), routing_key="")
        finally:
            await connection.close()

        async def dropped() -> bool:
            return len(executor.events("dead_letter_premature")) == 2

        await wait_until(dropped, what="the forged expiry to be dropped")
        after = await baton.execution(sub.execution_id)
        assert (after["status"], after["attempt"], after["schedule_attempts"]) == ("scheduled", row["attempt"], 1)
        assert not executor.events("dead_letter_handled")
    finally:
        frozen.signal(signal.SIGCONT)
    done = await baton.wait_status(sub.execution_id, "completed")
    assert (done["worker"], done["attempt"]) == ("frozen", row["attempt"])


async def test_a_forged_dispatch_naming_a_later_attempt_does_not_displace_the_real_one(baton):
    """A worker given two dispatches of one execution once kept only the one naming the later
    attempt, as the newer: a forged dispatch naming attempt 7 made it drop the real one, which
    then waited for the scheduled-timeout monitor. Which attempt is current is the row's to say."""
    blind = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}
    await baton.start_executor(**blind)
    frozen = await baton.start_worker("frozen", **blind)
    frozen.signal(signal.SIGSTOP)  # both messages wait for it, and reach its inbox together
    try:
        client = await baton.client()
        sub = await client.submit("core.echo", {"message": "real"}, watch=True)
        row = await baton.wait_status(sub.execution_id, "scheduled")
        forged = {"dispatches": [{"execution_id": str(sub.execution_id), "attempt": row["attempt"] + 6}]}
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(baton.names.dispatch_exchange)
            await exchange.publish(
                aio_pika.Message(json.dumps(forged).encode()), routing_key=amqp.Names.worker_routing_key("frozen")
            )
        finally:
            await connection.close()
    finally:
        frozen.signal(signal.SIGCONT)
    done = await baton.wait_status(sub.execution_id, "completed", timeout_s=15)
    assert (done["worker"], done["attempt"], done["result"]) == ("frozen", row["attempt"], {"message": "real"})
    stale = frozen.events("dispatch_stale")
    assert [(e["execution_id"], e["attempt"]) for e in stale] == [(str(sub.execution_id), row["attempt"] + 6)]


async def test_an_early_hand_back_from_a_worker_registered_since_moves_the_execution(baton):
    """A worker that stood down (or restarted under its name) hands back what it held, and may be
    registered and alive again by the time the dead-letter handler reads the letter: that letter is
    RabbitMQ's, and the execution moves at no cost (it is not dropped as forged)."""
    blind = {"BATON__EXECUTOR__HEARTBEAT_STALENESS_MULTIPLIER": "10000"}
    executor = await baton.start_executor(**blind)
    frozen = await baton.start_worker("frozen", **blind)
    frozen.signal(signal.SIGSTOP)
    try:
        client = await baton.client()
        sub = await client.submit("core.echo", {"message": "moved"}, watch=True)
        row = await baton.wait_status(sub.execution_id, "scheduled")
        # What registering again records (the stood-down worker's hand-back is the letter below).
        await (await baton.pool()).execute("UPDATE workers SET started_at = now() WHERE name = 'frozen'")
        body = json.dumps({"dispatches": [{"execution_id": str(sub.execution_id), "attempt": row["attempt"]}]})
        headers = {"x-first-death-reason": "rejected",
                   "x-death": [{"reason": "rejected", "queue": baton.names.worker_queue("frozen"), "count": 1}]}
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            exchange = await channel.get_exchange(baton.names.dlx)
            await exchange.publish(aio_pika.Message(body.encode(), headers=headers), routing_key="")
        finally:
            await connection.close()

        async def moved() -> bool:
            return bool(executor.events("dead_letter_handled"))

        await wait_until(moved, what="the hand-back to move the execution")
        assert not executor.events("dead_letter_premature")
    finally:
        frozen.signal(signal.SIGCONT)
    done = await baton.wait_status(sub.execution_id, "completed")
    assert done["attempt"] == row["attempt"] + 1
