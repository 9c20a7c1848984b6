"""Every service creates and migrates its database at start: any number of them starting at the
same instant against a database that does not exist yet must all come up."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from common import db
from common.schemas import TERMINAL_STATUSES
from tests.harness import Baton, wait_until

pytestmark = pytest.mark.integration

WORKERS = ("race-w1", "race-w2", "race-w3")


@pytest.fixture
async def fresh_baton(tmp_path: Path):
    """A world whose database does not exist: the services themselves must create it."""
    world = Baton(template="", tmp=tmp_path, db_name=f"baton_t_race_{uuid.uuid4().hex[:10]}")
    try:
        yield world
    finally:
        await world.teardown()  # drops the database and deletes the prefix's queues and exchanges


@pytest.mark.parametrize("round_", range(3))
async def test_executor_and_workers_starting_at_once_create_one_database(fresh_baton: Baton, round_: int):
    baton = fresh_baton
    with pytest.raises(asyncpg.exceptions.InvalidCatalogNameError):
        await (await asyncpg.connect(baton.db_url)).close()

    # Spawn all four before waiting on any of them.
    executor = baton.spawn("executor", "executor")
    workers = []
    for name in WORKERS:
        baton.worker_names.add(name)
        workers.append(
            baton.spawn(
                name, "worker", "--name", name, "--runtimes", "python",
                BATON__WORKER__ACTION_MODULES='["examples.actions", "tests.actions"]',
            )
        )

    await wait_until(
        lambda: baton._alive_and_logged(executor, "scheduler_started"), timeout_s=60, what="the executor to start"
    )
    for worker in workers:
        await wait_until(
            lambda w=worker: baton._alive_and_logged(w, "worker_registered"), timeout_s=60, what=f"{worker.name} to register"
        )

    # Exactly one of them created the database, and each migration was applied exactly once.
    services = [executor, *workers]
    assert sum(len(s.events("database_created")) for s in services) == 1
    applied = [e["migration"] for s in services for e in s.events("migration_applied")]
    migrations = [name for _, name, _ in db._migrations()]
    assert sorted(applied) == sorted(migrations)
    pool = await baton.pool()
    assert await pool.fetchval("SELECT count(*) FROM schema_migrations") == len(migrations)
    assert {r["name"] for r in await pool.fetch("SELECT name FROM workers WHERE status = 'active'")} == set(WORKERS)

    client = await baton.client()
    submission = await client.submit("core.noop", {})

    async def finished() -> dict | None:
        for service in services:  # a service that dies meanwhile fails the test at once, with its log
            assert service.process.poll() is None, (
                f"{service.name} exited with {service.process.returncode}:\n{service.log_path.read_text()[-3000:]}"
            )
        row = await baton.execution(submission.execution_id)
        return row if row["status"] in {s.value for s in TERMINAL_STATUSES} else None

    done = await wait_until(finished, timeout_s=60, what="core.noop to finish")
    assert done["status"] == "completed", done
    assert done["worker"] in WORKERS
